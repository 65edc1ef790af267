-- 0020: whether an autoscale pass has decided with a draining stage job known as draining. A
-- leaving job's pass runs at once (whatever the interval) only while its own row is unseen, or
-- while a module still wants a job: several jobs leaving together made one urgent pass each, and
-- each ran an squeue (issue 17's drain-tail burst). Exact, no clock: the pass that scaled the
-- job's module marks it in the same transaction, under the app's autoscale lock.
ALTER TABLE sbx_stage_jobs ADD COLUMN drain_seen boolean NOT NULL DEFAULT false;

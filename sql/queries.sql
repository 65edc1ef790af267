-- Every query of scalebox_hpc. Each starts with a `-- name: NAME` line; the comment lines
-- that follow describe it. Parameters use psycopg's %(name)s style.

-- name: insert_app
INSERT INTO sbx_apps (name, label, cluster, status, spec)
VALUES (%(name)s, %(label)s, %(cluster)s, %(status)s, %(spec)s)
RETURNING id;

-- name: insert_module
INSERT INTO sbx_modules (app_id, name, seq, sink_modules, conflict_action, stall_retries, max_pending, spec,
                         locality_wait_seconds, input_regex)
VALUES (%(app_id)s, %(name)s, %(seq)s, %(sink_modules)s, %(conflict_action)s, %(stall_retries)s,
        %(max_pending)s, %(spec)s, %(locality_wait_seconds)s, %(input_regex)s)
RETURNING id;

-- name: get_app
SELECT * FROM sbx_apps WHERE id = %(app_id)s;

-- name: list_apps
SELECT a.id, a.name, a.label, a.status, a.result, a.created_at, a.finished_at, a.owner,
       (SELECT count(*) FROM sbx_tasks t WHERE t.app_id = a.id) AS tasks
FROM sbx_apps a ORDER BY a.id;

-- name: list_modules
SELECT id, app_id, name, seq, sink_modules, conflict_action, spec
FROM sbx_modules WHERE app_id = %(app_id)s ORDER BY seq;

-- name: set_app_status
-- Moves an app between INITIAL / RUNNING / PAUSED; a FINISHED app stays finished.
UPDATE sbx_apps SET status = %(status)s, updated_at = now()
WHERE id = %(app_id)s AND status <> 'FINISHED'
RETURNING id;

-- name: finish_app
-- Sets the result text and FINISHED; the first finisher's text wins.
UPDATE sbx_apps
SET status = 'FINISHED', result = COALESCE(result, %(result)s), updated_at = now(),
    finished_at = COALESCE(finished_at, now())
WHERE id = %(app_id)s
RETURNING id;

-- name: insert_messages
-- Messages as tasks (see sbx_insert_messages_v1 for the row format and CONFLICT_ACTION).
SELECT sbx_insert_messages_v1(%(app_id)s::bigint, %(from_task_id)s::bigint, %(rows)s::jsonb) AS written;

-- name: claim_tasks
-- The statement sbx_l_claim_v1 runs (migrations 0018, 0027; the named query `claim` calls it, and
-- tests/integration/test_launcher_role.py checks the two texts agree); kept here for EXPLAIN.
-- The claim for one or several slots of a module on one host (the node's dispatcher claims for
-- all its idle slots at once), in one statement:
--  1. candidates: READY tasks of this module, oldest first, that this host/slot may take
--     (to_host / to_slot implement HOST-BOUND and SLOT-BOUND dispatch);
--     the partial indexes sbx_tasks_local_idx, _waited_idx and _free_idx serve the scans;
--  2. FOR UPDATE SKIP LOCKED: concurrent slots never wait on, nor double-claim, a row;
--  3. only while the app is RUNNING;
--  4. mark them RUNNING with the lease (slot, host, heartbeat, expiry) in the same statement.
--  5. back-pressure: nothing while a sink module with max_pending has that many READY tasks
--     (counted up to the limit only, on the same partial index).
--  6. locality: first the tasks preferring this host (inputs in its scratch), then those
--     preferring another host that did not take them in time, then those preferring none;
--  7. dealt to the slots: a task addressed to a slot's seq (to_slot, SLOT-BOUND) goes to that
--     slot; the others round-robin over the slots' seats (slot_ids/slot_seqs/wants: up to
--     `want` each), best first, so every slot gets its first task before any gets a second.
WITH app AS (
    SELECT 1 FROM sbx_apps WHERE id = %(app_id)s AND status = 'RUNNING'
), full_sinks AS (
    SELECT 1
    FROM sbx_modules me
    JOIN sbx_modules s ON s.app_id = me.app_id AND s.name = ANY (me.sink_modules)
    WHERE me.id = %(module_id)s AND s.max_pending IS NOT NULL
      AND (SELECT count(*) FROM (SELECT 1 FROM sbx_tasks r
                                 WHERE r.module_id = s.id AND r.status = -1
                                 LIMIT s.max_pending) AS lim) >= s.max_pending
), local AS (
    -- tasks preferring this host (sbx_tasks_local_idx): bound to it, or their inputs are in its
    -- scratch; those with all of their inputs here first
    SELECT t.id, t.to_slot
    FROM sbx_tasks t
    WHERE t.module_id = %(module_id)s
      AND t.status = -1
      AND t.pref_host = %(host)s
      AND (t.to_slot IS NULL OR t.to_slot = ANY (%(slot_seqs)s::integer[]))
      AND EXISTS (SELECT 1 FROM app)
      AND NOT EXISTS (SELECT 1 FROM full_sinks)
      AND (t.xmax = '0'::xid OR sbx_task_still_ready_v1(t.id))
    ORDER BY t.pref_partial, t.id
    LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED
), waited AS (
    -- the tasks preferring another host whose locality wait is over (delay scheduling: a dead
    -- or busy holder strands nothing), longest expired first (sbx_tasks_waited_idx); they have
    -- waited already, so they come before the free ones. Bound tasks are their host's
    -- (`local`) until sbx_release_bound_v1 unbinds those of a dead host.
    SELECT t.id, t.to_slot
    FROM sbx_tasks t
    WHERE t.module_id = %(module_id)s
      AND t.status = -1
      AND t.to_host IS NULL
      AND t.pref_host IS NOT NULL
      AND t.pref_until <= now()
      AND t.pref_host <> %(host)s
      AND (t.to_slot IS NULL OR t.to_slot = ANY (%(slot_seqs)s::integer[]))
      AND EXISTS (SELECT 1 FROM app)
      AND NOT EXISTS (SELECT 1 FROM full_sinks)
      AND (t.xmax = '0'::xid OR sbx_task_still_ready_v1(t.id))
    ORDER BY t.pref_until, t.id
    LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED
), free AS (
    -- the tasks bound to and preferring no host, oldest first (sbx_tasks_free_idx)
    SELECT t.id, t.to_slot
    FROM sbx_tasks t
    WHERE t.module_id = %(module_id)s
      AND t.status = -1
      AND t.to_host IS NULL
      AND t.pref_host IS NULL
      AND (t.to_slot IS NULL OR t.to_slot = ANY (%(slot_seqs)s::integer[]))
      AND EXISTS (SELECT 1 FROM app)
      AND NOT EXISTS (SELECT 1 FROM full_sinks)
      AND (t.xmax = '0'::xid OR sbx_task_still_ready_v1(t.id))
    ORDER BY t.id
    LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED
), candidates AS (
    -- read lazily: `waited` only when `local` did not fill the limit, `free` only after both
    SELECT id, to_slot FROM local
    UNION ALL
    SELECT id, to_slot FROM waited
    UNION ALL
    SELECT id, to_slot FROM free
    LIMIT %(limit)s
), ranked AS (
    SELECT id, to_slot, row_number() OVER () AS r FROM candidates
), slots AS (
    SELECT * FROM unnest(%(slot_ids)s::bigint[], %(slot_seqs)s::integer[], %(wants)s::integer[])
                  WITH ORDINALITY AS s (slot_id, seq, want, ord)
), seats AS (
    SELECT s.slot_id, row_number() OVER (ORDER BY k.k, s.ord) AS seat
    FROM slots s, generate_series(1, s.want) AS k (k)
), dealt AS (
    SELECT f.id, st.slot_id, f.r
    FROM (SELECT id, r, row_number() OVER (ORDER BY r) AS seat FROM ranked WHERE to_slot IS NULL) f
    JOIN seats st ON st.seat = f.seat
    UNION ALL
    SELECT r.id, (SELECT s.slot_id FROM slots s WHERE s.seq = r.to_slot ORDER BY s.ord LIMIT 1), r.r
    FROM ranked r WHERE r.to_slot IS NOT NULL
), picked AS (
    SELECT array_agg(d.id) AS ids, array_agg(d.slot_id) AS slot_ids, array_agg(d.r) AS rs FROM dealt d
), claimed AS (
    -- by the ids (0027): the statement's generic plan is kept for the session, and a join with
    -- the dealt rows, planned while the table was small, read all of it per claim (a hash of a
    -- sequential scan: 200 ms per claim at 300,000 tasks until the next ANALYZE); = ANY looks
    -- each up by primary key at any size (no sequential scan: see the function's settings)
    UPDATE sbx_tasks t
    SET status = -3, slot_id = p.slot_ids[array_position(p.ids, t.id)], host = %(host)s,
        attempts = t.attempts + 1, started_at = now(), finished_at = NULL, heartbeat_at = now(),
        lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
    FROM picked p
    WHERE t.id = ANY (p.ids)
    RETURNING t.id, t.app_id, t.module_id, t.body, t.headers, t.status, t.attempts, t.retry_base,
              t.slot_id AS claimed_by, p.rs[array_position(p.ids, t.id)] AS r
)
-- best first: a slot runs (and prefetches) its tasks in claim order
SELECT * FROM claimed ORDER BY r;

-- name: complete_task
-- The hand-off in one round trip (sbx_l_complete_task_v1: sbx_complete_task_v2 for a task of an
-- app the caller acts on); written is NULL on a lost lease.
SELECT sbx_l_complete_task_v1(%(task_id)s::bigint, %(slot_id)s::bigint, %(attempt)s::integer, %(status)s::integer,
                              %(requeue)s, %(exec)s::jsonb, %(messages)s::jsonb, %(finish_text)s) AS written;

-- name: recover_expired
-- Lease recovery, run by any live launcher (heartbeat thread), stage job or CLI call: no daemon
-- (sbx_l_recover_v2, over the apps the caller acts on; every > 0, a launcher's periodic call: only
-- the apps nobody recovered in the last `every` seconds, so a fleet recovers each app about 8
-- times per heartbeat, not 4 times per launcher):
--  1. RUNNING tasks whose lease expired: the claim's and their slot's (0033), the slot's renewed
--     by its beats (their slot, launcher, node or job died);
--     SKIP LOCKED so concurrent recoverers split the work and never block a hand-off;
--     after a server restart a lease counts from the restart: its owner, reconnecting, gets
--     one whole lease to renew it before anyone may take the task (an outage is no death);
--  2. each gets an execution record with status 123 (STALLED);
--  3. it returns to READY while its module's stall_retries allow another attempt, else 123;
--  4. slots silent for two of their own heartbeat intervals are marked LOST;
--  5. READY tasks bound to a dead host, past their locality wait, are bound no more (at most
--     bound_limit): one last row (NULL, NULL, unbound) says how many.
SELECT id, status, unbound FROM sbx_l_recover_v2(%(every)s::double precision, %(bound_limit)s::integer);

-- name: release_tasks
-- Gives RUNNING tasks of a slot back (drain, shutdown): READY again, the attempt not counted;
-- busy: held by another transaction, not released (tried again, see sbx_l_release_v2).
SELECT id, busy FROM sbx_l_release_v2(%(slot_id)s::bigint, NULL);

-- name: heartbeat_slot
-- One statement renews the slot's lease, which is the lease of its RUNNING tasks (0033: no task
-- row is written). A RUNNING task of the slot that it does not know (task_ids; NULL: it knows
-- all), claimed more than a lease ago, is one whose claim reply was lost: it goes back to READY
-- (attempt not counted) instead of living on the slot's lease for the slot's whole life. Why the
-- slot waits and its live output are left as they are (sbx_l_heartbeat_slot_v1: 0034, the
-- node's beat of this one slot, with keep_waiting).
SELECT renewed, released
FROM sbx_l_heartbeat_slot_v1(%(slot_id)s::bigint, %(status)s::text, %(lease_seconds)s::double precision,
                             %(task_ids)s::bigint[]);

-- name: heartbeat_slots
-- The node's one heartbeat statement: every slot in `beats` (JSON rows slot_id, status,
-- lease_seconds, task_ids, waiting, output, keep_waiting) is renewed, and so its tasks' lease; the
-- slot's row takes why it waits (NULL: its gates are open; kept with keep_waiting) and, when sent, the
-- live tail of its running task's output (NULL: unchanged, kept). Returns the ids of the stray
-- tasks released (claimed over a lease ago, unknown to their slot). See sbx_l_heartbeat_slots_v1.
SELECT renewed, released FROM sbx_l_heartbeat_slots_v1(%(beats)s::jsonb);

-- name: upsert_host
SELECT sbx_l_upsert_host_v1(%(name)s::text, %(info)s::jsonb);

-- name: insert_slot
SELECT sbx_l_insert_slot_v1(%(module_id)s::bigint, %(host)s::text, %(seq)s::integer, %(pid)s::integer,
                            %(work_dir)s::text, %(heartbeat_seconds)s::double precision) AS id;

-- name: set_slot_status
SELECT sbx_l_set_slot_status_v1(%(slot_id)s::bigint, %(status)s::text, %(message)s::text, %(tasks_done)s::bigint);

-- name: module_counts
-- Per-module task counts by status, plus done in the last minute (for rates).
SELECT m.id AS module_id, m.name, m.seq, t.status, count(t.id) AS n,
       count(t.id) FILTER (WHERE t.finished_at > now() - interval '60 seconds') AS last_minute
FROM sbx_modules m
LEFT JOIN sbx_tasks t ON t.module_id = m.id
WHERE m.app_id = %(app_id)s
GROUP BY m.id, m.name, m.seq, t.status
ORDER BY m.seq, t.status;

-- name: list_tasks
SELECT t.id, m.name AS module, t.body, t.headers, t.status, t.attempts, t.host,
       t.created_at, t.started_at, t.finished_at
FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id
WHERE t.app_id = %(app_id)s
  AND (%(module)s::text IS NULL OR m.name = %(module)s)
  AND (%(status)s::integer IS NULL OR t.status = %(status)s)
ORDER BY t.id
LIMIT %(limit)s;

-- name: get_task
SELECT t.*, m.name AS module FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id
WHERE t.id = %(task_id)s;

-- name: list_execs
SELECT * FROM sbx_task_execs WHERE task_id = %(task_id)s ORDER BY id;

-- name: retry_tasks
-- Manual retry: terminal tasks become READY again (RUNNING and READY ones are left alone),
-- with a fresh attempt budget (their retry rules and stall retries apply anew; attempts keep
-- counting, so every execution keeps its own number).
UPDATE sbx_tasks
SET status = -1, slot_id = NULL, host = NULL, started_at = NULL, finished_at = NULL,
    heartbeat_at = NULL, lease_expires_at = NULL, retry_base = attempts
WHERE id = ANY(%(task_ids)s) AND status NOT IN (-1, -3)
RETURNING id;

-- name: app_activity
-- What an idle slot needs to know: is the app still on, and does any module have work
-- READY or RUNNING (upstream work will turn into ours, so idling out now would be early).
SELECT status, cancelled, active FROM sbx_l_app_activity_v1(%(app_id)s::bigint);

-- name: module_activity
-- What an idle slot (or MPI stage) of one module needs to know: is the app still on, and has
-- this module, or any module upstream of it (transitively along sink_modules: work there will
-- turn into ours), tasks READY or RUNNING. Work of unrelated or downstream modules does not
-- keep it up, so a finished stage releases its nodes while a later stage still works.
-- In an app split over databases, a module no module of its part feeds is always active (its
-- work comes from the other parts).
SELECT status, cancelled, active FROM sbx_l_module_activity_v1(%(app_id)s::bigint, %(module_id)s::bigint);

-- name: cancel_app
-- Cancel: FINISHED with the result 'cancelled'; launchers kill and release what runs.
UPDATE sbx_apps
SET status = 'FINISHED', cancelled = true, result = COALESCE(result, 'cancelled'), updated_at = now(),
    finished_at = COALESCE(finished_at, now())
WHERE id = %(app_id)s
RETURNING id;

-- name: app_cancelled
SELECT cancelled FROM sbx_l_app_v1(%(app_id)s::bigint);

-- name: semaphore_create
INSERT INTO sbx_semaphores (app_id, name, value) VALUES (%(app_id)s, %(name)s, %(value)s)
ON CONFLICT (app_id, name) DO UPDATE SET value = EXCLUDED.value
RETURNING value;

-- name: semaphore_get
SELECT value FROM sbx_semaphores WHERE app_id = %(app_id)s AND name = %(name)s;

-- name: semaphore_add
-- Atomic increment/decrement (row lock); returns the new value.
UPDATE sbx_semaphores SET value = value + %(delta)s
WHERE app_id = %(app_id)s AND name = %(name)s
RETURNING value;

-- name: semaphore_take_many
-- Takes up to `n` units while the value is positive (a batched claim's gate); returns how many.
SELECT taken FROM sbx_l_semaphore_take_v1(%(app_id)s::bigint, %(name)s::text, %(n)s::bigint);

-- name: semaphore_list
SELECT name, value FROM sbx_semaphores WHERE app_id = %(app_id)s ORDER BY name;

-- name: variable_set
INSERT INTO sbx_variables (app_id, name, value) VALUES (%(app_id)s, %(name)s, %(value)s)
ON CONFLICT (app_id, name) DO UPDATE SET value = EXCLUDED.value;

-- name: variable_get
SELECT value FROM sbx_variables WHERE app_id = %(app_id)s AND name = %(name)s;

-- name: variable_list
SELECT name, value FROM sbx_variables WHERE app_id = %(app_id)s ORDER BY name;

-- name: autoscale_lock
-- One autoscaler per app at a time; whoever does not get the lock skips (someone else scales).
SELECT pg_try_advisory_xact_lock(hashtextextended('scalebox_hpc.autoscale:' || %(app_id)s::text, 0)) AS got;

-- name: autoscale_gate
-- Read under the app's autoscale lock before a pass: when the app's last pass was (one pass per
-- interval across all its jobs), the Slurm commands of the last minute on its cluster (the
-- budget spent), and how many of its stage jobs run and do not drain (a leaving job that was
-- the last one scales at once: no other job will pass soon; a PENDING one may wait for long).
SELECT autoscaled_at, now, cluster, calls_last_minute, running_jobs FROM sbx_l_autoscale_gate_v1(%(app_id)s::bigint);

-- name: set_app_autoscaled
SELECT sbx_l_set_app_autoscaled_v1(%(app_id)s::bigint);

-- name: record_slurm_calls
-- The Slurm commands one autoscale pass ran; rows over an hour old go at the same time.
SELECT sbx_l_record_slurm_calls_v1(%(cluster)s::text, %(app_id)s::bigint, %(calls)s::integer);

-- name: slurm_calls_by_cluster
-- The Slurm commands autoscale passes ran in the last minute, per cluster (all apps): the budget of
-- each cluster a multi-cluster app's modules name.
SELECT cluster, calls FROM sbx_l_slurm_calls_by_cluster_v1();

-- name: slurm_calls_last_minute
-- The Slurm commands autoscale passes ran on the app's cluster in the last minute (all apps).
SELECT COALESCE(sum(c.calls), 0) AS calls, count(c.id) AS passes
FROM sbx_apps a
LEFT JOIN sbx_slurm_calls c ON c.cluster = COALESCE(a.cluster, '') AND c.at > now() - interval '60 seconds'
WHERE a.id = %(app_id)s;

-- name: stage_modules
-- What the autoscaler decides on, per module: its spec, bounds, queue and live (non-draining) jobs.
SELECT * FROM sbx_l_stage_modules_v1(%(app_id)s::bigint);

-- name: input_holders
-- Where the inputs of a module's oldest READY tasks (at most `limit` tasks) sit: per host, how
-- many of those inputs its scratch holds, most first (hosts need not be live: a node's scratch
-- outlives the jobs that filled it). Chooses the nodes a new stage job asks for.
SELECT host, inputs, bytes FROM sbx_l_input_holders_v1(%(module_id)s::bigint, %(limit)s::integer);

-- name: insert_stage_job
-- nodes: those it asked for (--nodelist), until Slurm says where it runs
SELECT sbx_l_insert_stage_job_v1(%(app_id)s::bigint, %(module_id)s::bigint, %(slurm_job_id)s::text,
                                 %(cluster)s::text, %(nodes)s::text) AS id;

-- name: stage_jobs
-- The app's stage jobs: the live ones, plus (with include_ended) the ended ones, newest first.
SELECT * FROM sbx_l_stage_jobs_v1(%(app_id)s::bigint, %(include_ended)s::boolean);

-- name: update_stage_job
SELECT sbx_l_update_stage_job_v1(%(id)s::bigint, %(state)s::text, %(ended)s::boolean, %(nodes)s::text,
                                 %(exit_code)s::integer, %(reason)s::text, %(end_time)s::timestamptz);

-- name: drain_stage_job
-- A launcher of this job drains (walltime signal or `stage stop`): it is no longer capacity.
SELECT id FROM sbx_l_drain_stage_job_v1(%(cluster)s::text, %(slurm_job_id)s::text) AS id;

-- name: stage_job_drain_seen
-- Read under the app's autoscale lock by a leaving job's pass (0020): did a pass already scale
-- its module knowing it drains?
SELECT drain_seen FROM sbx_l_stage_job_drain_seen_v1(%(cluster)s::text, %(slurm_job_id)s::text) AS drain_seen;

-- name: mark_drain_seen
-- The draining jobs an autoscale pass scaled their module with (their row ids, as it read them:
-- a job that began draining after that read stays unseen, and its own pass runs).
SELECT sbx_l_mark_drain_seen_v1(%(ids)s::bigint[]);

-- name: lock_app_modules
-- An elected autoscale pass locks the app's module rows first, in id order, as an idle job's
-- may-I-leave check does (module row, then its job row): a pass that updated job rows first and
-- then a module row could deadlock with that check.
SELECT id FROM sbx_l_lock_app_modules_v1(%(app_id)s::bigint) AS id;

-- name: lock_stage_job_module
-- An idle stage job asks whether it may end: its module row is locked for the rest of the
-- transaction (NO KEY UPDATE: task inserts, which check the foreign key, are not held up) so
-- that two jobs going idle at once decide one after the other.
SELECT draining, id, spec, min_jobs, max_jobs
FROM sbx_l_lock_stage_job_module_v1(%(cluster)s::text, %(slurm_job_id)s::text);

-- name: running_stage_jobs
-- The module's jobs that run and do not drain (the asking job counts as running whatever
-- state it was last seen in: it runs, it is asking).
SELECT sbx_l_running_stage_jobs_v1(%(module_id)s::bigint, %(cluster)s::text, %(slurm_job_id)s::text) AS n;

-- name: set_module_scaled
SELECT sbx_l_set_module_scaled_v1(%(module_id)s::bigint);

-- name: set_module_bounds
UPDATE sbx_modules SET min_jobs = %(min_jobs)s, max_jobs = %(max_jobs)s, scaled_at = NULL
WHERE app_id = %(app_id)s AND name = %(module)s
RETURNING id;

-- name: stage_job_draining
-- Polled by a stage job's launchers: `scalebox stage stop` asks them to drain through here.
SELECT draining, end_time FROM sbx_l_stage_job_flags_v1(%(cluster)s::text, %(slurm_job_id)s::text);

-- name: adopt_tasks
-- READY tasks queued before any holder of their inputs was up now prefer the best one.
SELECT sbx_l_adopt_tasks_v1(%(app_id)s::bigint, %(host)s::text, %(limit)s::integer) AS adopted;

-- name: complete_tasks_batch
-- The hand-off of a whole batch (the node's dispatcher, the MPI farm) in one statement (one
-- transaction, one round trip), see sbx_complete_tasks_v1 (sbx_l_complete_tasks_v1: for tasks of
-- apps the caller acts on): a row per task recorded; a task whose lease was lost has no row.
SELECT item AS ord, written FROM sbx_l_complete_tasks_v1(%(rows)s::jsonb);

-- name: release_task_ids
-- Gives some RUNNING tasks of a slot back (prefetched ones, an MPI stage's undistributed or
-- aborted tasks); busy as in release_tasks.
SELECT id, busy FROM sbx_l_release_v2(%(slot_id)s::bigint, %(task_ids)s::bigint[]);

-- name: app_uid
-- The app's uid, unique across databases: names its work dirs.
SELECT uid FROM sbx_l_app_v1(%(app_id)s::bigint);

-- name: db_now
SELECT now() AS now;

-- name: list_slots
-- Every slot of an app (newest first within module order), with the task it runs now.
-- `live`: not ended and heard from within two of its own heartbeats; `waiting`: why a live
-- slot claims nothing now (check.sh, a disk gate), as its node last said.
SELECT s.id, m.name AS module, m.seq AS module_seq, s.host, s.seq, s.status, s.message, s.waiting,
       s.tasks_done, s.started_at, s.heartbeat_at, s.ended_at,
       (s.status IN ('STARTING', 'READY', 'RUNNING')
        AND s.heartbeat_at > now() - make_interval(secs => 2 * s.heartbeat_seconds)) AS live,
       t.id AS task_id, t.body AS task_body,
       extract(epoch FROM now() - t.started_at)::double precision AS task_seconds
FROM sbx_slots s
JOIN sbx_modules m ON m.id = s.module_id
LEFT JOIN LATERAL (SELECT id, body, started_at FROM sbx_tasks  -- sbx_tasks_app_status_idx: running ones only
                   WHERE app_id = m.app_id AND module_id = s.module_id AND status = -3 AND slot_id = s.id
                   ORDER BY id LIMIT 1) t ON true
WHERE m.app_id = %(app_id)s
ORDER BY m.seq, s.host, s.seq, s.id;

-- name: failed_tasks
-- Up to %(limit)s failed tasks of an app (exit codes, timeouts, system errors), oldest first,
-- with the stderr of their last execution (its last 4 KiB: enough for a last line).
SELECT t.id, m.name AS module, t.body, t.status, t.attempts,
       right(e.stderr, 4096) AS stderr, right(e.stdout, 4096) AS stdout
FROM sbx_tasks t
JOIN sbx_modules m ON m.id = t.module_id
LEFT JOIN LATERAL (SELECT stderr, stdout FROM sbx_task_execs
                   WHERE task_id = t.id ORDER BY id DESC LIMIT 1) e ON true
WHERE t.app_id = %(app_id)s AND (t.status > 0 OR t.status < -100)
ORDER BY t.id
LIMIT %(limit)s;

-- name: list_tasks_failed
-- Like list_tasks, only failed tasks (exit codes, timeouts, system errors).
SELECT t.id, m.name AS module, t.body, t.headers, t.status, t.attempts, t.host,
       t.created_at, t.started_at, t.finished_at
FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id
WHERE t.app_id = %(app_id)s
  AND (%(module)s::text IS NULL OR m.name = %(module)s)
  AND (t.status > 0 OR t.status < -100)
ORDER BY t.id
LIMIT %(limit)s;

-- name: any_app
SELECT EXISTS (SELECT 1 FROM sbx_apps) AS any;

-- name: module_names
SELECT name FROM sbx_modules WHERE app_id = %(app_id)s ORDER BY seq;

-- name: running_task
-- Where a RUNNING task runs and for how long (the database's clock), and the live tail of its
-- output its node's heartbeat last stored (`output`; NULL when there is none of this task);
-- no row when it does not run.
SELECT t.host, s.seq, s.status AS slot_status,
       extract(epoch FROM now() - t.started_at)::double precision AS seconds,
       CASE WHEN s.live_output ->> 'task_id' = t.id::text THEN s.live_output END AS output
FROM sbx_tasks t LEFT JOIN sbx_slots s ON s.id = t.slot_id
WHERE t.id = %(task_id)s AND t.status = -3;

-- name: task_state
-- What `task show --follow` polls: the task's status, and while it runs its live output.
SELECT t.status, t.attempts,
       CASE WHEN t.status = -3 AND s.live_output ->> 'task_id' = t.id::text THEN s.live_output END AS output
FROM sbx_tasks t LEFT JOIN sbx_slots s ON s.id = t.slot_id
WHERE t.id = %(task_id)s;

-- name: bulk_create
-- bulk submit ---------------------------------------------------------------------------------
-- Many tasks at once (db/apps.py `submit`, `add_tasks`): the rows are COPYed into sbx_bulk, then
-- one INSERT ... SELECT per CONFLICT_ACTION writes them, with the columns and ON CONFLICT rules of
-- sbx_insert_messages_v1. The groups parameter is a JSON array of {grp, module_id, headers, to_host, to_slot,
-- status, action}: what the rows of one group (one module, one set of headers) share. Rows go in
-- in submit order (seq), so claims, which take the lowest id first, keep the file's order.
--
-- Lives in the caller's transaction only: dropped at the end of the submit, at the latest at
-- COMMIT / ROLLBACK (so PgBouncer's transaction pooling never hands it to another client).
CREATE TEMP TABLE sbx_bulk (seq bigint NOT NULL, grp integer NOT NULL, line bigint, body text NOT NULL)
ON COMMIT DROP;

-- name: bulk_copy
COPY sbx_bulk (seq, grp, line, body) FROM STDIN;

-- name: bulk_drop
DROP TABLE sbx_bulk;

-- name: bulk_insert_fail
-- A body its module has already, or one given twice, raises unique_violation (see bulk_fail_culprit).
INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status)
SELECT %(app_id)s::bigint, g.module_id, b.body, g.headers, g.to_host, g.to_slot, g.status
FROM sbx_bulk b
JOIN jsonb_to_recordset(%(groups)s::jsonb) AS g (grp integer, module_id bigint, headers jsonb, to_host text,
                                               to_slot integer, status integer, action text) USING (grp)
WHERE g.action = 'FAIL'
ORDER BY b.seq;

-- name: bulk_insert_ignore
-- A body that exists already (or came earlier in this submit) keeps its task.
INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status)
SELECT %(app_id)s::bigint, g.module_id, b.body, g.headers, g.to_host, g.to_slot, g.status
FROM sbx_bulk b
JOIN jsonb_to_recordset(%(groups)s::jsonb) AS g (grp integer, module_id bigint, headers jsonb, to_host text,
                                               to_slot integer, status integer, action text) USING (grp)
WHERE g.action = 'IGNORE'
ORDER BY b.seq
ON CONFLICT (module_id, body_sha) DO NOTHING;

-- name: bulk_insert_overwrite
-- A body that exists already resets its task to the new message, unless it is RUNNING right now.
-- A body given twice raises cardinality_violation: then bulk_insert_overwrite_once.
INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status)
SELECT %(app_id)s::bigint, g.module_id, b.body, g.headers, g.to_host, g.to_slot, g.status
FROM sbx_bulk b
JOIN jsonb_to_recordset(%(groups)s::jsonb) AS g (grp integer, module_id bigint, headers jsonb, to_host text,
                                               to_slot integer, status integer, action text) USING (grp)
WHERE g.action = 'OVERWRITE'
ORDER BY b.seq
ON CONFLICT (module_id, body_sha) DO UPDATE
SET headers = EXCLUDED.headers, to_host = EXCLUDED.to_host, to_slot = EXCLUDED.to_slot,
    pref_host = EXCLUDED.pref_host, pref_until = EXCLUDED.pref_until, pref_partial = EXCLUDED.pref_partial,
    status = EXCLUDED.status, attempts = 0, retry_base = 0, slot_id = NULL, host = NULL, heartbeat_at = NULL,
    lease_expires_at = NULL, started_at = NULL, finished_at = NULL,
    from_task_id = EXCLUDED.from_task_id, created_at = now()
WHERE sbx_tasks.status <> -3;

-- name: bulk_insert_overwrite_once
-- bulk_insert_overwrite for a submit that gives a body twice: as if the rows went in one after
-- another, each body is written once, with its last occurrence's headers, at its first one's place.
INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status)
SELECT %(app_id)s::bigint, x.module_id, x.body, x.headers, x.to_host, x.to_slot, x.status
FROM (
    SELECT DISTINCT ON (g.module_id, b.body) g.module_id, b.body, g.headers, g.to_host, g.to_slot, g.status,
           min(b.seq) OVER (PARTITION BY g.module_id, b.body) AS first_seq
    FROM sbx_bulk b
    JOIN jsonb_to_recordset(%(groups)s::jsonb) AS g (grp integer, module_id bigint, headers jsonb, to_host text,
                                                   to_slot integer, status integer, action text) USING (grp)
    WHERE g.action = 'OVERWRITE'
    ORDER BY g.module_id, b.body, b.seq DESC
) AS x
ORDER BY x.first_seq
ON CONFLICT (module_id, body_sha) DO UPDATE
SET headers = EXCLUDED.headers, to_host = EXCLUDED.to_host, to_slot = EXCLUDED.to_slot,
    pref_host = EXCLUDED.pref_host, pref_until = EXCLUDED.pref_until, pref_partial = EXCLUDED.pref_partial,
    status = EXCLUDED.status, attempts = 0, retry_base = 0, slot_id = NULL, host = NULL, heartbeat_at = NULL,
    lease_expires_at = NULL, started_at = NULL, finished_at = NULL,
    from_task_id = EXCLUDED.from_task_id, created_at = now()
WHERE sbx_tasks.status <> -3;

-- name: bulk_fail_culprit
-- After bulk_insert_fail failed: its first row (in submit order) whose body the module has
-- already, or that repeats an earlier row of the same module (first_seq / first_line: that row).
SELECT f.seq, f.grp, f.line, f.body, f.first_seq, f.first_line, m.name AS module
FROM (
    SELECT b.seq, b.grp, b.line, b.body, g.module_id,
           first_value(b.seq) OVER w AS first_seq, first_value(b.line) OVER w AS first_line
    FROM sbx_bulk b
    JOIN jsonb_to_recordset(%(groups)s::jsonb) AS g (grp integer, module_id bigint, action text) USING (grp)
    WHERE g.action = 'FAIL'
    WINDOW w AS (PARTITION BY g.module_id, b.body ORDER BY b.seq)
) AS f
JOIN sbx_modules m ON m.id = f.module_id
WHERE f.first_seq <> f.seq
   OR EXISTS (SELECT 1 FROM sbx_tasks t WHERE t.module_id = f.module_id AND t.body_sha = sbx_body_digest(f.body))
ORDER BY f.seq
LIMIT 1;

-- name: bulk_plain_modules
-- Before a bulk submit's inserts: the modules of its rows that have no input_regex, for the
-- WHEN clause of the locality trigger (0025), which then skips their rows that name no inputs
-- and no host (all the trigger would do is leave pref_host NULL). Transaction-local; cleared
-- by bulk_plain_modules_clear after the inserts.
SELECT set_config('sbx.plain_modules', COALESCE(string_agg(m.id::text, ','), ''), true) AS plain
FROM sbx_modules m
WHERE m.id = ANY (%(module_ids)s::bigint[]) AND m.input_regex IS NULL;

-- name: bulk_plain_modules_clear
SELECT set_config('sbx.plain_modules', '', true);

-- name: bulk_rows_json
-- A submit of few rows: sbx_bulk as a common table expression over one JSON parameter (rows:
-- [{seq, grp, line, body}]) put before each statement above, instead of a temporary table.
WITH sbx_bulk AS (
    SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb) AS r (seq bigint, grp integer, line bigint, body text)
)

-- name: module_why
-- Per module of an app, what the claim (claim_tasks) waits on, so a user can be told why READY
-- tasks do not move: the app's status (only RUNNING claims), the module's semaphore and its
-- value (a claim takes one unit a task, none while it is 0 or absent), its live slots and why
-- those wait (their `waiting`, from the node: check.sh, disk gates), its sinks that are full
-- (back-pressure: READY >= max_pending, counted up to the limit as the claim does), and the
-- hosts its READY tasks wait for that run no live slot of the module (bound by to_host, or
-- preferred for their inputs within their locality wait; of at most 10000 READY tasks that
-- prefer a host: the status of a queue of millions stays cheap).
SELECT m.id AS module_id, m.name, m.seq, a.status AS app_status,
       m.spec -> 'arguments' ->> 'semaphore' AS semaphore,
       (SELECT sem.value FROM sbx_semaphores sem
        WHERE sem.app_id = m.app_id AND sem.name = m.spec -> 'arguments' ->> 'semaphore') AS semaphore_value,
       (SELECT count(*) FROM sbx_slots s WHERE s.module_id = m.id) AS slots,
       COALESCE(l.live, 0) AS live_slots,
       COALESCE(l.waiting, '[]'::jsonb) AS waiting,
       (SELECT COALESCE(jsonb_agg(jsonb_build_object('sink', s.name, 'max_pending', s.max_pending) ORDER BY s.seq),
                        '[]'::jsonb)
        FROM sbx_modules s
        WHERE s.app_id = m.app_id AND s.name = ANY (m.sink_modules) AND s.max_pending IS NOT NULL
          AND (SELECT count(*) FROM (SELECT 1 FROM sbx_tasks r
                                     WHERE r.module_id = s.id AND r.status = -1
                                     LIMIT s.max_pending) AS lim) >= s.max_pending) AS full_sinks,
       (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                   'host', h.pref_host, 'tasks', h.n, 'bound', h.bound,
                   'wait_seconds', h.wait_seconds) ORDER BY h.n DESC, h.pref_host), '[]'::jsonb)
        FROM (SELECT w.pref_host, count(*) AS n, bool_or(w.to_host IS NOT NULL) AS bound,
                     max(extract(epoch FROM w.pref_until - now()))::double precision AS wait_seconds
              FROM (SELECT t.pref_host, t.to_host, t.pref_until
                    FROM sbx_tasks t  -- sbx_tasks_local_idx; a bounded look, also on a queue of millions
                    WHERE t.module_id = m.id AND t.status = -1 AND t.pref_host IS NOT NULL
                    LIMIT 10000) AS w
              WHERE (w.to_host IS NOT NULL OR w.pref_until > now())
                AND NOT EXISTS (SELECT 1 FROM sbx_slots s
                                WHERE s.module_id = m.id AND s.host = w.pref_host
                                  AND s.status IN ('STARTING', 'READY', 'RUNNING')
                                  AND s.heartbeat_at > now() - make_interval(secs => 2 * s.heartbeat_seconds))
              GROUP BY w.pref_host) AS h) AS host_waits
FROM sbx_modules m
JOIN sbx_apps a ON a.id = m.app_id
LEFT JOIN LATERAL (
    SELECT count(*) AS live,
           COALESCE(jsonb_agg(jsonb_build_object('host', s.host, 'seq', s.seq, 'waiting', s.waiting)
                              ORDER BY s.host, s.seq) FILTER (WHERE s.waiting IS NOT NULL), '[]'::jsonb) AS waiting
    FROM sbx_slots s
    WHERE s.module_id = m.id AND s.status IN ('STARTING', 'READY', 'RUNNING')
      AND s.heartbeat_at > now() - make_interval(secs => 2 * s.heartbeat_seconds)
) l ON true
WHERE m.app_id = %(app_id)s
ORDER BY m.seq;

-- name: app_exists
-- Under the caller's row security; a launcher role: the apps of the owner it acts for.
SELECT 1 AS one WHERE sbx_l_app_exists_v1(%(app_id)s::bigint);

-- name: newest_app
-- The default --app: the caller's newest app (NULL when they have none): never someone else's
-- (a launcher role: the newest app of the owner it acts for).
SELECT sbx_l_newest_app_v1() AS id;

-- name: own_running_apps
-- `scalebox autoscale` without --app: the caller's RUNNING apps only (audit F6).
SELECT id FROM sbx_apps WHERE owner = current_user AND status = 'RUNNING' ORDER BY id;

-- name: launch_settings
SELECT stage_python, stage_work_root, owner, mine FROM sbx_l_launch_settings_v1(%(app_id)s::bigint);

-- name: save_launch_settings
-- The first submission's settings; a later one never changes them (the same row lock as the
-- autoscale pass: two first submissions at once keep one).
SELECT sbx_l_save_launch_settings_v1(%(app_id)s::bigint, %(python)s::text, %(work_root)s::text);

-- name: app_status
SELECT status FROM sbx_apps WHERE id = %(app_id)s;

-- ---------------------------------------------------------------------------------------------
-- `scalebox report` (issue 18): everything aggregated here, so a report of 1M tasks reads a few
-- thousand rows. Times are epoch seconds (double precision); the time axis is `buckets`
-- buckets of `width` seconds from `t0` (from report_app), a bucket being
-- least(buckets - 1, floor((ts - t0) / width)).

-- name: report_app
-- The app, the database's now, and the span its tasks cover: from the app's creation to its
-- last task's end (a finished app: a task's last execution ends with it), or to now (an app still running: the report is a snapshot).
SELECT a.id, a.name, a.label, a.status, a.result, a.cancelled,
       extract(epoch FROM a.created_at)::double precision AS created_at,
       extract(epoch FROM a.finished_at)::double precision AS finished_at,
       extract(epoch FROM now())::double precision AS now,
       extract(epoch FROM least(a.created_at, s.first_created))::double precision AS t0,
       extract(epoch FROM CASE WHEN a.status = 'FINISHED' AND NOT s.active
                               THEN greatest(a.finished_at, s.last_finished)
                               ELSE now() END)::double precision AS t1
FROM sbx_apps a
CROSS JOIN LATERAL (
    SELECT min(t.created_at) AS first_created, max(t.finished_at) AS last_finished,
           bool_or(t.status IN (-1, -3)) IS TRUE AS active
    FROM sbx_tasks t WHERE t.app_id = a.id
) s
WHERE a.id = %(app_id)s;

-- name: report_module_totals
-- Tasks per module and status (every module, also those without tasks). Here and below the
-- rows are counted per module id first and named after (a hash aggregate of a few groups, not
-- a sort of every row by name).
SELECT m.name AS module, m.seq, c.status, COALESCE(c.n, 0) AS n
FROM sbx_modules m
LEFT JOIN (SELECT t.module_id, t.status, count(*) AS n
           FROM sbx_tasks t WHERE t.app_id = %(app_id)s
           GROUP BY t.module_id, t.status) c ON c.module_id = m.id
WHERE m.app_id = %(app_id)s
ORDER BY m.seq, c.status;

-- name: report_throughput
-- Tasks reaching a final status (OK or failed) per module and time bucket.
SELECT m.name AS module, c.bucket, c.n, c.failed
FROM (SELECT t.module_id, b.bucket, count(*) AS n, count(*) FILTER (WHERE t.status <> 0) AS failed
      FROM sbx_tasks t
      CROSS JOIN LATERAL (SELECT least(%(buckets)s - 1, greatest(0, floor(
          (extract(epoch FROM t.finished_at) - %(t0)s) / %(width)s)))::integer AS bucket) b
      WHERE t.app_id = %(app_id)s AND t.finished_at IS NOT NULL AND (t.status >= 0 OR t.status < -100)
      GROUP BY t.module_id, b.bucket) c
JOIN sbx_modules m ON m.id = c.module_id
ORDER BY m.name, c.bucket;

-- name: report_queue_depth
-- READY tasks per module at the end of each time bucket, rebuilt from the timestamps: a task
-- enters the queue when created (+1), leaves it when an execution starts (-1), comes back when
-- that execution was followed by another attempt or the task is READY again (+1 at its end),
-- and a RUNNING task's current attempt, which has no execution record yet, left at started_at.
-- INITIAL tasks count from their creation (their activation time is not recorded). The running
-- sum of the deltas per module is the depth; at the last bucket it equals today's READY count.
WITH ev AS (
    SELECT t.module_id, t.created_at AS at, 1 AS d
    FROM sbx_tasks t WHERE t.app_id = %(app_id)s
    UNION ALL
    SELECT t.module_id, v.at, v.d
    FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id
    CROSS JOIN LATERAL (VALUES (e.started_at, -1),
                               (CASE WHEN e.attempt < t.attempts OR t.status = -1 THEN e.finished_at END, 1)) v (at, d)
    WHERE t.app_id = %(app_id)s AND v.at IS NOT NULL
    UNION ALL
    SELECT t.module_id, t.started_at, -1
    FROM sbx_tasks t
    WHERE t.app_id = %(app_id)s AND t.status = -3 AND t.started_at IS NOT NULL
), per_bucket AS (
    SELECT ev.module_id,
           least(%(buckets)s - 1, greatest(0, floor((extract(epoch FROM ev.at) - %(t0)s) / %(width)s)))::integer
               AS bucket,
           sum(ev.d) AS d
    FROM ev
    GROUP BY 1, 2
)
SELECT m.name AS module, p.bucket,
       sum(p.d) OVER (PARTITION BY p.module_id ORDER BY p.bucket)::bigint AS depth
FROM per_bucket p JOIN sbx_modules m ON m.id = p.module_id
ORDER BY m.name, p.bucket;

-- name: report_durations
-- Execution durations per module (every attempt) in logarithmic bins, 21 a decade: bin k holds
-- durations in [10^(k/21), 10^((k+1)/21)) seconds (everything under 1 ms in bin -63), with the
-- bin's count, total and longest. One hash aggregate over the executions, no sort: counts,
-- means, maxima and slot-hours are exact, percentiles are read off the bins (within a bin: about 11 per cent).
SELECT m.name AS module, c.bin, c.n, c.seconds, c.longest
FROM (SELECT t.module_id, b.bin, count(*) AS n, sum(d.s) AS seconds, max(d.s) AS longest
      FROM sbx_task_execs e
      JOIN sbx_tasks t ON t.id = e.task_id
      CROSS JOIN LATERAL (SELECT greatest(0, extract(epoch FROM e.finished_at - e.started_at))::double precision
                                 AS s) d
      CROSS JOIN LATERAL (SELECT floor(21 * log(greatest(0.001::double precision, d.s)) + 1e-9)::integer AS bin) b
      WHERE t.app_id = %(app_id)s
      GROUP BY t.module_id, b.bin) c
JOIN sbx_modules m ON m.id = c.module_id
ORDER BY m.name, c.bin;

-- name: report_timeline
-- The timeline's bars: every `stride`-th execution (by id: spread evenly over time, hosts and
-- slots), at most `limit`, and at most `running_limit` tasks running now (to now); lane = host
-- and slot.
(SELECT m.name AS module, COALESCE(e.host, s.host, '?') AS host, s.seq AS slot_seq, e.slot_id,
        e.status, extract(epoch FROM e.started_at)::double precision AS started_at,
        extract(epoch FROM e.finished_at)::double precision AS finished_at, e.task_id
 FROM sbx_task_execs e
 JOIN sbx_tasks t ON t.id = e.task_id
 JOIN sbx_modules m ON m.id = t.module_id
 LEFT JOIN sbx_slots s ON s.id = e.slot_id
 WHERE t.app_id = %(app_id)s AND e.id %% %(stride)s = 0
 ORDER BY e.id
 LIMIT %(limit)s)
UNION ALL
(SELECT m.name, COALESCE(t.host, '?'), s.seq, t.slot_id, t.status,
        extract(epoch FROM t.started_at)::double precision, extract(epoch FROM now())::double precision, t.id
 FROM sbx_tasks t
 JOIN sbx_modules m ON m.id = t.module_id
 LEFT JOIN sbx_slots s ON s.id = t.slot_id
 WHERE t.app_id = %(app_id)s AND t.status = -3 AND t.started_at IS NOT NULL
 ORDER BY t.id
 LIMIT %(running_limit)s);

-- name: report_failures
-- Failed tasks (final status) and failed executions (every attempt) per module and status.
SELECT m.name AS module, x.status, sum(x.tasks)::bigint AS tasks, sum(x.execs)::bigint AS execs
FROM (
    SELECT t.module_id, t.status, count(*) AS tasks, 0 AS execs
    FROM sbx_tasks t
    WHERE t.app_id = %(app_id)s AND (t.status > 0 OR t.status < -100)
    GROUP BY t.module_id, t.status
    UNION ALL
    SELECT t.module_id, e.status, 0, count(*)
    FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id
    WHERE t.app_id = %(app_id)s AND e.status <> 0
    GROUP BY t.module_id, e.status
) x JOIN sbx_modules m ON m.id = x.module_id
GROUP BY m.name, x.status
ORDER BY m.name, x.status;

-- name: report_top_stderr
-- The most frequent last stderr lines of failed executions (of the last 1 KiB, cut to 300
-- characters), per module and status, with an example task.
SELECT m.name AS module, c.status, c.line, c.n, c.example_task
FROM (SELECT t.module_id, e.status, l.line, count(*) AS n, min(e.task_id) AS example_task
      FROM sbx_task_execs e
      JOIN sbx_tasks t ON t.id = e.task_id
      CROSS JOIN LATERAL (SELECT left(COALESCE(substring(rtrim(right(e.stderr, 1024), E' \t\r\n')
                                                         FROM '[^\n]*$'), ''), 300) AS line) l
      WHERE t.app_id = %(app_id)s AND e.status <> 0
      GROUP BY t.module_id, e.status, l.line) c
JOIN sbx_modules m ON m.id = c.module_id
ORDER BY c.n DESC, m.name, c.status, c.line
LIMIT %(limit)s;

-- name: report_retries
-- Per module: tasks that needed more than one attempt, the attempts beyond the first, the
-- stalls (executions recorded 123 by lease recovery: their slot died) and the slots LOST.
WITH t AS (
    SELECT t.module_id, count(*) AS retried_tasks, sum(t.attempts - 1) AS extra_attempts
    FROM sbx_tasks t WHERE t.app_id = %(app_id)s AND t.attempts > 1
    GROUP BY t.module_id
), st AS (
    SELECT t.module_id, count(*) AS stalls
    FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id
    WHERE t.app_id = %(app_id)s AND e.status = 123
    GROUP BY t.module_id
), lost AS (
    SELECT s.module_id, count(*) AS lost_slots FROM sbx_slots s
    JOIN sbx_modules m ON m.id = s.module_id
    WHERE m.app_id = %(app_id)s AND s.status = 'LOST'
    GROUP BY s.module_id
)
SELECT m.name AS module, COALESCE(t.retried_tasks, 0) AS retried_tasks,
       COALESCE(t.extra_attempts, 0)::bigint AS extra_attempts, COALESCE(st.stalls, 0) AS stalls,
       COALESCE(lost.lost_slots, 0) AS lost_slots
FROM sbx_modules m
LEFT JOIN t ON t.module_id = m.id
LEFT JOIN st ON st.module_id = m.id
LEFT JOIN lost ON lost.module_id = m.id
WHERE m.app_id = %(app_id)s
ORDER BY m.seq;

-- name: report_stalls_by_host
-- Where the stalls happened: executions recorded 123 per host.
SELECT COALESCE(e.host, '?') AS host, count(*) AS n
FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id
WHERE t.app_id = %(app_id)s AND e.status = 123
GROUP BY 1
ORDER BY 2 DESC, 1
LIMIT 50;

-- name: report_locality
-- Per module, the tasks that ran (a host claimed them): with a preferred host (their inputs'
-- holder, or their HOST-BOUND host) that ran there or elsewhere; naming inputs that no live
-- host held when they were queued; naming no inputs. And the bytes the executions read and
-- wrote (task-exec input_bytes / output_bytes), the input bytes split by whether the execution
-- ran on the task's preferred host.
WITH t AS (
    SELECT t.module_id,
           count(*) FILTER (WHERE t.pref_host IS NOT NULL AND t.host = t.pref_host) AS local,
           count(*) FILTER (WHERE t.pref_host IS NOT NULL AND t.host <> t.pref_host) AS remote,
           count(*) FILTER (WHERE t.pref_host IS NULL AND n.names) AS no_holder,
           count(*) FILTER (WHERE t.pref_host IS NULL AND NOT n.names) AS no_inputs
    FROM sbx_tasks t
    JOIN sbx_modules m ON m.id = t.module_id
    CROSS JOIN LATERAL (SELECT jsonb_typeof(t.headers -> 'inputs') IS NOT DISTINCT FROM 'array'
                               OR m.input_regex IS NOT NULL AS names) n
    WHERE t.app_id = %(app_id)s AND t.host IS NOT NULL
    GROUP BY t.module_id
), b AS (
    SELECT t.module_id,
           sum(e.input_bytes) FILTER (WHERE t.pref_host IS NOT NULL AND e.host = t.pref_host) AS input_bytes_local,
           sum(e.input_bytes) FILTER (WHERE t.pref_host IS NULL OR e.host IS DISTINCT FROM t.pref_host)
               AS input_bytes_other,
           sum(e.output_bytes) AS output_bytes
    FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id
    WHERE t.app_id = %(app_id)s
    GROUP BY t.module_id
)
SELECT m.name AS module, COALESCE(t.local, 0) AS local, COALESCE(t.remote, 0) AS remote,
       COALESCE(t.no_holder, 0) AS no_holder, COALESCE(t.no_inputs, 0) AS no_inputs,
       COALESCE(b.input_bytes_local, 0)::bigint AS input_bytes_local,
       COALESCE(b.input_bytes_other, 0)::bigint AS input_bytes_other,
       COALESCE(b.output_bytes, 0)::bigint AS output_bytes
FROM sbx_modules m
LEFT JOIN t ON t.module_id = m.id
LEFT JOIN b ON b.module_id = m.id
WHERE m.app_id = %(app_id)s
ORDER BY m.seq;

-- name: report_stage_jobs
-- The app's Slurm stage jobs (at most `limit`, oldest first), from submission to end (or now).
SELECT m.name AS module, j.slurm_job_id, j.cluster, j.state, j.nodes, j.draining, j.exit_code,
       extract(epoch FROM j.submitted_at)::double precision AS submitted_at,
       extract(epoch FROM j.ended_at)::double precision AS ended_at
FROM sbx_stage_jobs j JOIN sbx_modules m ON m.id = j.module_id
WHERE j.app_id = %(app_id)s
ORDER BY j.id
LIMIT %(limit)s;

-- name: report_stage_job_states
SELECT m.name AS module, j.state, count(*) AS n
FROM sbx_stage_jobs j JOIN sbx_modules m ON m.id = j.module_id
WHERE j.app_id = %(app_id)s
GROUP BY m.name, j.state
ORDER BY m.name, j.state;

-- name: report_exec_columns
-- The columns sbx_task_execs has here: CPU accounting (core-hours) is reported only where the
-- schema records it.
SELECT column_name FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = 'sbx_task_execs';

-- name: report_core_hours
-- Core-hours per module from the executions' CPU time (user + system, migration 0014; NULL
-- where a runtime cannot measure it: see sbx_usage). Run when report_exec_columns lists the
-- columns of scalebox_hpc.report.data.CPU_COLUMNS (a database before 0014 has none).
SELECT m.name AS module, sum(COALESCE(e.cpu_user_s, 0) + COALESCE(e.cpu_system_s, 0)) / 3600.0
           AS core_hours,
       count(*) FILTER (WHERE e.cpu_user_s IS NOT NULL) AS measured
FROM sbx_task_execs e
JOIN sbx_tasks t ON t.id = e.task_id
JOIN sbx_modules m ON m.id = t.module_id
WHERE t.app_id = %(app_id)s
GROUP BY m.name
ORDER BY m.name;

-- ---------------------------------------------------------------------------------------------
-- `scalebox metrics` (issue 18): Prometheus text exposition, for node_exporter's textfile
-- collector. Counters come from rows that are never deleted (tasks, executions), so they only
-- grow while the app exists.

-- name: metrics_apps
-- The apps to export: the one asked for, else those not FINISHED plus those finished within
-- the last `recent_seconds` seconds (so a scrape still sees their final counts).
SELECT a.id, a.name, a.status
FROM sbx_apps a
WHERE CASE WHEN %(app_id)s::bigint IS NOT NULL THEN a.id = %(app_id)s::bigint
           ELSE a.status <> 'FINISHED'
                OR a.finished_at > now() - make_interval(secs => %(recent_seconds)s::double precision) END
ORDER BY a.id;

-- name: metrics_tasks
-- Tasks per app, module and status (sbx_tasks_app_status_idx), every module also without tasks;
-- finished within the last minute too (a recent rate), and the oldest READY task's age
-- (min id of the READY partial index: one probe per module).
SELECT m.app_id, m.name AS module, t.status, count(t.id) AS n,
       count(t.id) FILTER (WHERE t.finished_at > now() - interval '60 seconds') AS last_minute,
       (SELECT extract(epoch FROM now() - r.created_at)::double precision
        FROM sbx_tasks r WHERE r.module_id = m.id AND r.status = -1 ORDER BY r.id LIMIT 1) AS oldest_ready_age
FROM sbx_modules m
LEFT JOIN sbx_tasks t ON t.module_id = m.id AND t.app_id = m.app_id
WHERE m.app_id = ANY (%(app_ids)s::bigint[])
GROUP BY m.app_id, m.id, m.name, t.status
ORDER BY m.app_id, m.name, t.status;

-- name: metrics_execs
-- Executions per app, module and status (every attempt), and the seconds they ran.
SELECT t.app_id, m.name AS module, e.status, count(*) AS n,
       sum(greatest(0, extract(epoch FROM e.finished_at - e.started_at)))::double precision AS seconds
FROM sbx_task_execs e
JOIN sbx_tasks t ON t.id = e.task_id
JOIN sbx_modules m ON m.id = t.module_id
WHERE t.app_id = ANY (%(app_ids)s::bigint[])
GROUP BY t.app_id, m.name, e.status
ORDER BY t.app_id, m.name, e.status;

-- name: metrics_slots
-- Slots per app, module, host and status; live: not ended and heard from within two of its
-- own heartbeats (as list_slots).
SELECT m.app_id, m.name AS module, s.host, s.status, count(*) AS n,
       count(*) FILTER (WHERE s.status IN ('STARTING', 'READY', 'RUNNING')
                          AND s.heartbeat_at > now() - make_interval(secs => 2 * s.heartbeat_seconds)) AS live
FROM sbx_slots s JOIN sbx_modules m ON m.id = s.module_id
WHERE m.app_id = ANY (%(app_ids)s::bigint[])
GROUP BY m.app_id, m.name, s.host, s.status
ORDER BY m.app_id, m.name, s.host, s.status;

-- name: metrics_stage_jobs
-- Stage jobs per app, module and Slurm state (as last seen).
SELECT j.app_id, m.name AS module, j.state, count(*) AS n
FROM sbx_stage_jobs j JOIN sbx_modules m ON m.id = j.module_id
WHERE j.app_id = ANY (%(app_ids)s::bigint[])
GROUP BY j.app_id, m.name, j.state
ORDER BY j.app_id, m.name, j.state;
-- name: stage_job_started
-- A stage job's first node's launcher starts: the job's allocated CPUs and the start of its
-- core-hours (kept from the first start: a launcher of the job started again does not reset it).
SELECT id FROM sbx_l_stage_job_started_v1(%(cluster)s::text, %(slurm_job_id)s::text, %(alloc_cpus)s::integer) AS id;

-- name: stage_job_finished
-- The first node's launcher leaves (drain, idle end, walltime): the end of the job's core-hours
-- so far (the last call wins; a kill leaves ended_at, the autoscaler's, to the sbx_usage view).
SELECT id FROM sbx_l_stage_job_finished_v1(%(cluster)s::text, %(slurm_job_id)s::text) AS id;

-- name: app_usage
-- Resources per module of an app (the sbx_usage view), in module order.
SELECT u.* FROM sbx_usage u JOIN sbx_modules m ON m.id = u.module_id
WHERE u.app_id = %(app_id)s
ORDER BY m.seq, m.id;

-- name: slurm_calls_summary
-- The Slurm commands counted per cluster (autoscale passes, `stage stop --now`): in the last
-- minute (the budget spent), in the last hour (what sbx_slurm_calls keeps), and this app's share.
SELECT cluster,
       COALESCE(sum(calls) FILTER (WHERE at > now() - interval '60 seconds'), 0)::bigint AS last_minute,
       sum(calls)::bigint AS last_hour,
       COALESCE(sum(calls) FILTER (WHERE app_id = %(app_id)s), 0)::bigint AS app_last_hour,
       count(*) AS records
FROM sbx_slurm_calls
WHERE at > now() - interval '1 hour'
GROUP BY cluster
ORDER BY cluster;

-- ---------------------------------------------------------------------------------------------
-- The launcher's own calls (migration 0018): SECURITY DEFINER functions acting for the owner the
-- connected role launches for; the launcher role has no table privileges.

-- name: claim
-- claim_tasks (read it there) through sbx_l_claim_v1: only a module of an app the caller acts on,
-- only slots of that module.
SELECT id, app_id, module_id, body, headers, status, attempts, retry_base, claimed_by, r
FROM sbx_l_claim_v1(%(app_id)s::bigint, %(module_id)s::bigint, %(host)s::text, %(slot_ids)s::bigint[],
                    %(slot_seqs)s::integer[], %(wants)s::integer[], %(limit)s::integer,
                    %(lease_seconds)s::double precision);

-- name: launcher_modules
SELECT id, app_id, name, seq, sink_modules, conflict_action, spec FROM sbx_l_modules_v1(%(app_id)s::bigint);

-- name: launcher_app
SELECT uid, status, cancelled FROM sbx_l_app_v1(%(app_id)s::bigint);

-- name: index_scratch
-- Files gone from (removed) and now in (keys, bytes) a host's scratch; replace: the start-up
-- scan, the truth for this host (its old entries go first).
SELECT sbx_l_index_scratch_v1(%(host)s::text, %(replace)s::boolean, %(removed)s::text[], %(keys)s::text[],
                              %(bytes)s::bigint[]);

-- name: launcher_semaphore_create
SELECT sbx_l_semaphore_create_v1(%(app_id)s::bigint, %(name)s::text, %(value)s::bigint) AS value;

-- name: launcher_semaphore_get
SELECT value FROM sbx_l_semaphore_get_v1(%(app_id)s::bigint, %(name)s::text);

-- name: launcher_semaphore_add
-- Atomic increment/decrement (row lock); returns the new value (no row: no such semaphore).
SELECT value FROM sbx_l_semaphore_add_v1(%(app_id)s::bigint, %(name)s::text, %(delta)s::bigint);

-- name: launcher_semaphore_list
SELECT name, value FROM sbx_l_semaphore_list_v1(%(app_id)s::bigint);

-- name: launcher_variable_set
SELECT sbx_l_variable_set_v1(%(app_id)s::bigint, %(name)s::text, %(value)s::text);

-- name: launcher_variable_get
SELECT value FROM sbx_l_variable_get_v1(%(app_id)s::bigint, %(name)s::text);

-- name: launcher_variable_list
SELECT name, value FROM sbx_l_variable_list_v1(%(app_id)s::bigint);

-- name: launcher_insert_messages
-- A running task's `tasks.deliver` (rows as sbx_insert_messages_v1 takes them).
SELECT sbx_l_insert_messages_v1(%(app_id)s::bigint, %(from_task_id)s::bigint, %(rows)s::jsonb) AS written;

-- name: grant_launcher
-- `scalebox db grant OWNER --launcher`: make (or bind) the launcher role; '' when done, else why not.
SELECT sbx_grant_launcher_v1(%(owner)s::text, %(role)s::text) AS missing;

-- Cross-database messages (0017): remote sinks, the outbox and its relay (scalebox_hpc/db/outbox.py).

-- name: insert_remote_sink
INSERT INTO sbx_remote_sinks (app_id, name, remote, remote_app_id)
VALUES (%(app_id)s, %(name)s, %(remote)s, %(remote_app_id)s);

-- name: list_remote_sinks
-- Through the launcher's function (0019): a launcher role routes to them too.
SELECT name, remote, remote_app_id FROM sbx_l_remote_sinks_v1(%(app_id)s::bigint);

-- name: outbox_remotes
-- The remotes with pending rows (of one app, or every app the caller acts on), and whether one
-- is due (its backoff over); through the launcher's function (0019).
SELECT remote, due FROM sbx_l_outbox_remotes_v1(%(app_id)s::bigint);

-- name: outbox_lock
-- One deliverer per remote at a time (transaction-scoped; a second relay skips this remote).
SELECT pg_try_advisory_xact_lock(hashtextextended('sbx_outbox:' || %(remote)s, 0)) AS locked;

-- name: outbox_pending
-- The oldest pending rows for a remote, in order, with the sender app's uid (the key's source).
SELECT id, app_id, remote_app_id, kind, module, body, headers, source
FROM sbx_l_outbox_pending_v1(%(remote)s::text, %(limit)s::integer);

-- name: outbox_delivered
SELECT sbx_l_outbox_delivered_v1(%(ids)s::bigint[]);

-- name: outbox_failed
-- A delivery to this remote failed: its pending rows wait (exponential backoff, at most 5 minutes).
SELECT sbx_l_outbox_failed_v1(%(remote)s::text, %(error)s::text);

-- name: outbox_low_water
-- The sender apps' lowest pending outbox ids (keys below them are never needed again, 0023).
SELECT source, below FROM sbx_l_outbox_low_water_v1(%(app_ids)s::bigint[]);

-- name: outbox_forget
-- In the receiver's database, in the delivery's transaction: a sender's keys it will never need
-- again (row security limits it to the relaying role's apps there).
DELETE FROM sbx_inbox WHERE source = %(source)s::uuid AND outbox_id < %(below)s::bigint;

-- name: outbox_receive
SELECT sbx_receive_v1(%(rows)s::jsonb) AS received;

-- name: outbox_receive_finish
SELECT sbx_receive_finish_v1(%(source)s::uuid, %(outbox_id)s::bigint, %(app_id)s::bigint, %(result)s) AS outcome;

-- name: outbox_depth
-- Pending rows per app and remote: how many, the oldest's age (seconds), the last error.
SELECT o.app_id, o.remote, o.remote_app_id, count(*) AS depth,
       extract(epoch FROM now() - min(o.created_at))::double precision AS oldest_seconds,
       (array_agg(o.last_error ORDER BY o.id) FILTER (WHERE o.last_error IS NOT NULL))[1] AS last_error
FROM sbx_outbox o
WHERE o.delivered_at IS NULL AND (%(app_id)s::bigint IS NULL OR o.app_id = %(app_id)s)
GROUP BY o.app_id, o.remote, o.remote_app_id
ORDER BY o.app_id, o.remote, o.remote_app_id;

-- name: next_app_id
-- The id the next app will get, without taking it (a peek: another app created meanwhile takes it).
SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END AS next_id FROM sbx_apps_id_seq;

-- name: server_now
-- The server's clock (a launcher's clock offset, the doctor's probe).
SELECT now() AS now;

-- name: server_info
-- The server's clock and version (the doctor's database check).
SELECT now() AS now, current_setting('server_version') AS version;

-- name: server_epoch
-- The server's clock as epoch seconds (the metrics' scrape time).
SELECT extract(epoch FROM now())::double precision AS now;

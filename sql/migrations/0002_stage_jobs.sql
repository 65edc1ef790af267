-- Slurm stage jobs: which jobs run (or ran) each module, and the module's scaling bounds.

-- `scalebox stage scale` overrides of the pipeline's slurm.min_jobs / max_jobs, and when the
-- module was last scaled (the autoscaler's rate limit)
ALTER TABLE sbx_modules
    ADD COLUMN min_jobs integer,
    ADD COLUMN max_jobs integer,
    ADD COLUMN scaled_at timestamptz;

CREATE TABLE sbx_stage_jobs (
    id bigserial PRIMARY KEY,
    app_id bigint NOT NULL REFERENCES sbx_apps (id) ON DELETE CASCADE,
    module_id bigint NOT NULL REFERENCES sbx_modules (id) ON DELETE CASCADE,
    slurm_job_id text NOT NULL,
    cluster text NOT NULL DEFAULT '',
    -- the Slurm state as last seen (PENDING, RUNNING, COMPLETED, TIMEOUT, ...)
    state text NOT NULL DEFAULT 'PENDING',
    -- its launchers drain (walltime signal, `stage stop`): it no longer counts as capacity
    draining boolean NOT NULL DEFAULT false,
    nodes text NOT NULL DEFAULT '',
    exit_code integer,
    reason text NOT NULL DEFAULT '',
    submitted_by text NOT NULL DEFAULT current_user,
    submitted_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz,
    UNIQUE (cluster, slurm_job_id)
);

CREATE INDEX sbx_stage_jobs_active_idx ON sbx_stage_jobs (module_id) WHERE ended_at IS NULL;

-- A Slurm RPC budget per cluster, not per job (issue 20).
-- 1. One autoscale pass per app per interval, whichever of its stage jobs (or CLI calls) comes
--    first: elected under the app's advisory lock by this timestamp of the last pass.
ALTER TABLE sbx_apps ADD COLUMN autoscaled_at timestamptz;

-- 2. The Slurm commands each autoscale pass ran, per cluster (an app's `cluster`, '' when
--    unnamed): the calls of the last minute are the budget spent (SCALEBOX_SLURM_RPC_PER_MINUTE)
--    and what `scalebox status` shows. Rows older than an hour are pruned as new ones come.
CREATE TABLE sbx_slurm_calls (
    id bigserial PRIMARY KEY,
    cluster text NOT NULL DEFAULT '',
    app_id bigint REFERENCES sbx_apps (id) ON DELETE SET NULL,
    at timestamptz NOT NULL DEFAULT now(),
    calls integer NOT NULL CHECK (calls >= 0)
);

CREATE INDEX sbx_slurm_calls_cluster_at_idx ON sbx_slurm_calls (cluster, at);

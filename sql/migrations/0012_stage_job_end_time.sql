-- 0012: a stage job's end time (Slurm's EndTime while it runs), stored by the app's elected
-- autoscale pass from its one squeue, so the job's launchers learn their walltime from the
-- database instead of each asking scontrol at start (Slurm RPCs that grew with the jobs).
ALTER TABLE sbx_stage_jobs ADD COLUMN end_time timestamptz;

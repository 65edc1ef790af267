-- 0014: core-hours and resources per task (issue 17). Each execution records what its process
-- tree used (CPU seconds user / system, the largest process's peak RSS; NULL where it cannot be
-- measured); each stage job records its allocated CPUs and when its first node's launcher
-- started and ended; the view sbx_usage sums them per app and module.
--
-- The hand-off functions keep their names and arguments: the execution travels as jsonb, whose
-- extra keys the previous bodies ignored, so a launcher that sends no usage records NULLs.

ALTER TABLE sbx_task_execs
    ADD COLUMN cpu_user_s double precision,
    ADD COLUMN cpu_system_s double precision,
    ADD COLUMN max_rss_kb bigint;

ALTER TABLE sbx_stage_jobs
    ADD COLUMN alloc_cpus integer,
    ADD COLUMN started_at timestamptz,
    ADD COLUMN finished_at timestamptz;

CREATE OR REPLACE FUNCTION sbx_complete_task_v2(
    p_task_id bigint, p_slot_id bigint, p_attempt integer, p_status integer, p_requeue boolean,
    p_exec jsonb, p_messages jsonb, p_finish_text text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t sbx_tasks;
    written integer := 0;
BEGIN
    IF p_requeue THEN
        UPDATE sbx_tasks
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            started_at = NULL, finished_at = NULL
        WHERE id = p_task_id AND slot_id = p_slot_id AND status = -3 AND attempts = p_attempt
        RETURNING * INTO t;
    ELSE
        UPDATE sbx_tasks
        SET status = p_status, finished_at = now(), lease_expires_at = NULL, heartbeat_at = now()
        WHERE id = p_task_id AND slot_id = p_slot_id AND status = -3 AND attempts = p_attempt
        RETURNING * INTO t;
    END IF;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO sbx_task_execs
        (task_id, attempt, slot_id, host, status, started_at, finished_at, stdout, stderr,
         input_bytes, output_bytes, input_files, output_files, user_text, timestamps,
         cpu_user_s, cpu_system_s, max_rss_kb)
    SELECT p_task_id, t.attempts, p_slot_id, e.host, p_status, e.started_at, e.finished_at,
           COALESCE(e.stdout, ''), COALESCE(e.stderr, ''), e.input_bytes, e.output_bytes,
           COALESCE(e.input_files, '[]'), COALESCE(e.output_files, '[]'), e.user_text,
           COALESCE(e.timestamps, '[]'), e.cpu_user_s, e.cpu_system_s, e.max_rss_kb
    FROM jsonb_to_record(p_exec) AS e (host text, started_at timestamptz, finished_at timestamptz,
                                       stdout text, stderr text, input_bytes bigint, output_bytes bigint,
                                       input_files jsonb, output_files jsonb, user_text text,
                                       timestamps jsonb, cpu_user_s double precision,
                                       cpu_system_s double precision, max_rss_kb bigint);
    IF jsonb_array_length(p_messages) > 0 THEN
        written := sbx_insert_messages_v1(t.app_id, p_task_id, p_messages);
    END IF;
    IF p_finish_text IS NOT NULL THEN
        UPDATE sbx_apps
        SET status = 'FINISHED', result = COALESCE(result, p_finish_text), updated_at = now(),
            finished_at = COALESCE(finished_at, now())
        WHERE id = t.app_id;
    END IF;
    RETURN written;
END;
$$;

CREATE OR REPLACE FUNCTION sbx_complete_tasks_v1(p_rows jsonb)
RETURNS TABLE (item integer, written integer)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    RETURN QUERY
    WITH c AS (
        -- one item per claim: of the same claim given twice the first (the task's lease holds
        -- one claim only, so items of other attempts or slots are fenced off by the UPDATE)
        SELECT DISTINCT ON (x.task_id, x.slot_id, x.attempt) x.*
        FROM jsonb_to_recordset(p_rows) AS x (ord integer, task_id bigint, slot_id bigint, attempt integer,
                                              status integer, requeue boolean, exec jsonb, messages jsonb,
                                              finish_text text)
        ORDER BY x.task_id, x.slot_id, x.attempt, x.ord
    ), silent AS (
        SELECT * FROM c WHERE jsonb_array_length(COALESCE(c.messages, '[]')) = 0
    ), done AS (
        UPDATE sbx_tasks t
        SET status = CASE WHEN s.requeue THEN -1 ELSE s.status END,
            slot_id = CASE WHEN s.requeue THEN NULL ELSE t.slot_id END,
            host = CASE WHEN s.requeue THEN NULL ELSE t.host END,
            heartbeat_at = CASE WHEN s.requeue THEN NULL ELSE now() END,
            started_at = CASE WHEN s.requeue THEN NULL ELSE t.started_at END,
            finished_at = CASE WHEN s.requeue THEN NULL ELSE now() END,
            lease_expires_at = NULL
        FROM silent s
        WHERE t.id = s.task_id AND t.slot_id = s.slot_id AND t.status = -3 AND t.attempts = s.attempt
        RETURNING s.ord, t.id, t.app_id, t.attempts, s.slot_id, s.status, s.exec, s.finish_text
    ), execs AS (
        INSERT INTO sbx_task_execs
            (task_id, attempt, slot_id, host, status, started_at, finished_at, stdout, stderr,
             input_bytes, output_bytes, input_files, output_files, user_text, timestamps,
         cpu_user_s, cpu_system_s, max_rss_kb)
        SELECT d.id, d.attempts, d.slot_id, e.host, d.status, e.started_at, e.finished_at,
               COALESCE(e.stdout, ''), COALESCE(e.stderr, ''), e.input_bytes, e.output_bytes,
               COALESCE(e.input_files, '[]'), COALESCE(e.output_files, '[]'), e.user_text,
               COALESCE(e.timestamps, '[]'), e.cpu_user_s, e.cpu_system_s, e.max_rss_kb
        FROM done d,
             jsonb_to_record(d.exec) AS e (host text, started_at timestamptz, finished_at timestamptz,
                                           stdout text, stderr text, input_bytes bigint, output_bytes bigint,
                                           input_files jsonb, output_files jsonb, user_text text,
                                           timestamps jsonb, cpu_user_s double precision,
                                           cpu_system_s double precision, max_rss_kb bigint)
        ORDER BY d.ord
    ), finished AS (
        -- the first finish text (in ord) is the app's result, as one by one
        UPDATE sbx_apps a
        SET status = 'FINISHED', result = COALESCE(a.result, f.finish_text), updated_at = now(),
            finished_at = COALESCE(a.finished_at, now())
        FROM (SELECT DISTINCT ON (d.app_id) d.app_id, d.finish_text
              FROM done d WHERE d.finish_text IS NOT NULL ORDER BY d.app_id, d.ord) f
        WHERE a.id = f.app_id
    )
    SELECT d.ord, 0 FROM done d;

    FOR r IN
        SELECT x.*
        FROM jsonb_to_recordset(p_rows) AS x (ord integer, task_id bigint, slot_id bigint, attempt integer,
                                              status integer, requeue boolean, exec jsonb, messages jsonb,
                                              finish_text text)
        WHERE jsonb_array_length(COALESCE(x.messages, '[]')) > 0
        ORDER BY x.ord
    LOOP
        item := r.ord;
        written := sbx_complete_task_v2(r.task_id, r.slot_id, r.attempt, r.status, r.requeue, r.exec,
                                        COALESCE(r.messages, '[]'), r.finish_text);
        IF written IS NOT NULL THEN
            RETURN NEXT;
        END IF;
    END LOOP;
END;
$$;

-- Resources per app and module, for `scalebox app show` and psql: tasks and executions, the CPU
-- the executions' process trees used (core-hours; only the executions that measured it count:
-- `measured`), their wall time, the core-hours the module's stage jobs held (allocated CPUs x
-- elapsed, a live job's up to now; NULL when no job recorded its allocation), the efficiency
-- used / allocated (NULL without allocation), and the largest peak RSS of one process (KiB).
-- LATERAL: a query of one app's rows reads that app's tasks and executions only (by index).
CREATE VIEW sbx_usage AS
SELECT m.app_id, m.id AS module_id, m.name AS module,
       t.tasks, e.executions, e.measured, e.cpu_core_hours, e.wall_hours, j.alloc_core_hours,
       CASE WHEN j.alloc_core_hours > 0 THEN COALESCE(e.cpu_core_hours, 0) / j.alloc_core_hours END AS efficiency,
       e.max_rss_kb
FROM sbx_modules m
CROSS JOIN LATERAL (SELECT count(*) AS tasks FROM sbx_tasks tk WHERE tk.module_id = m.id) t
CROSS JOIN LATERAL (
    SELECT count(*) AS executions, count(x.cpu_user_s) AS measured,
           sum(x.cpu_user_s + x.cpu_system_s) / 3600.0 AS cpu_core_hours,
           sum(extract(epoch FROM x.finished_at - x.started_at)) / 3600.0 AS wall_hours,
           max(x.max_rss_kb) AS max_rss_kb
    FROM sbx_tasks tk JOIN sbx_task_execs x ON x.task_id = tk.id
    WHERE tk.module_id = m.id) e
CROSS JOIN LATERAL (
    SELECT sum(s.alloc_cpus * extract(epoch FROM GREATEST(COALESCE(s.finished_at, s.ended_at, now()) - s.started_at,
                                                          interval '0'))) / 3600.0 AS alloc_core_hours
    FROM sbx_stage_jobs s
    WHERE s.module_id = m.id AND s.alloc_cpus IS NOT NULL AND s.started_at IS NOT NULL) j;

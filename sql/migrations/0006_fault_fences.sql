-- Fences against faults (audit 2026-12: F13, F27, the work-dir collision).
-- 1. Apps get a uid, unique across databases: ids restart at 1 in every database, and work
--    dirs named app-N alone were shared by the apps N of two databases (a wrong result).
ALTER TABLE sbx_apps ADD COLUMN uid uuid NOT NULL DEFAULT gen_random_uuid();

-- 2. A slot's liveness is judged by its own heartbeat interval, not by the caller's (a
--    launcher beating every second marked everyone else's slots LOST), nor by a fixed 60 s.
ALTER TABLE sbx_slots ADD COLUMN heartbeat_seconds double precision NOT NULL DEFAULT 10;

CREATE OR REPLACE FUNCTION sbx_host_live(h text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM sbx_slots s
                   WHERE s.host = h AND s.status IN ('STARTING', 'READY', 'RUNNING')
                     AND s.heartbeat_at > now() - make_interval(secs => 2 * s.heartbeat_seconds))
$$;

-- 3. A manual retry gives a fresh attempt budget without renumbering executions: the retry
--    rules count attempts - retry_base (before, a task retried by hand that stalled once went
--    straight to 123). OVERWRITE resets both.
ALTER TABLE sbx_tasks ADD COLUMN retry_base integer NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION sbx_insert_messages_v1(p_app_id bigint, p_from_task_id bigint, p_rows jsonb)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    written integer := 0;
    n integer;
BEGIN
    INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status, from_task_id)
    SELECT p_app_id, r.module_id, r.body, COALESCE(r.headers, '{}'), r.to_host, r.to_slot,
           COALESCE(r.status, -1), p_from_task_id
    FROM jsonb_to_recordset(p_rows) AS r (module_id bigint, body text, headers jsonb, to_host text,
                                          to_slot integer, status integer, action text)
    WHERE r.action = 'FAIL';
    GET DIAGNOSTICS n = ROW_COUNT;
    written := written + n;

    INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status, from_task_id)
    SELECT p_app_id, r.module_id, r.body, COALESCE(r.headers, '{}'), r.to_host, r.to_slot,
           COALESCE(r.status, -1), p_from_task_id
    FROM jsonb_to_recordset(p_rows) AS r (module_id bigint, body text, headers jsonb, to_host text,
                                          to_slot integer, status integer, action text)
    WHERE r.action = 'IGNORE'
    ON CONFLICT (module_id, body_sha) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    written := written + n;

    INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status, from_task_id)
    SELECT p_app_id, r.module_id, r.body, COALESCE(r.headers, '{}'), r.to_host, r.to_slot,
           COALESCE(r.status, -1), p_from_task_id
    FROM jsonb_to_recordset(p_rows) AS r (module_id bigint, body text, headers jsonb, to_host text,
                                          to_slot integer, status integer, action text)
    WHERE r.action = 'OVERWRITE'
    ON CONFLICT (module_id, body_sha) DO UPDATE
    SET headers = EXCLUDED.headers, to_host = EXCLUDED.to_host, to_slot = EXCLUDED.to_slot,
        pref_host = EXCLUDED.pref_host, pref_until = EXCLUDED.pref_until, pref_partial = EXCLUDED.pref_partial,
        status = EXCLUDED.status, attempts = 0, retry_base = 0, slot_id = NULL, host = NULL, heartbeat_at = NULL,
        lease_expires_at = NULL, started_at = NULL, finished_at = NULL,
        from_task_id = EXCLUDED.from_task_id, created_at = now()
    WHERE sbx_tasks.status <> -3;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN written + n;
END;
$$;

-- 4. The hand-off checks the attempt it was claimed as.
DROP FUNCTION sbx_complete_task_v1(bigint, bigint, integer, boolean, jsonb, jsonb, text);
CREATE FUNCTION sbx_complete_task_v2(
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
         input_bytes, output_bytes, input_files, output_files, user_text, timestamps)
    SELECT p_task_id, t.attempts, p_slot_id, e.host, p_status, e.started_at, e.finished_at,
           COALESCE(e.stdout, ''), COALESCE(e.stderr, ''), e.input_bytes, e.output_bytes,
           COALESCE(e.input_files, '[]'), COALESCE(e.output_files, '[]'), e.user_text,
           COALESCE(e.timestamps, '[]')
    FROM jsonb_to_record(p_exec) AS e (host text, started_at timestamptz, finished_at timestamptz,
                                       stdout text, stderr text, input_bytes bigint, output_bytes bigint,
                                       input_files jsonb, output_files jsonb, user_text text,
                                       timestamps jsonb);
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

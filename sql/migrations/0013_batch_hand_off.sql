-- 0013: the hand-off of a batch set-based (issue 13): sbx_complete_tasks_v1 records the tasks of a
-- batch that emit nothing in three statements whatever the batch size, instead of one
-- sbx_complete_task_v2 call (three statements) per task; the tasks that emit messages still go
-- through sbx_complete_task_v2, in order. sbx_complete_task_v2 stays: launchers of the previous
-- release call it during a rolling upgrade, and the new function calls it.

-- The hand-off of a batch in one call: p_rows is a JSON array of {ord, task_id, slot_id, attempt,
-- status, requeue, exec, messages, finish_text} (sbx_complete_task_v2's arguments per task).
-- Returns (item = ord, written) for each task recorded; a task whose lease was lost (not RUNNING,
-- another slot, or attempts moved on: the F27 fence) gets no row, or a NULL written, and nothing
-- of it is written. Each task's record stays one unit (status, execution, messages, app finish),
-- and the whole batch is one transaction. The tasks that emit nothing (most batches) are
-- recorded set-based, in three statements whatever the batch size; those that emit messages
-- go one by one through sbx_complete_task_v2 afterwards, in ord order, because their messages
-- may reset (OVERWRITE) or meet (IGNORE) other tasks' rows: the outcome is that of recording the
-- silent tasks first, then the others in order — one serial order of per-task hand-offs. A claim
-- given twice is recorded once (the first), as one by one the second would find its lease gone.
CREATE FUNCTION sbx_complete_tasks_v1(p_rows jsonb)
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
             input_bytes, output_bytes, input_files, output_files, user_text, timestamps)
        SELECT d.id, d.attempts, d.slot_id, e.host, d.status, e.started_at, e.finished_at,
               COALESCE(e.stdout, ''), COALESCE(e.stderr, ''), e.input_bytes, e.output_bytes,
               COALESCE(e.input_files, '[]'), COALESCE(e.output_files, '[]'), e.user_text,
               COALESCE(e.timestamps, '[]')
        FROM done d,
             jsonb_to_record(d.exec) AS e (host text, started_at timestamptz, finished_at timestamptz,
                                           stdout text, stderr text, input_bytes bigint, output_bytes bigint,
                                           input_files jsonb, output_files jsonb, user_text text,
                                           timestamps jsonb)
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

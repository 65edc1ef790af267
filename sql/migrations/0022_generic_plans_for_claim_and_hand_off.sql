-- 0022: the claim and the batch hand-off plan once per session, not once per call. Measured
-- (EXPLAIN ANALYZE, 2 slots, batches of 4..50): planning the claim statement took 1.2 ms of
-- the server's CPU, executing it 0.1..0.6 ms; PL/pgSQL kept planning it per call because
-- its custom plans (LIMIT known) always looked cheaper than the generic one. The statements'
-- plans do not depend on the values (every scan is the partial index of its CTE, ordered
-- and limited; the hand-off joins by primary key), so the generic plan is the one wanted.
-- The batch hand-off records the tasks that emit set-based too (but those writing to an
-- OVERWRITE module): the loop ran sbx_complete_task_v2 per emitting task (an UPDATE, an INSERT
-- of the execution and sbx_insert_messages_v1's four INSERTs each). Measured, batches of 20
-- tasks emitting one message each: 0.66-0.73 -> 0.26-0.41 ms of server CPU per task.
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

    -- the tasks that emit, but nothing to an OVERWRITE module (0022): the same, with their
    -- messages inserted by one statement per action, in (ord, position) order
    RETURN QUERY
    WITH c AS (
        SELECT DISTINCT ON (x.task_id, x.slot_id, x.attempt) x.*
        FROM jsonb_to_recordset(p_rows) AS x (ord integer, task_id bigint, slot_id bigint, attempt integer,
                                              status integer, requeue boolean, exec jsonb, messages jsonb,
                                              finish_text text)
        WHERE jsonb_array_length(COALESCE(x.messages, '[]')) > 0
          AND NOT jsonb_path_exists(x.messages, '$[*] ? (@.action == "OVERWRITE")')
        ORDER BY x.task_id, x.slot_id, x.attempt, x.ord
    ), done AS (
        UPDATE sbx_tasks t
        SET status = CASE WHEN s.requeue THEN -1 ELSE s.status END,
            slot_id = CASE WHEN s.requeue THEN NULL ELSE t.slot_id END,
            host = CASE WHEN s.requeue THEN NULL ELSE t.host END,
            heartbeat_at = CASE WHEN s.requeue THEN NULL ELSE now() END,
            started_at = CASE WHEN s.requeue THEN NULL ELSE t.started_at END,
            finished_at = CASE WHEN s.requeue THEN NULL ELSE now() END,
            lease_expires_at = NULL
        FROM c s
        WHERE t.id = s.task_id AND t.slot_id = s.slot_id AND t.status = -3 AND t.attempts = s.attempt
        RETURNING s.ord, t.id, t.app_id, t.attempts, s.slot_id, s.status, s.exec, s.finish_text, s.messages
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
    ), msgs AS (
        SELECT d.ord, d.id AS from_task_id, d.app_id, m.*
        FROM done d,
             ROWS FROM (jsonb_to_recordset(d.messages)
                        AS (module_id bigint, body text, headers jsonb, to_host text, to_slot integer,
                            status integer, action text, remote text, remote_app_id bigint, module text))
             WITH ORDINALITY AS m (module_id, body, headers, to_host, to_slot, status, action, remote,
                                   remote_app_id, module, k)
    ), outbox AS (
        INSERT INTO sbx_outbox (app_id, from_task_id, remote, remote_app_id, module, body, headers)
        SELECT m.app_id, m.from_task_id, m.remote, m.remote_app_id, m.module, m.body, COALESCE(m.headers, '{}')
        FROM msgs m WHERE m.action = 'REMOTE'
        ORDER BY m.ord, m.k
        RETURNING sbx_outbox.from_task_id
    ), failing AS (
        INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status, from_task_id)
        SELECT m.app_id, m.module_id, m.body, COALESCE(m.headers, '{}'), m.to_host, m.to_slot,
               COALESCE(m.status, -1), m.from_task_id
        FROM msgs m WHERE m.action = 'FAIL'
        ORDER BY m.ord, m.k
        RETURNING sbx_tasks.from_task_id
    ), ignoring AS (
        INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status, from_task_id)
        SELECT m.app_id, m.module_id, m.body, COALESCE(m.headers, '{}'), m.to_host, m.to_slot,
               COALESCE(m.status, -1), m.from_task_id
        FROM msgs m WHERE m.action = 'IGNORE'
        ORDER BY m.ord, m.k
        ON CONFLICT (module_id, body_sha) DO NOTHING
        RETURNING sbx_tasks.from_task_id
    ), wrote AS (
        SELECT w.from_task_id, count(*)::integer AS n
        FROM (SELECT o.from_task_id FROM outbox o UNION ALL SELECT f.from_task_id FROM failing f
              UNION ALL SELECT i.from_task_id FROM ignoring i) w
        GROUP BY w.from_task_id
    ), finished AS (
        UPDATE sbx_apps a
        SET status = 'FINISHED', result = COALESCE(a.result, f.finish_text), updated_at = now(),
            finished_at = COALESCE(a.finished_at, now())
        FROM (SELECT DISTINCT ON (d.app_id) d.app_id, d.finish_text
              FROM done d WHERE d.finish_text IS NOT NULL ORDER BY d.app_id, d.ord) f
        WHERE a.id = f.app_id
    )
    SELECT d.ord, COALESCE(w.n, 0) FROM done d LEFT JOIN wrote w ON w.from_task_id = d.id;

    FOR r IN
        SELECT x.*
        FROM jsonb_to_recordset(p_rows) AS x (ord integer, task_id bigint, slot_id bigint, attempt integer,
                                              status integer, requeue boolean, exec jsonb, messages jsonb,
                                              finish_text text)
        WHERE jsonb_path_exists(COALESCE(x.messages, '[]'), '$[*] ? (@.action == "OVERWRITE")')
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

-- (after the CREATE OR REPLACE above, which resets a function's settings)
ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, double precision)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION sbx_l_complete_tasks_v1(jsonb) SET plan_cache_mode = force_generic_plan;

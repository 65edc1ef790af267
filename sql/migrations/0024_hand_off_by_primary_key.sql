-- 0024: the hand-off looks a task up by primary key, however many tasks run. Its UPDATEs said
-- `status = -3`, which lets the planner drive them from the partial index of RUNNING tasks
-- (sbx_tasks_lease_idx); with the statistics of a quiet moment (ANALYZE: "one running task")
-- a generic plan (0022) did exactly that, and each item was matched against every running and
-- prefetched task: measured, 10,000 no-op handler tasks on 2 slots spent 3.7 s of server time in
-- sbx_complete_tasks_v1 (0.37 ms per task, growing with the number of running tasks, i.e. with
-- the fleet), and the one-task sbx_complete_task_v2 had the same plan. RUNNING is now a value
-- the planner does not see at plan time, so the primary key is the only index that fits.
-- The batch hand-off also records the silent and the emitting tasks in one statement (it had a
-- copy of the statement for each). And sbx_l_complete_tasks_v1 found each task's app by joining
-- sbx_tasks, which the generic plan did as a hash join over a sequential scan of the whole table
-- (2 ms per hand-off statement at 50,000 tasks, growing with the table): now one lookup by
-- primary key per item.

CREATE OR REPLACE FUNCTION sbx_complete_task_v2(
    p_task_id bigint, p_slot_id bigint, p_attempt integer, p_status integer, p_requeue boolean,
    p_exec jsonb, p_messages jsonb, p_finish_text text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t sbx_tasks;
    written integer := 0;
BEGIN
    -- RUNNING as a value the planner does not see (0024): see sbx_complete_tasks_v1
    IF p_requeue THEN
        UPDATE sbx_tasks
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            started_at = NULL, finished_at = NULL
        WHERE id = p_task_id AND slot_id = p_slot_id AND status = (SELECT -3) AND attempts = p_attempt
        RETURNING * INTO t;
    ELSE
        UPDATE sbx_tasks
        SET status = p_status, finished_at = now(), lease_expires_at = NULL, heartbeat_at = now()
        WHERE id = p_task_id AND slot_id = p_slot_id AND status = (SELECT -3) AND attempts = p_attempt
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
        WHERE NOT jsonb_path_exists(COALESCE(x.messages, '[]'), '$[*] ? (@.action == "OVERWRITE")')
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
        -- RUNNING is compared with a value the planner does not see (0024): a literal -3 lets
        -- it drive the join from the partial index of RUNNING tasks, which ANALYZE taken at a
        -- quiet moment says is one row, and then every item is matched against every running
        -- and prefetched task (0.37 ms of server CPU per task at 10,000 tasks on 2 slots; more
        -- the more slots). Looked up by primary key, an item costs the same however many run.
        WHERE t.id = s.task_id AND t.slot_id = s.slot_id AND t.attempts = s.attempt
          AND t.status = (SELECT -3)
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
        -- the first finish text (in ord) is the app's result, as one by one
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

CREATE OR REPLACE FUNCTION sbx_l_complete_tasks_v1(p_rows jsonb)
RETURNS TABLE (item integer, written integer)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    r record;
BEGIN
    -- each task's app looked up by primary key (0024: as a join, a generic plan hashed the
    -- whole of sbx_tasks once per hand-off statement; LIMIT 1 keeps the lookup per item)
    FOR r IN SELECT t.app_id, jsonb_agg(m.msg) FILTER (WHERE m.msg IS NOT NULL) AS messages
             FROM jsonb_to_recordset(p_rows) AS x (task_id bigint, messages jsonb)
             CROSS JOIN LATERAL (SELECT s.app_id FROM sbx_tasks s WHERE s.id = x.task_id LIMIT 1) t
             LEFT JOIN LATERAL jsonb_array_elements(COALESCE(x.messages, '[]')) AS m (msg) ON true
             GROUP BY t.app_id LOOP
        PERFORM sbx_l_may_v1(r.app_id);
        PERFORM sbx_l_check_targets_v1(r.app_id, r.messages);
    END LOOP;
    RETURN QUERY SELECT c.item, c.written FROM sbx_complete_tasks_v1(p_rows) AS c;
END;
$$;

-- (after the CREATE OR REPLACE above, which resets a function's settings)
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET plan_cache_mode = force_generic_plan;
-- (0024) and no hash or merge join in it: the generic plan guesses 100 items whatever the batch,
-- and below some 50,000 tasks it then hashed a sequential scan of sbx_tasks per statement; a
-- nested loop over the items looks each task up by primary key, at any table size
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_hashjoin = off;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_mergejoin = off;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_complete_tasks_v1(jsonb) SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END;
$$;
ALTER FUNCTION sbx_l_complete_tasks_v1(jsonb) SET plan_cache_mode = force_generic_plan;

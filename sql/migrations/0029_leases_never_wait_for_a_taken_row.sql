-- 0029: a node's heartbeat, release and batch hand-off never wait for a task row that another
-- transaction holds. Measured at 50 emulated nodes (PgBouncer, 2 cores): a node's heartbeat
-- statement waited 18 s for a row lock (pg_blocking_pids: another node's claim statement); the
-- row was one of its tasks whose lease had just expired, recovered and being claimed again. The
-- wait held the node's one session, more of its leases expired meanwhile, and one node lost
-- 4,351 tasks in 22 s (recovered, run again elsewhere). A task row someone else holds is no
-- longer the caller's: it is skipped (SKIP LOCKED), as it would be found after the wait.
-- (FOR NO KEY UPDATE: a foreign key check's KEY SHARE lock does not make a row skipped.)
-- And the heartbeat finds a slot's tasks by slot_id: it read every RUNNING task of every node
-- per beat (a sequential scan: O(fleet) per node and beat). A slot marked LOST that beats again
-- runs: its row loses the LOST mark's end time and message.

CREATE INDEX sbx_tasks_slot_idx ON sbx_tasks (slot_id) WHERE status = -3;

CREATE OR REPLACE FUNCTION sbx_l_heartbeat_slot_v1(p_slot_id bigint, p_status text, p_lease_seconds double precision,
                                        p_task_ids bigint[])
RETURNS TABLE (renewed bigint, released bigint[])
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM sbx_l_check_slots_v1(ARRAY[p_slot_id]);
    RETURN QUERY
    WITH s AS (
        UPDATE sbx_slots SET heartbeat_at = now(), status = p_status,
        -- (0029) a slot marked LOST that beats again was slow, not dead: it runs, so no end
        -- time and no "no heartbeat since" (seen at 50 emulated nodes: RUNNING rows with both)
                             ended_at = CASE WHEN sbx_slots.status = 'LOST' THEN NULL ELSE sbx_slots.ended_at END,
                             message = CASE WHEN sbx_slots.status = 'LOST' THEN NULL ELSE sbx_slots.message END
        WHERE id = p_slot_id AND sbx_slots.status NOT IN ('ERROR', 'EXITED') RETURNING sbx_slots.id
    ), mine AS (
        -- (0029) the slot's RUNNING tasks by sbx_tasks_slot_idx, and none that another
        -- transaction holds: that one recovers it (the lease expired) or claims it again after
        -- recovery; waiting for it (seen: 18 s behind another node's claim statement on a
        -- saturated database) held the node's one session, and its other leases expired in turn
        SELECT t.id, (p_task_ids IS NULL OR t.id = ANY (p_task_ids)) AS known,
               t.started_at < now() - make_interval(secs => p_lease_seconds) AS old
        FROM sbx_tasks t
        WHERE t.slot_id = p_slot_id AND t.status = -3
        FOR NO KEY UPDATE OF t SKIP LOCKED
    ), ren AS (
        UPDATE sbx_tasks t
        SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => p_lease_seconds)
        FROM mine m WHERE t.id = m.id AND m.known
        RETURNING t.id
    ), stray AS (
        UPDATE sbx_tasks t
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            attempts = greatest(t.attempts - 1, 0), started_at = NULL
        FROM mine m WHERE t.id = m.id AND NOT m.known AND m.old
        RETURNING t.id
    )
    SELECT (SELECT count(*) FROM ren), ARRAY(SELECT stray.id FROM stray);
END;
$$;

CREATE OR REPLACE FUNCTION sbx_l_heartbeat_slots_v1(p_beats jsonb)
RETURNS TABLE (renewed bigint, released bigint[])
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM sbx_l_check_slots_v1(ARRAY(SELECT b.slot_id FROM jsonb_to_recordset(p_beats) AS b (slot_id bigint)));
    RETURN QUERY
    WITH b AS (
        SELECT * FROM jsonb_to_recordset(p_beats)
                      AS b (slot_id bigint, status text, lease_seconds float8, task_ids bigint[], waiting text,
                            output jsonb)
    ), s AS (
        UPDATE sbx_slots sl SET heartbeat_at = now(), status = b.status, waiting = b.waiting,
                                live_output = COALESCE(b.output, sl.live_output),
        -- (0029) a slot marked LOST that beats again was slow, not dead: it runs, so no end
        -- time and no "no heartbeat since" (seen at 50 emulated nodes: RUNNING rows with both)
                                ended_at = CASE WHEN sl.status = 'LOST' THEN NULL ELSE sl.ended_at END,
                                message = CASE WHEN sl.status = 'LOST' THEN NULL ELSE sl.message END
        FROM b WHERE sl.id = b.slot_id AND sl.status NOT IN ('ERROR', 'EXITED') RETURNING sl.id
    ), mine AS (
        -- (0029) the slots' RUNNING tasks by sbx_tasks_slot_idx, and none that another
        -- transaction holds: that one recovers it (the lease expired) or claims it again after
        -- recovery; waiting for it (seen: 18 s behind another node's claim statement on a
        -- saturated database) held the node's one session, and its other leases expired in turn
        SELECT t.id, b.lease_seconds, (b.task_ids IS NULL OR t.id = ANY (b.task_ids)) AS known,
               t.started_at < now() - make_interval(secs => b.lease_seconds) AS old
        FROM b JOIN sbx_tasks t ON t.slot_id = b.slot_id
        WHERE t.status = -3
        FOR NO KEY UPDATE OF t SKIP LOCKED
    ), ren AS (
        UPDATE sbx_tasks t
        SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => m.lease_seconds)
        FROM mine m WHERE t.id = m.id AND m.known
        RETURNING t.id
    ), stray AS (
        UPDATE sbx_tasks t
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            attempts = greatest(t.attempts - 1, 0), started_at = NULL
        FROM mine m WHERE t.id = m.id AND NOT m.known AND m.old
        RETURNING t.id
    )
    SELECT (SELECT count(*) FROM ren), ARRAY(SELECT stray.id FROM stray);
END;
$$;

CREATE OR REPLACE FUNCTION sbx_l_release_v1(p_slot_id bigint, p_task_ids bigint[]) RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM sbx_l_check_slots_v1(ARRAY[p_slot_id]);
    RETURN QUERY
    WITH mine AS (
        -- (0029) the slot's RUNNING tasks by sbx_tasks_slot_idx, and none that another
        -- transaction holds: that one recovers it (the lease expired) or claims it again after
        -- recovery; waiting for it (seen: 18 s behind another node's claim statement on a
        -- saturated database) held the node's one session, and its other leases expired in turn
        SELECT t.id FROM sbx_tasks t
        WHERE t.slot_id = p_slot_id AND t.status = -3 AND (p_task_ids IS NULL OR t.id = ANY (p_task_ids))
        FOR NO KEY UPDATE OF t SKIP LOCKED
    )
    UPDATE sbx_tasks t
    SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
        attempts = greatest(t.attempts - 1, 0), started_at = NULL
    FROM mine m WHERE t.id = m.id
    RETURNING t.id;
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
        FROM sbx_hand_off_items_v1(p_rows) AS x
        WHERE NOT jsonb_path_exists(COALESCE(x.messages, '[]'), '$[*] ? (@.action == "OVERWRITE")')
        ORDER BY x.task_id, x.slot_id, x.attempt, x.ord
    ), mine AS (
        -- (0029) the items whose task is still theirs, and none that another transaction holds:
        -- that one recovers it (its lease expired: the item is fenced off, as after waiting) or
        -- claims it again after recovery; waiting for it (seen: seconds behind another node's
        -- claim statement) held the node's one session, and its other leases expired in turn
        SELECT s.*
        FROM c s JOIN sbx_tasks t ON t.id = s.task_id
        WHERE t.slot_id = s.slot_id AND t.attempts = s.attempt AND t.status + 0 = -3
        FOR NO KEY UPDATE OF t SKIP LOCKED
    ), done AS (
        UPDATE sbx_tasks t
        SET status = CASE WHEN s.requeue THEN -1 ELSE s.status END,
            slot_id = CASE WHEN s.requeue THEN NULL ELSE t.slot_id END,
            host = CASE WHEN s.requeue THEN NULL ELSE t.host END,
            heartbeat_at = CASE WHEN s.requeue THEN NULL ELSE now() END,
            started_at = CASE WHEN s.requeue THEN NULL ELSE t.started_at END,
            finished_at = CASE WHEN s.requeue THEN NULL ELSE now() END,
            lease_expires_at = NULL
        FROM mine s
        -- RUNNING is compared through an expression no index has (0027): as a literal -3 it
        -- let the planner drive the join from the partial index of RUNNING tasks (0024), as a
        -- parameter from a scan of (app_id, module_id, status) on status alone (a table without
        -- statistics yet: every item matched against every running task, 30 ms per batch of
        -- 500). Then only the primary key fits (and no sequential scan, see the settings
        -- below): an item costs the same however many tasks run or exist.
        WHERE t.id = s.task_id AND t.slot_id = s.slot_id AND t.attempts = s.attempt
          AND t.status + 0 = -3
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

-- (CREATE OR REPLACE resets a function's settings)
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_heartbeat_slot_v1(bigint, text, double precision, bigint[]) '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION sbx_l_release_v1(bigint, bigint[]) SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END;
$$;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_hashjoin = off;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_mergejoin = off;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_seqscan = off;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET jit = off;

-- 0027: the claim and the hand-off find their tasks by primary key whatever the statistics and
-- the table's size when their generic plan (0022, kept for the session) was made; and three
-- foreign keys that checked each claimed task and each recorded execution by a query of their
-- own are checked per statement (as the module key in 0026).
--
-- Measured: with no statistics yet (a new database, before autovacuum's first ANALYZE) the
-- hand-off's plan scanned sbx_tasks_app_status_idx on status alone (RUNNING as the parameter
-- 0024 made it) and matched every item against every running task: 124,750 comparisons and
-- 30 ms of a batch of 500 (benchmarks/throughput.py's database floor, 10,000 tasks). And plans
-- made while the table was small (a few tasks) read all of it per call once it had grown, until
-- the next ANALYZE invalidated them: at 300,000 tasks a claim of one task took 200 ms (a hash of
-- a sequential scan) and its hand-off 70 ms (every task matched with the item). Now the claim's
-- UPDATE takes its tasks by = ANY (no join), the hand-off's items count as one row to the
-- planner (so each item's task is looked up), and neither function may scan sbx_tasks
-- sequentially. (Limiting the hand-off's UPDATE to the items' ids with = ANY as well was tried:
-- the array became part of every per-item index probe, which sorts it again each time, and an
-- emulated fleet of 10 nodes recorded a third fewer tasks.)

ALTER TABLE sbx_tasks DROP CONSTRAINT sbx_tasks_slot_id_fkey;
ALTER TABLE sbx_task_execs DROP CONSTRAINT sbx_task_execs_task_id_fkey;
ALTER TABLE sbx_task_execs DROP CONSTRAINT sbx_task_execs_slot_id_fkey;

-- 0027: the foreign keys of sbx_tasks.slot_id, sbx_task_execs.task_id and sbx_task_execs.slot_id
-- are per statement, as the module key became in 0026. Each checked every claimed task and every
-- recorded execution by a query of its own (1,500 queries per batch of 500 no-op tasks). With
-- the hand-off's plan fix of the same migration, the database floor of benchmarks/throughput.py
-- (10,000 tasks, batches of 500, 3 runs each): claims 0.78 -> 0.63 s, hand-offs 1.52 -> 1.06 s.
-- An execution is of an existing task: locked as the key did (KEY SHARE: a delete of the task
-- waits for this transaction, then takes the execution along), refused with the key's SQLSTATE.
CREATE FUNCTION sbx_task_execs_check_tasks_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    bad bigint;
BEGIN
    -- each row's task looked up (and locked) by primary key: a lateral subquery with a locking
    -- clause is never turned into a join, so no plan kept for the session can read the whole
    -- table instead (see the claim and the hand-off below)
    SELECT n.task_id INTO bad
    FROM new_rows n
    LEFT JOIN LATERAL (SELECT t.id FROM sbx_tasks t WHERE t.id = n.task_id FOR KEY SHARE OF t) k ON true
    WHERE k.id IS NULL
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert on table "sbx_task_execs" names a task that does not exist'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (task_id)=(%s) is not present in table "sbx_tasks".', bad);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER sbx_task_execs_check_tasks
    AFTER INSERT ON sbx_task_execs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sbx_task_execs_check_tasks_v1();

-- The key's ON DELETE CASCADE: a deleted task takes its executions along.
CREATE FUNCTION sbx_tasks_delete_execs_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    DELETE FROM sbx_task_execs e USING old_rows o WHERE e.task_id = o.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER sbx_tasks_delete_execs
    AFTER DELETE ON sbx_tasks
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sbx_tasks_delete_execs_v1();

-- The keys' ON DELETE SET NULL: tasks and executions forget a deleted slot. (A slot goes with
-- its module, which takes its tasks along; this keeps a slot deleted alone from dangling.)
CREATE FUNCTION sbx_slots_forget_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    UPDATE sbx_tasks t SET slot_id = NULL WHERE t.slot_id IN (SELECT o.id FROM old_rows o);
    UPDATE sbx_task_execs e SET slot_id = NULL WHERE e.slot_id IN (SELECT o.id FROM old_rows o);
    RETURN NULL;
END;
$$;

CREATE TRIGGER sbx_slots_forget
    AFTER DELETE ON sbx_slots
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sbx_slots_forget_v1();

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_task_execs_check_tasks_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION sbx_tasks_delete_execs_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION sbx_slots_forget_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END;
$$;

-- the claim: checks (and locks) its slots once, which the key on sbx_tasks.slot_id did per task
CREATE OR REPLACE FUNCTION sbx_l_claim_v1(
    p_app_id bigint, p_module_id bigint, p_host text, p_slot_ids bigint[], p_slot_seqs integer[],
    p_wants integer[], p_limit integer, p_lease_seconds double precision)
RETURNS TABLE (id bigint, app_id bigint, module_id bigint, body text, headers jsonb, status integer,
               attempts integer, retry_base integer, claimed_by bigint, r bigint)
LANGUAGE plpgsql SECURITY DEFINER AS $$
#variable_conflict use_column
BEGIN
    IF NOT sbx_l_may_v1(p_app_id)
       OR NOT EXISTS (SELECT 1 FROM sbx_modules m WHERE m.id = p_module_id AND m.app_id = p_app_id) THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_slot_ids) AS s (id)
               JOIN sbx_slots sl ON sl.id = s.id WHERE sl.module_id <> p_module_id) THEN
        RAISE EXCEPTION 'a slot of the claim is not a slot of module %', p_module_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- what the foreign key on sbx_tasks.slot_id did until 0027, once per claim instead of once
    -- per claimed task: the slots stay until this transaction ends (KEY SHARE); one that does
    -- not exist fails the claim below when it would take a task, as the key did
    PERFORM 1 FROM sbx_slots sl WHERE sl.id = ANY (p_slot_ids) FOR KEY SHARE OF sl;
    RETURN QUERY
    -- claim_tasks: begin
    WITH app AS (
        SELECT 1 FROM sbx_apps WHERE id = p_app_id AND status = 'RUNNING'
    ), full_sinks AS (
        SELECT 1
        FROM sbx_modules me
        JOIN sbx_modules s ON s.app_id = me.app_id AND s.name = ANY (me.sink_modules)
        WHERE me.id = p_module_id AND s.max_pending IS NOT NULL
          AND (SELECT count(*) FROM (SELECT 1 FROM sbx_tasks r
                                     WHERE r.module_id = s.id AND r.status = -1
                                     LIMIT s.max_pending) AS lim) >= s.max_pending
    ), local AS (
        SELECT t.id, t.to_slot
        FROM sbx_tasks t
        WHERE t.module_id = p_module_id
          AND t.status = -1
          AND t.pref_host = p_host
          AND (t.to_slot IS NULL OR t.to_slot = ANY (p_slot_seqs::integer[]))
          AND EXISTS (SELECT 1 FROM app)
          AND NOT EXISTS (SELECT 1 FROM full_sinks)
        ORDER BY t.pref_partial, t.id
        LIMIT p_limit
        FOR UPDATE OF t SKIP LOCKED
    ), waited AS (
        SELECT t.id, t.to_slot
        FROM sbx_tasks t
        WHERE t.module_id = p_module_id
          AND t.status = -1
          AND t.to_host IS NULL
          AND t.pref_host IS NOT NULL
          AND t.pref_until <= now()
          AND t.pref_host <> p_host
          AND (t.to_slot IS NULL OR t.to_slot = ANY (p_slot_seqs::integer[]))
          AND EXISTS (SELECT 1 FROM app)
          AND NOT EXISTS (SELECT 1 FROM full_sinks)
        ORDER BY t.pref_until, t.id
        LIMIT p_limit
        FOR UPDATE OF t SKIP LOCKED
    ), free AS (
        SELECT t.id, t.to_slot
        FROM sbx_tasks t
        WHERE t.module_id = p_module_id
          AND t.status = -1
          AND t.to_host IS NULL
          AND t.pref_host IS NULL
          AND (t.to_slot IS NULL OR t.to_slot = ANY (p_slot_seqs::integer[]))
          AND EXISTS (SELECT 1 FROM app)
          AND NOT EXISTS (SELECT 1 FROM full_sinks)
        ORDER BY t.id
        LIMIT p_limit
        FOR UPDATE OF t SKIP LOCKED
    ), candidates AS (
        SELECT id, to_slot FROM local
        UNION ALL
        SELECT id, to_slot FROM waited
        UNION ALL
        SELECT id, to_slot FROM free
        LIMIT p_limit
    ), ranked AS (
        SELECT id, to_slot, row_number() OVER () AS r FROM candidates
    ), slots AS (
        SELECT * FROM unnest(p_slot_ids::bigint[], p_slot_seqs::integer[], p_wants::integer[])
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
        SET status = -3, slot_id = p.slot_ids[array_position(p.ids, t.id)], host = p_host,
            attempts = t.attempts + 1, started_at = now(), finished_at = NULL, heartbeat_at = now(),
            lease_expires_at = now() + make_interval(secs => p_lease_seconds)
        FROM picked p
        WHERE t.id = ANY (p.ids)
        RETURNING t.id, t.app_id, t.module_id, t.body, t.headers, t.status, t.attempts, t.retry_base,
                  t.slot_id AS claimed_by, p.rs[array_position(p.ids, t.id)] AS r
    )
    SELECT * FROM claimed ORDER BY r;
    -- claim_tasks: end
    -- (the rows claimed above are undone with the statement)
    IF FOUND AND EXISTS (SELECT 1 FROM unnest(p_slot_ids) AS s (id)
                         WHERE NOT EXISTS (SELECT 1 FROM sbx_slots sl WHERE sl.id = s.id)) THEN
        RAISE EXCEPTION 'a slot of the claim does not exist (module %)', p_module_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
END;
$$;

-- A hand-off batch's items (sbx_complete_tasks_v1), as the planner should see them (0027): one
-- row. jsonb_to_recordset says 100 to the planner; with a small table (a new app's first
-- hand-off) the generic plan, kept for the session, then read the table and matched it with the
-- items, rather than look each item's task up (70 ms per hand-off at 300,000 tasks until the
-- next ANALYZE). PL/pgSQL: a SQL function would be inlined, and its ROWS with it.
CREATE FUNCTION sbx_hand_off_items_v1(p_rows jsonb)
RETURNS TABLE (ord integer, task_id bigint, slot_id bigint, attempt integer, status integer, requeue boolean,
               exec jsonb, messages jsonb, finish_text text)
LANGUAGE plpgsql IMMUTABLE ROWS 1 AS $$
BEGIN
    RETURN QUERY
    SELECT x.ord, x.task_id, x.slot_id, x.attempt, x.status, x.requeue, x.exec, x.messages, x.finish_text
    FROM jsonb_to_recordset(p_rows) AS x (ord integer, task_id bigint, slot_id bigint, attempt integer,
                                          status integer, requeue boolean, exec jsonb, messages jsonb,
                                          finish_text text);
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

-- (after the CREATE OR REPLACE above, which resets a function's settings)
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, '
                   'double precision) SET search_path = pg_catalog, %I, pg_temp', current_schema());
END;
$$;
ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, double precision)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_hashjoin = off;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_mergejoin = off;
-- nor a sequential scan (see above); the launcher function's app check too
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_seqscan = off;
ALTER FUNCTION sbx_l_complete_tasks_v1(jsonb) SET enable_seqscan = off;
-- and no JIT: a disabled scan costs 10^10, past jit_above_cost, and compiling the statements
-- of the functions it calls took 165 ms of a hand-off (measured); no statement here gains by it
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET jit = off;
ALTER FUNCTION sbx_l_complete_tasks_v1(jsonb) SET jit = off;
-- the claim likewise (0027): its UPDATE had hashed a sequential scan of sbx_tasks
ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, double precision)
    SET enable_seqscan = off;
ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, double precision)
    SET jit = off;

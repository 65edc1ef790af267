-- 0030: a hand-off never loses a result to a row lock that is not a take. Since 0029 the batch
-- hand-off skips task rows another transaction holds (SKIP LOCKED), as if their lease had been
-- lost. But a claim statement holds rows it does not take: its snapshot predates another
-- node's claim of a task, so it finds the row READY, locks its newest version (RUNNING), and
-- the lock stays to the claim's end although its recheck left the row out. The owner's
-- hand-off in that window was discarded and the task ran again after its lease expired
-- (measured: 10 emulated nodes, 20 s, 988 of ~100,000 results). Now such an item is answered
-- busy (-1) and the caller tries it again shortly. Releases likewise (sbx_l_release_v2). And
-- the claim no longer takes such locks: a candidate whose row was updated since its snapshot
-- is checked again in a fresh one before it is locked (sbx_task_still_ready_v1), so another
-- node's claim holds no running task's row for the seconds a saturated database takes to
-- answer it (50 emulated nodes: leases expired while the owner's beats and hand-offs met it).

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
        -- waiting for it (seen: seconds behind another node's claim statement) held the node's
        -- one session, and its other leases expired in turn. Those items are `busy` (0030)
        SELECT s.*
        FROM c s JOIN sbx_tasks t ON t.id = s.task_id
        WHERE t.slot_id = s.slot_id AND t.attempts = s.attempt AND t.status + 0 = -3
        FOR NO KEY UPDATE OF t SKIP LOCKED
    ), busy AS (
        -- (0030) the items left out of mine whose task is still theirs in this statement's
        -- snapshot: another transaction holds the row, and that one is not always taking it. A
        -- claim statement whose snapshot predates the task's claim finds the row READY there,
        -- locks its newest version, and keeps the lock to its end although its recheck left the
        -- row out (seen: 1 % of the results of 10 emulated nodes discarded, their tasks run
        -- again). Answered -1: the caller tries again shortly, and the next try records the
        -- result, or fences it off when the row was being recovered. Looked for only when an
        -- item is missing from mine (a one-time filter: no join at all otherwise).
        SELECT s.ord
        FROM c s JOIN sbx_tasks t ON t.id = s.task_id
        WHERE (SELECT count(*) FROM mine) < (SELECT count(*) FROM c)
          AND t.slot_id = s.slot_id AND t.attempts = s.attempt AND t.status + 0 = -3
          AND s.ord <> ALL (ARRAY(SELECT m.ord FROM mine m))
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
    SELECT d.ord, COALESCE(w.n, 0) FROM done d LEFT JOIN wrote w ON w.from_task_id = d.id
    UNION ALL
    SELECT b.ord, -1 FROM busy b;

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

-- (CREATE OR REPLACE resets a function's settings: 0029's again)
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_hashjoin = off;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_mergejoin = off;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_seqscan = off;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET jit = off;

-- queries.sql release_tasks (p_task_ids NULL) and release_task_ids (0030): RUNNING tasks of a
-- slot back to READY, the attempt not counted; and, with busy true, those of them another
-- transaction holds (not released: the caller tries again shortly). v1 skipped those as taken,
-- but the holder may be a claim statement that only looked at the row (see
-- sbx_complete_tasks_v1's busy); such a task stayed RUNNING until its lease expired and was
-- then recovered as stalled, an attempt of its retries spent on no run.
CREATE FUNCTION sbx_l_release_v2(p_slot_id bigint, p_task_ids bigint[]) RETURNS TABLE (id bigint, busy boolean)
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM sbx_l_check_slots_v1(ARRAY[p_slot_id]);
    RETURN QUERY
    WITH mine AS (
        -- the slot's RUNNING tasks by sbx_tasks_slot_idx, and none that another transaction
        -- holds (waiting for it held the node's one session: 0029)
        SELECT t.id FROM sbx_tasks t
        WHERE t.slot_id = p_slot_id AND t.status = -3 AND (p_task_ids IS NULL OR t.id = ANY (p_task_ids))
        FOR NO KEY UPDATE OF t SKIP LOCKED
    ), gone AS (
        UPDATE sbx_tasks t
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            attempts = greatest(t.attempts - 1, 0), started_at = NULL
        FROM mine m WHERE t.id = m.id
        RETURNING t.id
    )
    SELECT g.id, false FROM gone g
    UNION ALL
    -- the slot's in this statement's snapshot that mine left out: held by another transaction
    SELECT t.id, true FROM sbx_tasks t
    WHERE t.slot_id = p_slot_id AND t.status = -3 AND (p_task_ids IS NULL OR t.id = ANY (p_task_ids))
      AND t.id <> ALL (ARRAY(SELECT m.id FROM mine m));
END;
$$;

-- The release of launchers before 0030 (queries.sql then called it): sbx_l_release_v2's
-- released ids, the busy ones left out (not released, as before)
CREATE OR REPLACE FUNCTION sbx_l_release_v1(p_slot_id bigint, p_task_ids bigint[]) RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    RETURN QUERY SELECT r.id FROM sbx_l_release_v2(p_slot_id, p_task_ids) AS r WHERE NOT r.busy;
END;
$$;

-- a launcher function: a fixed search_path, and no EXECUTE for PUBLIC (the roles get it from
-- sbx_grant_roles_v1)
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_release_v2(bigint, bigint[]) SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    -- (v1: CREATE OR REPLACE reset its search_path)
    EXECUTE format('ALTER FUNCTION sbx_l_release_v1(bigint, bigint[]) SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    REVOKE EXECUTE ON FUNCTION sbx_l_release_v2(bigint, bigint[]) FROM PUBLIC;
END;
$$;

-- (0030) A claim's candidates are READY in its statement's snapshot, and one whose row was
-- updated since (xmax set: another node claimed it, and it runs) is checked again in a fresh
-- snapshot before it is locked. Else the claim locked the row's newest version, its recheck
-- left it out, and the lock stayed to the claim's end: seconds on a saturated database, during
-- which the owner's heartbeat and hand-off met a held row (a heartbeat skips it, a hand-off is
-- busy: 50 emulated nodes lost leases so). VOLATILE: each call reads with a new snapshot.
CREATE FUNCTION sbx_task_still_ready_v1(p_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM sbx_tasks t WHERE t.id = p_id AND t.status = -1);
END;
$$;

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
          AND (t.xmax = '0'::xid OR sbx_task_still_ready_v1(t.id))
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
          AND (t.xmax = '0'::xid OR sbx_task_still_ready_v1(t.id))
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
          AND (t.xmax = '0'::xid OR sbx_task_still_ready_v1(t.id))
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

-- (after the CREATE OR REPLACE above, which resets a function's settings: 0027's again)
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, '
                   'double precision) SET search_path = pg_catalog, %I, pg_temp', current_schema());
END;
$$;
ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, double precision)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, double precision)
    SET enable_seqscan = off;
ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, double precision)
    SET jit = off;

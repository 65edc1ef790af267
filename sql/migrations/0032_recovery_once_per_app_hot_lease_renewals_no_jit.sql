-- 0032: lease recovery once per app and interval across the fleet, lease renewals that write
-- no index entry, one claim of a module at a time, and no JIT in any launcher function.
--
-- Measured with benchmarks/fleet.py (200 emulated nodes, PgBouncer, pg_stat_statements and
-- auto_explain): every launcher ran the recovery every quarter heartbeat, so the fleet ran it
-- 200 times as often as one launcher does: 735 recoveries in one run, 66 ms each (48 s of the
-- server's time for 0 tasks recovered), each reading every running task of the app. And a
-- planner estimate gone stale (the bound-task index guessed at 67,518 rows, 0 in it) priced
-- sbx_l_release_bound_v1's no-op statement past jit_above_cost: PostgreSQL compiled 27
-- functions with inlining and optimisation on every call, 1.1-1.3 s of CPU each, 238 calls.
--
-- sbx_l_recover_v2(p_every, p_bound_limit): with p_every > 0 (the launchers' periodic
-- recovery: an eighth of their heartbeat) an app is recovered only when nobody recovered it in the
-- last p_every seconds (sbx_apps.recovered_at; an app whose row another recoverer holds is
-- skipped, never waited for), so the fleet recovers each app about 8 times per heartbeat,
-- whatever the number of launchers. p_every = 0 (the CLI, the autoscaler, v1): now. It also
-- unbinds the READY tasks bound to a dead host (what sbx_l_release_bound_v1 did in a second
-- statement, over all the caller's apps) when p_bound_limit > 0, and then returns one more row:
-- (NULL, NULL, unbound).

ALTER TABLE sbx_apps ADD COLUMN recovered_at timestamptz;

-- Lease renewals without index entries. The same run: the node's heartbeat statement took more
-- of the server than the claims (2,377 beats, 741 s of statement time against the claims' 67 s)
-- because each renewal of a task's lease was a new row version with an entry in 5 of
-- sbx_tasks's indexes: lease_expires_at was one indexed column. Without sbx_tasks_lease_idx a
-- renewal changes no indexed column and is a HOT update (no index entry); the recovery, once
-- per app and interval now, reads the app's RUNNING tasks module by module through
-- sbx_tasks_app_status_idx instead.
DROP INDEX sbx_tasks_lease_idx;

-- The same for the slots' rows (32 per node and beat): heartbeat_at was indexed (live slots by
-- heartbeat time), so every beat of a slot wrote 3 index entries. sbx_host_live() looks a
-- host's live slots up by host now, and recovery marks slots LOST through sbx_slots_module_idx.
DROP INDEX sbx_slots_live_idx;
CREATE INDEX sbx_slots_live_host_idx ON sbx_slots (host) WHERE status IN ('STARTING', 'READY', 'RUNNING');

-- and the node's heartbeat statement updates its slots by primary key: auto_explain showed it
-- hashing a sequential scan of sbx_slots (6,400 rows and their dead versions) in 119 of 134
-- beats over 250 ms (jsonb_to_recordset is guessed at 100 rows whatever the node's size)
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_hashjoin = off;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_mergejoin = off;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_seqscan = off;

CREATE FUNCTION sbx_l_recover_v2(p_every double precision, p_bound_limit integer)
RETURNS TABLE (id bigint, status integer, unbound integer)
LANGUAGE plpgsql SECURITY DEFINER AS $$
#variable_conflict use_column
DECLARE
    due bigint[];
BEGIN
    IF p_every > 0 THEN
        -- (0032) the apps nobody recovered for p_every seconds; one held by another recoverer is
        -- being recovered now: skipped (FOR NO KEY UPDATE: a task insert's KEY SHARE is no conflict)
        WITH free AS (
            SELECT a.id FROM sbx_apps a
            WHERE a.id IN (SELECT sbx_l_own_apps_v1())
              AND (a.recovered_at IS NULL OR a.recovered_at <= now() - make_interval(secs => p_every))
            FOR NO KEY UPDATE SKIP LOCKED
        ), marked AS (
            UPDATE sbx_apps a SET recovered_at = now() FROM free f WHERE a.id = f.id RETURNING a.id
        )
        SELECT array_agg(m.id) INTO due FROM marked m;
    ELSE
        due := ARRAY(SELECT sbx_l_own_apps_v1());
    END IF;
    IF COALESCE(cardinality(due), 0) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH expired AS (
        SELECT t.id, m.stall_retries
        FROM sbx_modules m JOIN sbx_tasks t ON t.app_id = m.app_id AND t.module_id = m.id
        -- the due apps' RUNNING tasks, module by module: every column of sbx_tasks_app_status_idx
        -- bound (an app's done tasks are not read; a second partial index of RUNNING tasks beside
        -- sbx_tasks_slot_idx made the planner pick the wrong one for the heartbeat)
        WHERE m.app_id = ANY (due) AND t.status = -3 AND t.lease_expires_at < now()
          AND pg_postmaster_start_time() + (t.lease_expires_at - COALESCE(t.heartbeat_at, t.lease_expires_at)) < now()
        ORDER BY t.lease_expires_at
        LIMIT 1000
        FOR UPDATE OF t SKIP LOCKED
    ), recorded AS (
        INSERT INTO sbx_task_execs (task_id, attempt, slot_id, host, status, started_at, finished_at, stderr)
        SELECT t.id, t.attempts, t.slot_id, t.host, 123, COALESCE(t.started_at, now()), now(),
               'scalebox: lease expired (slot ' || COALESCE(t.slot_id::text, '?') || ' on '
               || COALESCE(t.host, '?') || ' stopped heart-beating)'
        FROM sbx_tasks t JOIN expired e ON e.id = t.id
    ), lost AS (
        UPDATE sbx_slots sl
        SET status = 'LOST', ended_at = now(), message = 'no heartbeat since ' || sl.heartbeat_at::text
        WHERE sl.status IN ('STARTING', 'READY', 'RUNNING')
          AND sl.heartbeat_at < now() - make_interval(secs => 2 * sl.heartbeat_seconds)
          AND sl.module_id IN (SELECT m.id FROM sbx_modules m WHERE m.app_id = ANY (due))
    )
    UPDATE sbx_tasks t
    SET status = CASE WHEN t.attempts - t.retry_base <= e.stall_retries THEN -1 ELSE 123 END,
        finished_at = CASE WHEN t.attempts - t.retry_base <= e.stall_retries THEN NULL ELSE now() END,
        started_at = CASE WHEN t.attempts - t.retry_base <= e.stall_retries THEN NULL ELSE t.started_at END,
        slot_id = NULL, heartbeat_at = NULL, lease_expires_at = NULL
    FROM expired e
    WHERE t.id = e.id
    RETURNING t.id, t.status, NULL::integer;
    IF p_bound_limit > 0 THEN
        -- and the READY tasks bound to a dead host, past their locality wait, of all the
        -- caller's apps: once per recovery that found an app due
        RETURN QUERY SELECT NULL::bigint, NULL::integer, sbx_l_release_bound_v1(p_bound_limit);
    END IF;
END;
$$;

-- v1 (launchers of an older version): one body, v2's, recovering now; the bound tasks are
-- theirs to unbind with sbx_l_release_bound_v1 as before
CREATE OR REPLACE FUNCTION sbx_l_recover_v1() RETURNS TABLE (id bigint, status integer)
LANGUAGE plpgsql SECURITY DEFINER AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT r.id, r.status FROM sbx_l_recover_v2(0, 0) r;
END;
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_recover_v2(double precision, integer) '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
    REVOKE EXECUTE ON FUNCTION sbx_l_recover_v2(double precision, integer) FROM PUBLIC;
    -- (v1: CREATE OR REPLACE reset its search_path)
    EXECUTE format('ALTER FUNCTION sbx_l_recover_v1() SET search_path = pg_catalog, %I, pg_temp', current_schema());
END;
$$;

-- The claim: one claim of a module at a time (an advisory lock per module for the claim's
-- transaction; see the function). CREATE OR REPLACE resets the function's settings: set again,
-- in their order (search_path, 0022's generic plan, 0027's no sequential scan; jit below).
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
    -- (0032) one claim of a module at a time, the next with a snapshot taken after the last one
    -- committed. 19 of 20 server connections were seen claiming at once (50 emulated nodes),
    -- each skipping the rows the others had locked, with a second look (sbx_task_still_ready_v1)
    -- at each: PostgreSQL at 1.4-1.5 of 2 cores and the fleet at half its rate. Waiting here
    -- costs no CPU, and the candidate scan below then starts past the tasks claimed before.
    PERFORM pg_advisory_xact_lock(1935827821, (p_module_id % 2147483647)::integer);
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

-- no JIT in any launcher function (and so in nothing they call): their statements are short
-- OLTP ones, and an estimate gone stale or a disabled plan node (enable_seqscan = off costs
-- 10^10) can price one past jit_above_cost at any time. Each already has a SET clause
-- (search_path), so one more costs nothing per call.
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'sbx\_l\_%'
               AND NOT ('jit=off' = ANY (COALESCE(p.proconfig, '{}'))) LOOP
        EXECUTE format('ALTER FUNCTION %s SET jit = off', f.sig);
    END LOOP;
END;
$$;

SELECT sbx_grant_roles_v1();

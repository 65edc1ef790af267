-- 0033: a node's heartbeat renews its slots' leases, not every task's.
--
-- Measured with benchmarks/fleet.py at 100 emulated nodes through PgBouncer (32 slots a node,
-- 10 ms tasks): 10-18 of the 20 server connections were seen in the node's heartbeat at once,
-- each renewing the lease of every task its node held, running and prefetched (hundreds per
-- node, every half heartbeat): a new row version of sbx_tasks per task and beat, and a row lock
-- on each before it, while the claims and hand-offs of 3,200 slots churned the same pages.
--
-- Now a slot's row carries the lease (sbx_slots.lease_expires_at), renewed by its beats, which
-- already wrote that row: a RUNNING task is alive while its claim's lease or its slot's lease
-- holds (the slot has not ended: not ERROR or EXITED). A beat writes no task row; it still reads
-- its slots' RUNNING tasks to release the strays (claimed over a lease ago, unknown to the
-- slot: a lost claim reply), and locks only those. A RUNNING task that its live slot does not
-- name is no longer left to expire on its own lease: the beat releases it once it is a lease
-- old, its attempt not counted (before, a race between that release and the recovery, which
-- counted one). After a server restart a slot's lease counts from the restart, as a task's does.
--
-- CREATE OR REPLACE resets a function's settings: each is set again, in its order.

ALTER TABLE sbx_slots ADD COLUMN lease_expires_at timestamptz;

CREATE OR REPLACE FUNCTION sbx_l_heartbeat_slot_v1(p_slot_id bigint, p_status text, p_lease_seconds double precision,
                                        p_task_ids bigint[])
RETURNS TABLE (renewed bigint, released bigint[])
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM sbx_l_check_slots_v1(ARRAY[p_slot_id]);
    RETURN QUERY
    WITH s AS (
        -- (0033) the slot's lease is its tasks' lease: one row written per slot and beat, none per task
        UPDATE sbx_slots SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => p_lease_seconds),
                             status = p_status,
        -- (0029) a slot marked LOST that beats again was slow, not dead: it runs, so no end
        -- time and no "no heartbeat since" (seen at 50 emulated nodes: RUNNING rows with both)
                             ended_at = CASE WHEN sbx_slots.status = 'LOST' THEN NULL ELSE sbx_slots.ended_at END,
                             message = CASE WHEN sbx_slots.status = 'LOST' THEN NULL ELSE sbx_slots.message END
        WHERE id = p_slot_id AND sbx_slots.status NOT IN ('ERROR', 'EXITED') RETURNING sbx_slots.id
    ), held AS (
        -- the slot's RUNNING tasks by sbx_tasks_slot_idx, read and not locked (0033)
        SELECT t.id, (p_task_ids IS NULL OR t.id = ANY (p_task_ids)) AS known,
               t.started_at < now() - make_interval(secs => p_lease_seconds) AS old
        FROM sbx_tasks t
        WHERE t.slot_id = p_slot_id AND t.status = -3
    ), strays AS (
        -- those it does not know, claimed over a lease ago, locked: none that another
        -- transaction holds (0029: waiting for it held the node's one session), and each checked
        -- again once locked (still RUNNING on this slot)
        SELECT t.id FROM held h JOIN sbx_tasks t ON t.id = h.id
        WHERE NOT h.known AND h.old AND t.slot_id = p_slot_id AND t.status = -3
        FOR NO KEY UPDATE OF t SKIP LOCKED
    ), stray AS (
        UPDATE sbx_tasks t
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            attempts = greatest(t.attempts - 1, 0), started_at = NULL
        FROM strays x WHERE t.id = x.id
        RETURNING t.id
    )
    SELECT (SELECT count(*) FROM held h WHERE h.known AND EXISTS (SELECT 1 FROM s)),
           ARRAY(SELECT stray.id FROM stray);
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
        -- (0033) a slot's lease is its tasks' lease: one row written per slot and beat, none per task
        UPDATE sbx_slots sl SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => b.lease_seconds),
                                status = b.status, waiting = b.waiting,
                                live_output = COALESCE(b.output, sl.live_output),
        -- (0029) a slot marked LOST that beats again was slow, not dead: it runs, so no end
        -- time and no "no heartbeat since" (seen at 50 emulated nodes: RUNNING rows with both)
                                ended_at = CASE WHEN sl.status = 'LOST' THEN NULL ELSE sl.ended_at END,
                                message = CASE WHEN sl.status = 'LOST' THEN NULL ELSE sl.message END
        FROM b WHERE sl.id = b.slot_id AND sl.status NOT IN ('ERROR', 'EXITED') RETURNING sl.id
    ), held AS (
        -- the slots' RUNNING tasks by sbx_tasks_slot_idx, read and not locked (0033)
        SELECT t.id, t.slot_id, (b.task_ids IS NULL OR t.id = ANY (b.task_ids)) AS known,
               t.started_at < now() - make_interval(secs => b.lease_seconds) AS old
        FROM b JOIN sbx_tasks t ON t.slot_id = b.slot_id
        WHERE t.status = -3
    ), strays AS (
        -- those their slot does not know, claimed over a lease ago, locked: none that another
        -- transaction holds (0029: waiting for it held the node's one session), and each checked
        -- again once locked (still RUNNING on that slot)
        SELECT t.id FROM held h JOIN sbx_tasks t ON t.id = h.id
        WHERE NOT h.known AND h.old AND t.slot_id = h.slot_id AND t.status = -3
        FOR NO KEY UPDATE OF t SKIP LOCKED
    ), stray AS (
        UPDATE sbx_tasks t
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            attempts = greatest(t.attempts - 1, 0), started_at = NULL
        FROM strays x WHERE t.id = x.id
        RETURNING t.id
    )
    SELECT (SELECT count(*) FROM held h WHERE h.known AND h.slot_id IN (SELECT s.id FROM s)),
           ARRAY(SELECT stray.id FROM stray);
END;
$$;

CREATE OR REPLACE FUNCTION sbx_l_recover_v2(p_every double precision, p_bound_limit integer)
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
        -- (0033) and its slot's, which the slot's beats renew for every task it knows: a task
        -- expires when both have (the claim's, and the slot's if it beat since and has not ended)
        LEFT JOIN sbx_slots sl ON sl.id = t.slot_id AND sl.status NOT IN ('ERROR', 'EXITED')
        WHERE m.app_id = ANY (due) AND t.status = -3 AND t.lease_expires_at < now()
          AND pg_postmaster_start_time() + (t.lease_expires_at - COALESCE(t.heartbeat_at, t.lease_expires_at)) < now()
          AND (sl.lease_expires_at IS NULL
               OR (sl.lease_expires_at < now()
                   AND pg_postmaster_start_time() + (sl.lease_expires_at - sl.heartbeat_at) < now()))
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

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_heartbeat_slot_v1(bigint, text, double precision, bigint[]) '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION sbx_l_recover_v2(double precision, integer) '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
END;
$$;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_hashjoin = off;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_mergejoin = off;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_seqscan = off;
ALTER FUNCTION sbx_l_heartbeat_slot_v1(bigint, text, double precision, bigint[]) SET jit = off;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET jit = off;
ALTER FUNCTION sbx_l_recover_v2(double precision, integer) SET jit = off;

SELECT sbx_grant_roles_v1();

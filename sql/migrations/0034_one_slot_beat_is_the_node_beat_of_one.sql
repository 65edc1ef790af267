-- 0034: the one-slot heartbeat is the node's heartbeat of one slot, not a copy of it.
--
-- sbx_l_heartbeat_slot_v1 repeated sbx_l_heartbeat_slots_v1 statement for statement, and 0033
-- had to change both the same way. They differed in one thing: the node's beat says why each
-- slot waits (sbx_slots.waiting, NULL: it does not), the one-slot beat says nothing about it and
-- leaves it as it is. A beat may now say "keep_waiting": true, and the one-slot beat is the
-- node's beat of one slot saying so. Its live output likewise stays (no "output" sent).
--
-- CREATE OR REPLACE resets a function's settings: each is set again, in its order.

CREATE OR REPLACE FUNCTION sbx_l_heartbeat_slot_v1(p_slot_id bigint, p_status text, p_lease_seconds double precision,
                                        p_task_ids bigint[])
RETURNS TABLE (renewed bigint, released bigint[])
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    RETURN QUERY SELECT * FROM sbx_l_heartbeat_slots_v1(jsonb_build_array(jsonb_build_object(
        'slot_id', p_slot_id, 'status', p_status, 'lease_seconds', p_lease_seconds,
        'task_ids', to_jsonb(p_task_ids), 'keep_waiting', true)));
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
                            output jsonb, keep_waiting boolean)
    ), s AS (
        -- (0033) a slot's lease is its tasks' lease: one row written per slot and beat, none per task
        UPDATE sbx_slots sl SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => b.lease_seconds),
                                status = b.status,
                                -- (0034) a beat that says nothing of why its slot waits leaves it
                                waiting = CASE WHEN b.keep_waiting THEN sl.waiting ELSE b.waiting END,
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

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_heartbeat_slot_v1(bigint, text, double precision, bigint[]) '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END;
$$;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_hashjoin = off;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_mergejoin = off;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_seqscan = off;
ALTER FUNCTION sbx_l_heartbeat_slot_v1(bigint, text, double precision, bigint[]) SET jit = off;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET jit = off;

SELECT sbx_grant_roles_v1();

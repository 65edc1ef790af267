-- Locality, continued: HOST-BOUND / SLOT-BOUND tasks prefer their host (and are released once
-- it is dead, see claim_tasks); tasks whose preferred host holds only some inputs come after
-- those it holds all of; launchers adopt tasks queued before any holder was up; OVERWRITE
-- keeps the new message's preference.

ALTER TABLE sbx_tasks
    ADD COLUMN pref_partial boolean NOT NULL DEFAULT false;

DROP INDEX sbx_tasks_local_idx;
CREATE INDEX sbx_tasks_local_idx ON sbx_tasks (module_id, pref_host, pref_partial, id)
    WHERE status = -1 AND pref_host IS NOT NULL;
-- claims of tasks bound to no host (bound ones are in the local index of their host)
CREATE INDEX sbx_tasks_free_idx ON sbx_tasks (module_id, id) WHERE status = -1 AND to_host IS NULL;
-- the hosts READY tasks are bound to (sbx_release_bound_v1)
CREATE INDEX sbx_tasks_bound_idx ON sbx_tasks (to_host) WHERE status = -1 AND to_host IS NOT NULL;

-- bound tasks queued before this version: they prefer their host too
UPDATE sbx_tasks SET pref_host = to_host, pref_until = now()
WHERE status = -1 AND to_host IS NOT NULL AND pref_host IS NULL;

-- The inputs a task names: its `inputs` header (a JSON array of keys), else what its module's
-- input_regex matches in the body (group 1, or the whole match); NULL when it names none.
CREATE FUNCTION sbx_task_inputs_v1(p_headers jsonb, p_body text, p_input_regex text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(p_headers -> 'inputs') = 'array'
            THEN ARRAY(SELECT jsonb_array_elements_text(p_headers -> 'inputs'))
        WHEN p_input_regex IS NOT NULL
            THEN array_remove(ARRAY[substring(p_body FROM p_input_regex)], NULL)
    END
$$;

-- The host to prefer for these inputs: among the live hosts (and p_also, a host about to be
-- live), the one holding most of them, then most bytes; partial when it holds fewer than all.
-- No row when no such host holds any.
CREATE FUNCTION sbx_best_holder_v1(p_inputs text[], p_also text)
RETURNS TABLE (host text, partial boolean)
LANGUAGE sql STABLE AS $$
    SELECT sc.host, count(*) < (SELECT count(DISTINCT i) FROM unnest(p_inputs) AS i)
    FROM sbx_scratch sc
    WHERE sc.key = ANY (p_inputs) AND (sc.host = p_also OR sbx_host_live(sc.host))
    GROUP BY sc.host
    ORDER BY count(*) DESC, sum(sc.bytes) DESC, sc.host
    LIMIT 1
$$;

-- On insert, each READY task gets the host it prefers until pref_until: a HOST-BOUND /
-- SLOT-BOUND task its to_host (claimable elsewhere only once that host is dead, see
-- claim_tasks); a task naming inputs the live host holding most of them (pref_partial when
-- that host holds only some).

-- A launcher that has just indexed its scratch adopts the READY tasks of the app (at most
-- p_limit, oldest first) that prefer no live host but name inputs it holds: tasks queued
-- before any holder was up (e.g. submitted while the stage jobs still waited in Slurm's
-- queue). Each gets the best holder among the live hosts and p_host. Returns how many.
CREATE FUNCTION sbx_adopt_tasks_v1(p_app_id bigint, p_host text, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH candidates AS (
        SELECT t.id, sbx_task_inputs_v1(t.headers, t.body, m.input_regex) AS inputs,
               m.locality_wait_seconds AS wait
        FROM sbx_tasks t
        JOIN sbx_modules m ON m.id = t.module_id
        WHERE t.app_id = p_app_id AND t.status = -1 AND t.to_host IS NULL
          AND (jsonb_typeof(t.headers -> 'inputs') = 'array' OR m.input_regex IS NOT NULL)
          AND (t.pref_host IS NULL OR (t.pref_host <> p_host AND NOT sbx_host_live(t.pref_host)))
        ORDER BY t.id
        LIMIT p_limit
        FOR UPDATE OF t SKIP LOCKED
    ), adopted AS (
        SELECT c.id, c.wait, b.host, b.partial
        FROM candidates c
        CROSS JOIN LATERAL sbx_best_holder_v1(c.inputs, p_host) AS b
        WHERE EXISTS (SELECT 1 FROM sbx_scratch sc WHERE sc.host = p_host AND sc.key = ANY (c.inputs))
    )
    UPDATE sbx_tasks t
    SET pref_host = a.host, pref_partial = a.partial, pref_until = now() + make_interval(secs => a.wait)
    FROM adopted a
    WHERE t.id = a.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

-- HOST-BOUND / SLOT-BOUND tasks whose host is dead (no slot of it heart-beats) and whose
-- locality wait is over lose their binding, so that any host takes them (they never wait
-- forever for a host that is gone). The bound hosts are found by a skip scan of
-- sbx_tasks_bound_idx (one probe per distinct host); at most p_limit tasks a call. Run with
-- lease recovery. Returns how many.
CREATE FUNCTION sbx_release_bound_v1(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH RECURSIVE bound (host) AS (
        (SELECT t.to_host FROM sbx_tasks t
         WHERE t.status = -1 AND t.to_host IS NOT NULL
         ORDER BY t.to_host LIMIT 1)
        UNION ALL
        SELECT (SELECT t.to_host FROM sbx_tasks t
                WHERE t.status = -1 AND t.to_host IS NOT NULL AND t.to_host > b.host
                ORDER BY t.to_host LIMIT 1)
        FROM bound b
        WHERE b.host IS NOT NULL
    ), orphans AS (
        SELECT t.id
        FROM sbx_tasks t
        WHERE t.status = -1
          AND t.to_host IN (SELECT b.host FROM bound b WHERE b.host IS NOT NULL AND NOT sbx_host_live(b.host))
          AND (t.pref_until IS NULL OR t.pref_until <= now())
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE sbx_tasks t
    SET to_host = NULL, to_slot = NULL, pref_host = NULL, pref_until = NULL, pref_partial = false
    FROM orphans o
    WHERE t.id = o.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

CREATE OR REPLACE FUNCTION sbx_task_locality_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    m record;
    best record;
BEGIN
    SELECT locality_wait_seconds, input_regex INTO m FROM sbx_modules WHERE id = NEW.module_id;
    IF NEW.to_host IS NOT NULL THEN
        NEW.pref_host := NEW.to_host;
        NEW.pref_partial := false;
    ELSE
        SELECT b.host, b.partial INTO best
        FROM sbx_best_holder_v1(sbx_task_inputs_v1(NEW.headers, NEW.body, m.input_regex), NULL) AS b;
        NEW.pref_host := best.host;
        NEW.pref_partial := COALESCE(best.partial, false);
    END IF;
    IF NEW.pref_host IS NOT NULL THEN
        NEW.pref_until := now() + make_interval(secs => m.locality_wait_seconds);
    END IF;
    RETURN NEW;
END;
$$;

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
        status = EXCLUDED.status, attempts = 0, slot_id = NULL, host = NULL, heartbeat_at = NULL,
        lease_expires_at = NULL, started_at = NULL, finished_at = NULL,
        from_task_id = EXCLUDED.from_task_id, created_at = now()
    WHERE sbx_tasks.status <> -3;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN written + n;
END;
$$;

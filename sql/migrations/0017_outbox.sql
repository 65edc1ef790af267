-- 0017: messages to another database (issue 15, deployment 2: one database per cluster). A sink
-- that names a module of another app in another database (the sender module's REMOTE_SERVER and
-- APP_ID, as in Scalebox) is a remote sink: its messages are written to sbx_outbox by
-- sbx_insert_messages_v1 (action REMOTE), so in the sender's hand-off transaction, and the relay
-- delivers them exactly once (keys in the receiver's sbx_inbox). Setting an app FINISHED forwards
-- a finish record to its remote parts.

-- Inserts messages as tasks. rows: JSON array of {module_id, body, headers, to_host, to_slot,
-- status, action}; action is the target module's CONFLICT_ACTION for a body that already exists:
-- FAIL raises unique_violation (the caller's transaction is lost), IGNORE keeps the old task,
-- OVERWRITE resets the old task to the new message unless it is RUNNING right now. Action
-- REMOTE (0017): a message to a module of another app in another database ({remote,
-- remote_app_id, module, body, headers}) goes to sbx_outbox, in the caller's transaction, in
-- the rows' order; the relay delivers it (scalebox_hpc/db/outbox.py).
-- Returns the rows written.
CREATE OR REPLACE FUNCTION sbx_insert_messages_v1(p_app_id bigint, p_from_task_id bigint, p_rows jsonb)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    written integer := 0;
    n integer;
BEGIN
    INSERT INTO sbx_outbox (app_id, from_task_id, remote, remote_app_id, module, body, headers)
    SELECT p_app_id, p_from_task_id, r.remote, r.remote_app_id, r.module, r.body, COALESCE(r.headers, '{}')
    FROM ROWS FROM (jsonb_to_recordset(p_rows) AS (remote text, remote_app_id bigint, module text, body text,
                                                   headers jsonb, action text))
         WITH ORDINALITY AS r (remote, remote_app_id, module, body, headers, action, ord)
    WHERE r.action = 'REMOTE'
    ORDER BY r.ord;
    GET DIAGNOSTICS n = ROW_COUNT;
    written := written + n;

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

    -- one statement may not update a row twice: the same body emitted twice to an OVERWRITE
    -- module is written once, with the last one's headers, where the first one stood
    INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status, from_task_id)
    SELECT p_app_id, d.module_id, d.body, COALESCE(d.headers, '{}'), d.to_host, d.to_slot,
           COALESCE(d.status, -1), p_from_task_id
    FROM (
        SELECT DISTINCT ON (r.module_id, r.body) r.*,
               min(r.ord) OVER (PARTITION BY r.module_id, r.body) AS first_ord
        FROM ROWS FROM (jsonb_to_recordset(p_rows) AS (module_id bigint, body text, headers jsonb, to_host text,
                                                       to_slot integer, status integer, action text))
             WITH ORDINALITY AS r (module_id, body, headers, to_host, to_slot, status, action, ord)
        WHERE r.action = 'OVERWRITE'
        ORDER BY r.module_id, r.body, r.ord DESC
    ) d
    ORDER BY d.first_ord
    ON CONFLICT (module_id, body_sha) DO UPDATE
    SET headers = EXCLUDED.headers, to_host = EXCLUDED.to_host, to_slot = EXCLUDED.to_slot,
        pref_host = EXCLUDED.pref_host, pref_until = EXCLUDED.pref_until, pref_partial = EXCLUDED.pref_partial,
        status = EXCLUDED.status, attempts = 0, retry_base = 0, slot_id = NULL, host = NULL, heartbeat_at = NULL,
        lease_expires_at = NULL, started_at = NULL, finished_at = NULL,
        from_task_id = EXCLUDED.from_task_id, created_at = now()
    WHERE sbx_tasks.status <> -3;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN written + n;
END;
$$;

-- Cross-database messages (0017, issue 15: one database per cluster). An app may be split over
-- clusters that each have their own database: a sink that names a module of another app in
-- another database is a remote sink (the sender module's REMOTE_SERVER + APP_ID, as in
-- Scalebox). Messages to it are written to sbx_outbox in the sender's hand-off transaction and
-- delivered by the relay (scalebox_hpc/db/outbox.py) exactly once: the receiving database keeps
-- the key of each message it took (sbx_inbox), so a retried delivery inserts nothing twice.

-- The remote sinks of each app: sink name -> the server (REMOTE_SERVER as written) and app there.
CREATE TABLE sbx_remote_sinks (
    app_id bigint NOT NULL REFERENCES sbx_apps (id) ON DELETE CASCADE,
    name text NOT NULL,
    remote text NOT NULL,
    remote_app_id bigint NOT NULL,
    PRIMARY KEY (app_id, name)
);

-- Messages (kind 'message') and control records (kind 'finish': the app was set FINISHED) on
-- their way to another database. The key there is (the sender app's uid, id): the uid is unique
-- across databases, the id within this one. Pending rows are delivered in id order per remote.
CREATE TABLE sbx_outbox (
    id bigserial PRIMARY KEY,
    app_id bigint NOT NULL REFERENCES sbx_apps (id) ON DELETE CASCADE,
    from_task_id bigint,
    remote text NOT NULL,
    remote_app_id bigint NOT NULL,
    kind text NOT NULL DEFAULT 'message' CHECK (kind IN ('message', 'finish')),
    module text,
    body text NOT NULL,
    headers jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    next_try_at timestamptz,
    last_error text
);
CREATE INDEX sbx_outbox_pending_idx ON sbx_outbox (remote, id) WHERE delivered_at IS NULL;
CREATE INDEX sbx_outbox_app_idx ON sbx_outbox (app_id, id) WHERE delivered_at IS NULL;

-- The keys of the messages this database received from others' outboxes (the idempotency keys).
CREATE TABLE sbx_inbox (
    source uuid NOT NULL,
    outbox_id bigint NOT NULL,
    app_id bigint NOT NULL REFERENCES sbx_apps (id) ON DELETE CASCADE,
    kind text NOT NULL DEFAULT 'message',
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, outbox_id)
);

-- An app set FINISHED (by a task's hand-off, `app set-finished`, or a finish record received)
-- forwards a finish record to each remote part, in the same transaction.
CREATE FUNCTION sbx_forward_finish_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sbx_outbox (app_id, remote, remote_app_id, kind, body)
    SELECT DISTINCT NEW.id, s.remote, s.remote_app_id, 'finish', COALESCE(NEW.result, '')
    FROM sbx_remote_sinks s WHERE s.app_id = NEW.id;
    RETURN NULL;
END;
$$;
CREATE TRIGGER sbx_apps_forward_finish
    AFTER UPDATE OF status ON sbx_apps
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM 'FINISHED' AND NEW.status = 'FINISHED')
    EXECUTE FUNCTION sbx_forward_finish_v1();

-- The receiving side of a delivery: p_rows is a JSON array of {source, outbox_id, app_id, module,
-- body, headers} in the sender's order. Each key not seen before is kept and its message
-- inserted into the named module of the app (by that module's CONFLICT_ACTION, FAIL taken as
-- IGNORE: a duplicate body must not block the sender's outbox forever); a key seen before is
-- skipped (a retried delivery). A module that does not exist raises (nothing is kept). Returns
-- how many keys were new.
CREATE FUNCTION sbx_receive_v1(p_rows jsonb) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    missing text;
    fresh jsonb;
    a record;
    n integer := 0;
BEGIN
    SELECT string_agg(DISTINCT format('app %s has no module %L', r.app_id, r.module), '; ') INTO missing
    FROM jsonb_to_recordset(p_rows) AS r (app_id bigint, module text)
    WHERE NOT EXISTS (SELECT 1 FROM sbx_modules m WHERE m.app_id = r.app_id AND m.name = r.module);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'cannot deliver: %', missing USING ERRCODE = 'foreign_key_violation';
    END IF;
    WITH keys AS (
        INSERT INTO sbx_inbox (source, outbox_id, app_id)
        SELECT r.source, r.outbox_id, r.app_id
        FROM jsonb_to_recordset(p_rows) AS r (source uuid, outbox_id bigint, app_id bigint)
        ORDER BY r.outbox_id
        ON CONFLICT (source, outbox_id) DO NOTHING
        RETURNING source, outbox_id
    )
    SELECT jsonb_agg(x.v ORDER BY x.ord) INTO fresh
    FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS x (v, ord)
    JOIN keys k ON k.source = (x.v ->> 'source')::uuid AND k.outbox_id = (x.v ->> 'outbox_id')::bigint;
    IF fresh IS NULL THEN
        RETURN 0;
    END IF;
    FOR a IN SELECT DISTINCT (v ->> 'app_id')::bigint AS app_id FROM jsonb_array_elements(fresh) AS v LOOP
        PERFORM sbx_insert_messages_v1(a.app_id, NULL, (
            SELECT jsonb_agg(jsonb_build_object(
                       'module_id', m.id, 'body', x.v ->> 'body', 'headers', x.v -> 'headers',
                       'action', CASE m.conflict_action WHEN 'FAIL' THEN 'IGNORE' ELSE m.conflict_action END)
                   ORDER BY x.ord)
            FROM jsonb_array_elements(fresh) WITH ORDINALITY AS x (v, ord)
            JOIN sbx_modules m ON m.app_id = a.app_id AND m.name = x.v ->> 'module'
            WHERE (x.v ->> 'app_id')::bigint = a.app_id));
        n := n + (SELECT count(*) FROM jsonb_array_elements(fresh) AS v WHERE (v ->> 'app_id')::bigint = a.app_id);
    END LOOP;
    RETURN n;
END;
$$;

-- A finish record received: the app there is set FINISHED with the sender's result once nothing
-- of it is READY or RUNNING (its queue drained). Returns 'done' (also when the key was seen
-- before or the app was FINISHED already), or 'wait' (the relay tries again later; nothing kept).
CREATE FUNCTION sbx_receive_finish_v1(p_source uuid, p_outbox_id bigint, p_app_id bigint, p_result text)
RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM sbx_inbox WHERE source = p_source AND outbox_id = p_outbox_id) THEN
        RETURN 'done';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM sbx_apps WHERE id = p_app_id) THEN
        RAISE EXCEPTION 'cannot deliver: no app %', p_app_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM sbx_apps WHERE id = p_app_id AND status = 'FINISHED')
       AND EXISTS (SELECT 1 FROM sbx_tasks WHERE app_id = p_app_id AND status IN (-1, -3)) THEN
        RETURN 'wait';
    END IF;
    INSERT INTO sbx_inbox (source, outbox_id, app_id, kind) VALUES (p_source, p_outbox_id, p_app_id, 'finish');
    UPDATE sbx_apps
    SET status = 'FINISHED', result = COALESCE(result, p_result), updated_at = now(),
        finished_at = COALESCE(finished_at, now())
    WHERE id = p_app_id AND status <> 'FINISHED';
    RETURN 'done';
END;
$$;

ALTER TABLE sbx_remote_sinks ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_remote_sinks_own ON sbx_remote_sinks USING (app_id IN (SELECT sbx_visible_apps_v1()));
ALTER TABLE sbx_outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_outbox_own ON sbx_outbox USING (app_id IN (SELECT sbx_visible_apps_v1()));
ALTER TABLE sbx_inbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_inbox_own ON sbx_inbox USING (app_id IN (SELECT sbx_visible_apps_v1()));
SELECT sbx_grant_roles_v1();

-- 0019: the outbox (0017) through the launcher's functions (0018). A launcher connected as a
-- launcher role has no table privileges: the remote sinks it routes to and the relay it runs
-- right after a hand-off that wrote to the outbox go through these SECURITY DEFINER functions,
-- limited to the apps the connected role acts on (sbx_l_own_apps_v1). The CLI uses them too
-- (one code path, whatever the role).

-- queries.sql list_remote_sinks
CREATE FUNCTION sbx_l_remote_sinks_v1(p_app_id bigint)
RETURNS TABLE (name text, remote text, remote_app_id bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY SELECT s.name, s.remote, s.remote_app_id FROM sbx_remote_sinks s
                     WHERE s.app_id = p_app_id ORDER BY s.name;
    END IF;
END;
$$;

-- queries.sql outbox_remotes: the remotes with pending rows (of one app, or of every app the
-- caller acts on), and whether one is due (its backoff over).
CREATE FUNCTION sbx_l_outbox_remotes_v1(p_app_id bigint) RETURNS TABLE (remote text, due boolean)
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT o.remote, bool_or(o.next_try_at IS NULL OR o.next_try_at <= now())
    FROM sbx_outbox o
    WHERE o.delivered_at IS NULL AND (p_app_id IS NULL OR o.app_id = p_app_id)
      AND o.app_id IN (SELECT sbx_l_own_apps_v1())
    GROUP BY o.remote
    ORDER BY o.remote
$$;

-- queries.sql outbox_pending: the oldest pending rows for a remote, in order, with the sender
-- app's uid (the key's source); only rows of the apps the caller acts on.
CREATE FUNCTION sbx_l_outbox_pending_v1(p_remote text, p_limit integer)
RETURNS TABLE (id bigint, app_id bigint, remote_app_id bigint, kind text, module text, body text,
               headers jsonb, source uuid)
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT o.id, o.app_id, o.remote_app_id, o.kind, o.module, o.body, o.headers, a.uid
    FROM sbx_outbox o JOIN sbx_apps a ON a.id = o.app_id
    WHERE o.remote = p_remote AND o.delivered_at IS NULL AND o.app_id IN (SELECT sbx_l_own_apps_v1())
    ORDER BY o.id
    LIMIT p_limit
$$;

-- queries.sql outbox_delivered
CREATE FUNCTION sbx_l_outbox_delivered_v1(p_ids bigint[]) RETURNS void
LANGUAGE sql SECURITY DEFINER AS $$
    UPDATE sbx_outbox SET delivered_at = now(), last_error = NULL
    WHERE id = ANY(p_ids) AND delivered_at IS NULL AND app_id IN (SELECT sbx_l_own_apps_v1())
$$;

-- queries.sql outbox_failed: a delivery to this remote failed; its pending rows (of the apps the
-- caller acts on) wait, with an exponential backoff of at most 5 minutes.
CREATE FUNCTION sbx_l_outbox_failed_v1(p_remote text, p_error text) RETURNS void
LANGUAGE sql SECURITY DEFINER AS $$
    UPDATE sbx_outbox
    SET attempts = attempts + 1, last_error = p_error,
        next_try_at = now() + least(interval '300 seconds', interval '1 second' * power(2, least(attempts, 9)))
    WHERE remote = p_remote AND delivered_at IS NULL AND app_id IN (SELECT sbx_l_own_apps_v1())
$$;

-- A message to a remote sink (action REMOTE, 0017) must name one of the app's own remote sinks;
-- any other message a module of the app (as in 0018).
CREATE OR REPLACE FUNCTION sbx_l_check_targets_v1(p_app_id bigint, p_rows jsonb) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM jsonb_to_recordset(COALESCE(p_rows, '[]'))
                                 AS r (module_id bigint, action text, remote text, remote_app_id bigint, module text)
               WHERE CASE WHEN r.action = 'REMOTE'
                          THEN NOT EXISTS (SELECT 1 FROM sbx_remote_sinks s
                                           WHERE s.app_id = p_app_id AND s.name = r.module AND s.remote = r.remote
                                             AND s.remote_app_id = r.remote_app_id)
                          ELSE NOT EXISTS (SELECT 1 FROM sbx_modules m
                                           WHERE m.id = r.module_id AND m.app_id = p_app_id) END) THEN
        RAISE EXCEPTION 'a message of app % names a module of another app', p_app_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END;
$$;

-- A module of a split app that no module of its part feeds gets its work from the other parts
-- (whenever they send it): its slots never count an idle poll while the app runs.
CREATE OR REPLACE FUNCTION sbx_l_module_activity_v1(p_app_id bigint, p_module_id bigint)
RETURNS TABLE (status text, cancelled boolean, active boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY
        WITH RECURSIVE upstream (id, name) AS (
            SELECT m.id, m.name FROM sbx_modules m WHERE m.id = p_module_id AND m.app_id = p_app_id
            UNION
            SELECT u.id, u.name
            FROM sbx_modules u JOIN upstream d ON d.name = ANY (u.sink_modules)
            WHERE u.app_id = p_app_id
        )
        SELECT a.status, a.cancelled,
               EXISTS (SELECT 1 FROM sbx_tasks t
                       WHERE t.app_id = a.id AND t.module_id IN (SELECT u.id FROM upstream u)
                         AND t.status IN (-1, -3))
               -- an app split over databases (0017): a module no module of this part feeds
               -- gets its work from the other parts, whenever they send it: never idle
               OR (EXISTS (SELECT 1 FROM sbx_remote_sinks s WHERE s.app_id = a.id)
                   AND NOT EXISTS (SELECT 1 FROM upstream u WHERE u.id <> p_module_id))
        FROM sbx_apps a WHERE a.id = p_app_id;
    END IF;
END;
$$;

DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace
               AND p.proname IN ('sbx_l_remote_sinks_v1', 'sbx_l_outbox_remotes_v1', 'sbx_l_outbox_pending_v1',
                                 'sbx_l_outbox_delivered_v1', 'sbx_l_outbox_failed_v1', 'sbx_l_check_targets_v1',
                                 'sbx_l_module_activity_v1') LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f.sig, current_schema());
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f.sig);
    END LOOP;
END;
$$;

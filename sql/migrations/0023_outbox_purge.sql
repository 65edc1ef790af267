-- 0023: delivered outbox rows do not pile up. A streaming app that sends to another cluster
-- writes one outbox row per message; once delivered a row is only history. Each delivery mark now
-- also deletes delivered rows of the same apps that are older than an hour (at most twice as many
-- as it marked, plus 1000, so a backlog left by an older schema drains while the table stays
-- bounded by about an hour of traffic). Pending rows are never deleted; an app's rows still go
-- with the app (ON DELETE CASCADE). The receiver's keys (sbx_inbox) make a redelivery after a
-- crash a no-op; a key is needed only while its row may be sent again, i.e. while it is pending
-- in the sender's outbox. So each delivery also tells the receiver, in its transaction, the
-- sender app's low-water mark (its lowest pending id, sbx_l_outbox_low_water_v1), and the
-- receiver forgets that sender's keys below it.

CREATE INDEX sbx_outbox_delivered_idx ON sbx_outbox (delivered_at) WHERE delivered_at IS NOT NULL;

-- queries.sql outbox_delivered
CREATE OR REPLACE FUNCTION sbx_l_outbox_delivered_v1(p_ids bigint[]) RETURNS void
LANGUAGE sql SECURITY DEFINER AS $$
    UPDATE sbx_outbox SET delivered_at = now(), last_error = NULL
    WHERE id = ANY(p_ids) AND delivered_at IS NULL AND app_id IN (SELECT sbx_l_own_apps_v1());
    DELETE FROM sbx_outbox
    WHERE id IN (SELECT o.id FROM sbx_outbox o
                 WHERE o.delivered_at < now() - interval '1 hour'
                   AND o.app_id IN (SELECT sbx_l_own_apps_v1())
                 ORDER BY o.delivered_at
                 LIMIT 1000 + 2 * coalesce(cardinality(p_ids), 0));
$$;
-- queries.sql outbox_low_water: per sender app, the lowest id still pending in its outbox (any
-- remote), 0 when none: every row below it was delivered and marked, so is never sent again,
-- and the receiver may forget its key (0023).
CREATE FUNCTION sbx_l_outbox_low_water_v1(p_app_ids bigint[])
RETURNS TABLE (source uuid, below bigint)
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT a.uid, COALESCE((SELECT min(o.id) FROM sbx_outbox o
                            WHERE o.app_id = a.id AND o.delivered_at IS NULL), 0)
    FROM sbx_apps a
    WHERE a.id = ANY(p_app_ids) AND a.id IN (SELECT sbx_l_own_apps_v1())
$$;

-- CREATE OR REPLACE keeps the grants but not the SET clause: the fixed search_path again (0018);
-- the new function's too, and no EXECUTE for PUBLIC (the roles get it from sbx_grant_roles_v1).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_outbox_delivered_v1(bigint[]) SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION sbx_l_outbox_low_water_v1(bigint[]) SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    REVOKE EXECUTE ON FUNCTION sbx_l_outbox_low_water_v1(bigint[]) FROM PUBLIC;
END;
$$;

-- 0024: delivered outbox rows do not pile up. A streaming app that sends to another cluster
-- writes one outbox row per message; once delivered a row is only history. Each delivery mark now
-- also deletes delivered rows of the same apps that are older than an hour (at most twice as many
-- as it marked, plus 1000, so a backlog left by an older schema drains while the table stays
-- bounded by about an hour of traffic). Pending rows are never deleted; an app's rows still go
-- with the app (ON DELETE CASCADE). The receiver's keys (sbx_inbox) are kept: they are what makes
-- a redelivery after a crash a no-op, and no sender says yet which it will never send again.

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
-- CREATE OR REPLACE keeps the grants but not the SET clause: the fixed search_path again (0018).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_outbox_delivered_v1(bigint[]) SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END;
$$;

-- 0009: the same body emitted twice to an OVERWRITE module in one hand-off is written once
-- (the last one's headers), instead of failing the hand-off with a CardinalityViolation.

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

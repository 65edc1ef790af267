-- 0026: sbx_tasks' foreign key (app_id, module_id) becomes statement-level triggers (see below).
ALTER TABLE sbx_tasks DROP CONSTRAINT sbx_tasks_app_id_module_id_fkey;

-- A task's app and module: checked once per statement, not per row (0026). A foreign key checks
-- each inserted row by a query of its own: of a 100,000-body submit's INSERT it took half (1.1 s
-- of 2.3 s, measured on a copy of sbx_tasks with and without it), and each message a hand-off
-- sends paid it too. The trigger does what the key did, for all rows at once: it locks the
-- modules named (KEY SHARE, as the key does: a module's delete waits for this transaction,
-- then deletes these tasks too) and refuses the statement when one row's (app_id, module_id)
-- is not a module of that app, with the key's SQLSTATE. SECURITY DEFINER as a key's check is:
-- it sees every module whatever the inserting role may read.
CREATE FUNCTION sbx_tasks_check_modules_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    bad record;
BEGIN
    PERFORM 1 FROM sbx_modules m WHERE m.id IN (SELECT n.module_id FROM new_rows n) FOR KEY SHARE OF m;
    SELECT n.app_id, n.module_id INTO bad
    FROM (SELECT DISTINCT r.app_id, r.module_id FROM new_rows r) AS n
    WHERE NOT EXISTS (SELECT 1 FROM sbx_modules m WHERE m.id = n.module_id AND m.app_id = n.app_id)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert on table "sbx_tasks" names a module that is not one of its app''s'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (app_id, module_id)=(%s, %s) is not present in table "sbx_modules".',
                                  bad.app_id, bad.module_id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER sbx_tasks_check_modules
    AFTER INSERT ON sbx_tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sbx_tasks_check_modules_v1();

-- A task never moves to another app or module (no statement sets them): what the key checked
-- on an update, refused outright. Fires only for an UPDATE that names one of the two columns.
CREATE FUNCTION sbx_tasks_keep_module_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'task % keeps its app and module', OLD.id USING ERRCODE = 'foreign_key_violation';
END;
$$;

CREATE TRIGGER sbx_tasks_keep_module
    BEFORE UPDATE OF app_id, module_id ON sbx_tasks
    FOR EACH ROW
    WHEN (NEW.app_id IS DISTINCT FROM OLD.app_id OR NEW.module_id IS DISTINCT FROM OLD.module_id)
    EXECUTE FUNCTION sbx_tasks_keep_module_v1();

-- The key's ON DELETE CASCADE: a deleted module (with its app) takes its tasks along.
CREATE FUNCTION sbx_modules_delete_tasks_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    DELETE FROM sbx_tasks t USING old_rows o WHERE t.module_id = o.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER sbx_modules_delete_tasks
    AFTER DELETE ON sbx_modules
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sbx_modules_delete_tasks_v1();

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_tasks_check_modules_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION sbx_modules_delete_tasks_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END;
$$;

-- 0016: roles and row-level security (issue 16, audit F18). Whoever owns the tables (the role that
-- ran `scalebox db init`: the single user of a private database, or a site's admin role) is not
-- subject to row security and sees everything, as before. Other roles get their powers from two
-- group roles, given by `scalebox db grant ROLE [--viewer]`:
--   sbx_user    the CLI and the launchers of a user: rows of their own apps only (sbx_apps.owner =
--               current_user, and every row that belongs to such an app), no DDL;
--   sbx_viewer  site monitoring: reads every app (no writes unless also sbx_user).
-- The roles are made here when the migrating role may create roles, else by `db grant` later
-- (CREATE ROLE needs CREATEROLE). sbx_hosts and sbx_scratch (the locality index: where files are,
-- not what a task computes) stay shared among sbx_user members.

-- Whether the caller sees every app: a member of sbx_viewer (false when the role does not exist).
CREATE FUNCTION sbx_sees_all_v1() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_roles r
                   WHERE r.rolname = 'sbx_viewer' AND pg_has_role(current_user, r.oid, 'MEMBER'))
$$;

-- The ids of the apps the caller may act on (row security of sbx_apps applies inside).
CREATE FUNCTION sbx_visible_apps_v1() RETURNS SETOF bigint
LANGUAGE sql STABLE AS $$ SELECT id FROM sbx_apps $$;

ALTER TABLE sbx_apps ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_apps_own ON sbx_apps
    USING (owner = current_user OR sbx_sees_all_v1())
    WITH CHECK (owner = current_user);

ALTER TABLE sbx_modules ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_modules_own ON sbx_modules USING (app_id IN (SELECT sbx_visible_apps_v1()));
ALTER TABLE sbx_tasks ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_tasks_own ON sbx_tasks USING (app_id IN (SELECT sbx_visible_apps_v1()));
ALTER TABLE sbx_semaphores ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_semaphores_own ON sbx_semaphores USING (app_id IN (SELECT sbx_visible_apps_v1()));
ALTER TABLE sbx_variables ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_variables_own ON sbx_variables USING (app_id IN (SELECT sbx_visible_apps_v1()));
ALTER TABLE sbx_stage_jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_stage_jobs_own ON sbx_stage_jobs USING (app_id IN (SELECT sbx_visible_apps_v1()));
ALTER TABLE sbx_slurm_calls ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_slurm_calls_own ON sbx_slurm_calls
    USING (app_id IS NULL OR app_id IN (SELECT sbx_visible_apps_v1()));
ALTER TABLE sbx_slots ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_slots_own ON sbx_slots
    USING (module_id IN (SELECT id FROM sbx_modules));
ALTER TABLE sbx_task_execs ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_task_execs_own ON sbx_task_execs
    USING (EXISTS (SELECT 1 FROM sbx_tasks t WHERE t.id = task_id));
-- a view reads as its owner unless told otherwise, which would skip the policies above
ALTER VIEW sbx_usage SET (security_invoker = on);

-- The group roles, and their privileges on every sbx_ object there is now; `scalebox db grant`
-- and `db upgrade` call it again (objects of later migrations). Returns what it could not do.
CREATE FUNCTION sbx_grant_roles_v1() RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    may_create boolean := (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user);
    missing text := '';
    obj record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sbx_user') THEN
        IF may_create THEN CREATE ROLE sbx_user NOLOGIN; ELSE missing := missing || ' sbx_user'; END IF;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sbx_viewer') THEN
        IF may_create THEN CREATE ROLE sbx_viewer NOLOGIN; ELSE missing := missing || ' sbx_viewer'; END IF;
    END IF;
    IF missing <> '' THEN
        RETURN 'cannot create the role(s)' || missing || ' (CREATEROLE needed): ask the database admin';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO sbx_user, sbx_viewer', current_schema());
    FOR obj IN SELECT c.relname, c.relkind FROM pg_class c
               WHERE c.relnamespace = current_schema()::regnamespace AND c.relname LIKE 'sbx\_%'
                 AND c.relkind IN ('r', 'S', 'v') LOOP
        IF obj.relkind = 'S' THEN
            EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %I TO sbx_user', obj.relname);
        ELSIF obj.relname = 'sbx_schema_version' THEN
            EXECUTE format('GRANT SELECT ON %I TO sbx_user', obj.relname);
        ELSE
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO sbx_user', obj.relname);
        END IF;
        EXECUTE format('GRANT SELECT ON %I TO sbx_viewer', obj.relname);
    END LOOP;
    FOR obj IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
               WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'sbx\_%' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO sbx_user, sbx_viewer', obj.sig);
    END LOOP;
    RETURN '';
END;
$$;
SELECT sbx_grant_roles_v1();

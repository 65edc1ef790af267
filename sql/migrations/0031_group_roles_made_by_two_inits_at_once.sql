-- 0031: two `scalebox db init` (or `db upgrade`, `db grant`) on two databases of one server at
-- the same time no longer collide creating the group roles. Roles belong to the server: both
-- found sbx_user missing, one created it, and the other's CREATE ROLE failed ("duplicate key
-- value violates unique constraint pg_authid_rolname_index", after waiting for the first to
-- commit), so its whole init rolled back. A role made meanwhile is now taken as made.

CREATE OR REPLACE FUNCTION sbx_grant_roles_v1() RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    may_create boolean := (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user);
    missing text := '';
    obj record;
    role text;
BEGIN
    FOREACH role IN ARRAY ARRAY['sbx_user', 'sbx_viewer', 'sbx_launcher'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role) THEN
            IF NOT may_create THEN
                missing := missing || ' ' || role;
                CONTINUE;
            END IF;
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                -- (0031) roles are the server's: `db init` of another database of it made the
                -- role after the check above (unique_violation: while this one waited for it)
                NULL;
            END;
        END IF;
    END LOOP;
    IF missing <> '' THEN
        RETURN 'cannot create the role(s)' || missing || ' (CREATEROLE needed): ask the database admin';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO sbx_user, sbx_viewer, sbx_launcher', current_schema());
    FOR obj IN SELECT c.relname, c.relkind FROM pg_class c
               WHERE c.relnamespace = current_schema()::regnamespace AND c.relname LIKE 'sbx\_%'
                 AND c.relkind IN ('r', 'S', 'v') LOOP
        IF obj.relkind = 'S' THEN
            EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %I TO sbx_user', obj.relname);
        ELSIF obj.relname IN ('sbx_schema_version', 'sbx_launchers') THEN
            EXECUTE format('GRANT SELECT ON %I TO sbx_user', obj.relname);
        ELSE
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO sbx_user', obj.relname);
        END IF;
        EXECUTE format('GRANT SELECT ON %I TO sbx_viewer', obj.relname);
    END LOOP;
    FOR obj IN SELECT p.oid::regprocedure AS sig, p.proname FROM pg_proc p
               WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'sbx\_%' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO sbx_user, sbx_viewer', obj.sig);
        IF obj.proname LIKE 'sbx\_l\_%' THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO sbx_launcher', obj.sig);
        END IF;
    END LOOP;
    RETURN '';
END;
$$;

-- 0028: the two checks every launcher call makes (who the connected role acts for, whether it is
-- the admin) in PL/pgSQL. As SQL functions that are SECURITY DEFINER they are never inlined and
-- plan their query at every call: measured 0.19 ms of server time per call of
-- sbx_l_acting_owner_v1 (pg_stat_user_functions, one-task claims and hand-offs), asked by every
-- claim and hand-off through sbx_l_may_v1. PL/pgSQL keeps the plan for the session.

CREATE OR REPLACE FUNCTION sbx_l_acting_owner_v1() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    RETURN COALESCE((SELECT l.owner FROM sbx_launchers l WHERE l.role = session_user), session_user::text);
END;
$$;

CREATE OR REPLACE FUNCTION sbx_l_is_admin_v1() RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = session_user AND r.rolsuper)
        OR pg_has_role(session_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = 'sbx_apps'::regclass),
                       'MEMBER');
END;
$$;

-- (CREATE OR REPLACE resets a function's settings)
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_acting_owner_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION sbx_l_is_admin_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END;
$$;

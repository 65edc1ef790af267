-- 0018: the launcher role (issue 16, audit F18). A launcher, and the stage job that runs one,
-- needs only the queue: claim, heartbeat, hand-off, release, recovery, its slots and host, the
-- scratch index, and the task services it serves. Every query it issues goes through one of the
-- sbx_l_* functions below, SECURITY DEFINER with a fixed search_path (pg_catalog, the schema,
-- pg_temp last: set for all of them at the end), whatever role it connects as: one code path,
-- so the whole suite tests them. The group role sbx_launcher (NOLOGIN, made by
-- sbx_grant_roles_v1 when the caller may create roles) has EXECUTE on these functions and no
-- privilege on any table. A login role is bound to the owner it launches for in sbx_launchers
-- (`scalebox db grant OWNER --launcher`: role OWNER_launcher); each function acts for
-- sbx_l_acting_owner_v1() -- that binding of session_user, else session_user itself -- and
-- refuses an app of another owner. The admin (a member of the tables' owner, or a superuser)
-- acts for every app, as it may with plain SQL anyway.

-- Which login role launches for which owner. Row security with no policy for writes: only the
-- admin (the table owner) and the functions below (which run as it) change it; a role sees the
-- bindings of its own apps' launchers.
CREATE TABLE sbx_launchers (
    role text PRIMARY KEY,
    owner text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE sbx_launchers ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_launchers_read ON sbx_launchers FOR SELECT USING (owner = current_user);

-- -- the locality index per owner (sbx_hosts, sbx_scratch were shared by every sbx_user) --------

-- Each row belongs to the role whose launchers wrote it (sbx_l_acting_owner_v1): a user neither
-- reads nor forges another's host rows and scratch entries (row security for direct access; the
-- launcher functions write the acting owner's rows only), and a task prefers hosts by its app
-- owner's index only. Rows from before 0018 belong to the role that migrates (the next start-up
-- scan of each launcher rewrites its host's entries).
ALTER TABLE sbx_hosts ADD COLUMN owner text NOT NULL DEFAULT current_user;
ALTER TABLE sbx_hosts DROP CONSTRAINT sbx_hosts_pkey, ADD PRIMARY KEY (owner, name);
ALTER TABLE sbx_scratch ADD COLUMN owner text NOT NULL DEFAULT current_user;
ALTER TABLE sbx_scratch DROP CONSTRAINT sbx_scratch_pkey, ADD PRIMARY KEY (owner, key, host);
DROP INDEX sbx_scratch_host_idx;
CREATE INDEX sbx_scratch_host_idx ON sbx_scratch (owner, host);
ALTER TABLE sbx_hosts ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_hosts_own ON sbx_hosts
    USING (owner = current_user OR sbx_sees_all_v1())
    WITH CHECK (owner = current_user);
ALTER TABLE sbx_scratch ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_scratch_own ON sbx_scratch
    USING (owner = current_user OR sbx_sees_all_v1())
    WITH CHECK (owner = current_user);

DROP FUNCTION sbx_best_holder_v1(text[], text);
-- The host to prefer for these inputs: among the live hosts (and p_also, a host about to be
-- live), the one holding most of them, then most bytes; partial when it holds fewer than all.
-- Only p_owner's scratch index counts (0018: each owner's launchers index their own). No row
-- when no such host holds any.
CREATE FUNCTION sbx_best_holder_v2(p_inputs text[], p_also text, p_owner text)
RETURNS TABLE (host text, partial boolean)
LANGUAGE sql STABLE AS $$
    SELECT sc.host, count(*) < (SELECT count(DISTINCT i) FROM unnest(p_inputs) AS i)
    FROM sbx_scratch sc
    WHERE sc.owner = p_owner AND sc.key = ANY (p_inputs) AND (sc.host = p_also OR sbx_host_live(sc.host))
    GROUP BY sc.host
    ORDER BY count(*) DESC, sum(sc.bytes) DESC, sc.host
    LIMIT 1
$$;

-- On insert, the preferred host from the app owner's index (a launcher function inserts as
-- the tables' owner, whom row security does not limit)
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
    ELSIF jsonb_typeof(NEW.headers -> 'inputs') = 'array' OR m.input_regex IS NOT NULL THEN
        SELECT b.host, b.partial INTO best
        FROM sbx_best_holder_v2(sbx_task_inputs_v1(NEW.headers, NEW.body, m.input_regex), NULL,
                                (SELECT a.owner FROM sbx_apps a WHERE a.id = NEW.app_id)) AS b;
        NEW.pref_host := best.host;
        NEW.pref_partial := COALESCE(best.partial, false);
    ELSE
        NEW.pref_host := NULL;
        NEW.pref_partial := false;
    END IF;
    IF NEW.pref_host IS NOT NULL THEN
        NEW.pref_until := now() + make_interval(secs => m.locality_wait_seconds);
    END IF;
    RETURN NEW;
END;
$$;

-- Adoption from the app owner's index only
CREATE OR REPLACE FUNCTION sbx_adopt_tasks_v1(p_app_id bigint, p_host text, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH candidates AS (
        SELECT t.id, t.pref_host, sbx_task_inputs_v1(t.headers, t.body, m.input_regex) AS inputs,
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
        CROSS JOIN LATERAL (
            SELECT sc.host, count(*) < (SELECT count(DISTINCT i) FROM unnest(c.inputs) AS i) AS partial
            FROM sbx_scratch sc
            WHERE sc.key = ANY (c.inputs) AND sc.owner = (SELECT a.owner FROM sbx_apps a WHERE a.id = p_app_id)
            GROUP BY sc.host
            ORDER BY count(*) DESC, (sc.host = p_host OR sbx_host_live(sc.host)) DESC, sum(sc.bytes) DESC,
                     sc.host
            LIMIT 1
        ) AS b
        WHERE b.host IS DISTINCT FROM c.pref_host
    )
    UPDATE sbx_tasks t
    SET pref_host = a.host, pref_partial = a.partial, pref_until = now() + make_interval(secs => a.wait)
    FROM adopted a
    WHERE t.id = a.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

-- The owner the connected role acts for. session_user, not current_user: inside a SECURITY
-- DEFINER function current_user is the function's owner.
CREATE FUNCTION sbx_l_acting_owner_v1() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT COALESCE((SELECT l.owner FROM sbx_launchers l WHERE l.role = session_user), session_user::text)
$$;

-- Whether the connected role is the admin: a superuser or a member of the role owning sbx_apps.
CREATE FUNCTION sbx_l_is_admin_v1() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = session_user AND r.rolsuper)
        OR pg_has_role(session_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = 'sbx_apps'::regclass), 'MEMBER')
$$;

-- The ids of the apps the connected role acts on.
CREATE FUNCTION sbx_l_own_apps_v1() RETURNS SETOF bigint
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT a.id
    FROM sbx_apps a, (SELECT sbx_l_acting_owner_v1() AS owner, sbx_l_is_admin_v1() AS admin) c
    WHERE c.admin OR a.owner = c.owner
$$;

-- May the connected role act on this app: true; no such app: false; another owner's app:
-- insufficient_privilege, naming the roles.
CREATE FUNCTION sbx_l_may_v1(p_app_id bigint) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
DECLARE
    o text;
BEGIN
    SELECT a.owner INTO o FROM sbx_apps a WHERE a.id = p_app_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF o = sbx_l_acting_owner_v1() OR sbx_l_is_admin_v1() THEN
        RETURN true;
    END IF;
    RAISE EXCEPTION 'app % is not an app of %, for whom the database role % acts', p_app_id,
        sbx_l_acting_owner_v1(), session_user USING ERRCODE = 'insufficient_privilege';
END;
$$;

-- The app of a slot (NULL: no such slot).
CREATE FUNCTION sbx_l_slot_app_v1(p_slot_id bigint) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT m.app_id FROM sbx_slots s JOIN sbx_modules m ON m.id = s.module_id WHERE s.id = p_slot_id
$$;

-- Message rows (sbx_insert_messages_v1's format) may target the modules of their app only: a
-- module id of another app is refused (it would put a task of this app in another's module).
CREATE FUNCTION sbx_l_check_targets_v1(p_app_id bigint, p_rows jsonb) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM jsonb_to_recordset(COALESCE(p_rows, '[]')) AS r (module_id bigint)
               WHERE NOT EXISTS (SELECT 1 FROM sbx_modules m WHERE m.id = r.module_id AND m.app_id = p_app_id)) THEN
        RAISE EXCEPTION 'a message of app % names a module of another app', p_app_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END;
$$;

-- -- reads ---------------------------------------------------------------------------------

-- The schema version (schema.current_version reads it through here: a launcher role may not
-- read the table).
CREATE FUNCTION sbx_l_schema_version_v1() RETURNS integer
LANGUAGE sql STABLE SECURITY DEFINER AS $$ SELECT max(version) FROM sbx_schema_version $$;

-- The CLI's `app_exists` and `newest_app` (also a launcher's --app check and an MPI stage's
-- default app), as the caller: a role with table privileges reads sbx_apps under its row
-- security, as before; a launcher role sees the apps of the owner it acts for.
CREATE FUNCTION sbx_l_app_exists_v1(p_app_id bigint) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF has_table_privilege('sbx_apps', 'SELECT') THEN
        RETURN EXISTS (SELECT 1 FROM sbx_apps WHERE id = p_app_id);
    END IF;
    RETURN p_app_id IN (SELECT sbx_l_own_apps_v1());
END;
$$;

CREATE FUNCTION sbx_l_newest_app_v1() RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF has_table_privilege('sbx_apps', 'SELECT') THEN
        RETURN (SELECT max(id) FROM sbx_apps WHERE owner = current_user);
    END IF;
    RETURN (SELECT max(a.id) FROM sbx_l_own_apps_v1() AS a (id));
END;
$$;

CREATE FUNCTION sbx_l_app_v1(p_app_id bigint)
RETURNS TABLE (uid text, status text, cancelled boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY SELECT a.uid::text, a.status, a.cancelled FROM sbx_apps a WHERE a.id = p_app_id;
    END IF;
END;
$$;

CREATE FUNCTION sbx_l_modules_v1(p_app_id bigint)
RETURNS TABLE (id bigint, app_id bigint, name text, seq integer, sink_modules text[], conflict_action text,
               spec jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY SELECT m.id, m.app_id, m.name, m.seq, m.sink_modules, m.conflict_action, m.spec
                     FROM sbx_modules m WHERE m.app_id = p_app_id ORDER BY m.seq;
    END IF;
END;
$$;

-- queries.sql app_activity
CREATE FUNCTION sbx_l_app_activity_v1(p_app_id bigint)
RETURNS TABLE (status text, cancelled boolean, active boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY
        SELECT a.status, a.cancelled,
               EXISTS (SELECT 1 FROM sbx_tasks t WHERE t.app_id = a.id AND t.status IN (-1, -3))
        FROM sbx_apps a WHERE a.id = p_app_id;
    END IF;
END;
$$;

-- queries.sql module_activity: the module and those upstream of it have work READY or RUNNING
CREATE FUNCTION sbx_l_module_activity_v1(p_app_id bigint, p_module_id bigint)
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
        FROM sbx_apps a WHERE a.id = p_app_id;
    END IF;
END;
$$;

-- -- the claim -----------------------------------------------------------------------------

-- queries.sql claim_tasks, for a module of an app the caller acts on and slots of that module
-- (tests/integration/test_launcher_role.py checks the statement below is claim_tasks's text).
-- The statement's plan is cached by PL/pgSQL as a prepared statement's would be.
CREATE FUNCTION sbx_l_claim_v1(
    p_app_id bigint, p_module_id bigint, p_host text, p_slot_ids bigint[], p_slot_seqs integer[],
    p_wants integer[], p_limit integer, p_lease_seconds double precision)
RETURNS TABLE (id bigint, app_id bigint, module_id bigint, body text, headers jsonb, status integer,
               attempts integer, retry_base integer, claimed_by bigint, r bigint)
LANGUAGE plpgsql SECURITY DEFINER AS $$
#variable_conflict use_column
BEGIN
    IF NOT sbx_l_may_v1(p_app_id)
       OR NOT EXISTS (SELECT 1 FROM sbx_modules m WHERE m.id = p_module_id AND m.app_id = p_app_id) THEN
        RETURN;
    END IF;
    -- a slot that does not exist fails the claim's foreign key, as before (when there is a task)
    IF EXISTS (SELECT 1 FROM unnest(p_slot_ids) AS s (id)
               JOIN sbx_slots sl ON sl.id = s.id WHERE sl.module_id <> p_module_id) THEN
        RAISE EXCEPTION 'a slot of the claim is not a slot of module %', p_module_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN QUERY
    -- claim_tasks: begin
    WITH app AS (
        SELECT 1 FROM sbx_apps WHERE id = p_app_id AND status = 'RUNNING'
    ), full_sinks AS (
        SELECT 1
        FROM sbx_modules me
        JOIN sbx_modules s ON s.app_id = me.app_id AND s.name = ANY (me.sink_modules)
        WHERE me.id = p_module_id AND s.max_pending IS NOT NULL
          AND (SELECT count(*) FROM (SELECT 1 FROM sbx_tasks r
                                     WHERE r.module_id = s.id AND r.status = -1
                                     LIMIT s.max_pending) AS lim) >= s.max_pending
    ), local AS (
        SELECT t.id, t.to_slot
        FROM sbx_tasks t
        WHERE t.module_id = p_module_id
          AND t.status = -1
          AND t.pref_host = p_host
          AND (t.to_slot IS NULL OR t.to_slot = ANY (p_slot_seqs::integer[]))
          AND EXISTS (SELECT 1 FROM app)
          AND NOT EXISTS (SELECT 1 FROM full_sinks)
        ORDER BY t.pref_partial, t.id
        LIMIT p_limit
        FOR UPDATE OF t SKIP LOCKED
    ), waited AS (
        SELECT t.id, t.to_slot
        FROM sbx_tasks t
        WHERE t.module_id = p_module_id
          AND t.status = -1
          AND t.to_host IS NULL
          AND t.pref_host IS NOT NULL
          AND t.pref_until <= now()
          AND t.pref_host <> p_host
          AND (t.to_slot IS NULL OR t.to_slot = ANY (p_slot_seqs::integer[]))
          AND EXISTS (SELECT 1 FROM app)
          AND NOT EXISTS (SELECT 1 FROM full_sinks)
        ORDER BY t.pref_until, t.id
        LIMIT p_limit
        FOR UPDATE OF t SKIP LOCKED
    ), free AS (
        SELECT t.id, t.to_slot
        FROM sbx_tasks t
        WHERE t.module_id = p_module_id
          AND t.status = -1
          AND t.to_host IS NULL
          AND t.pref_host IS NULL
          AND (t.to_slot IS NULL OR t.to_slot = ANY (p_slot_seqs::integer[]))
          AND EXISTS (SELECT 1 FROM app)
          AND NOT EXISTS (SELECT 1 FROM full_sinks)
        ORDER BY t.id
        LIMIT p_limit
        FOR UPDATE OF t SKIP LOCKED
    ), candidates AS (
        SELECT id, to_slot FROM local
        UNION ALL
        SELECT id, to_slot FROM waited
        UNION ALL
        SELECT id, to_slot FROM free
        LIMIT p_limit
    ), ranked AS (
        SELECT id, to_slot, row_number() OVER () AS r FROM candidates
    ), slots AS (
        SELECT * FROM unnest(p_slot_ids::bigint[], p_slot_seqs::integer[], p_wants::integer[])
                      WITH ORDINALITY AS s (slot_id, seq, want, ord)
    ), seats AS (
        SELECT s.slot_id, row_number() OVER (ORDER BY k.k, s.ord) AS seat
        FROM slots s, generate_series(1, s.want) AS k (k)
    ), dealt AS (
        SELECT f.id, st.slot_id, f.r
        FROM (SELECT id, r, row_number() OVER (ORDER BY r) AS seat FROM ranked WHERE to_slot IS NULL) f
        JOIN seats st ON st.seat = f.seat
        UNION ALL
        SELECT r.id, (SELECT s.slot_id FROM slots s WHERE s.seq = r.to_slot ORDER BY s.ord LIMIT 1), r.r
        FROM ranked r WHERE r.to_slot IS NOT NULL
    ), claimed AS (
        UPDATE sbx_tasks t
        SET status = -3, slot_id = d.slot_id, host = p_host, attempts = t.attempts + 1,
            started_at = now(), finished_at = NULL, heartbeat_at = now(),
            lease_expires_at = now() + make_interval(secs => p_lease_seconds)
        FROM dealt d
        WHERE t.id = d.id
        RETURNING t.id, t.app_id, t.module_id, t.body, t.headers, t.status, t.attempts, t.retry_base,
                  t.slot_id AS claimed_by, d.r
    )
    SELECT * FROM claimed ORDER BY r;
    -- claim_tasks: end
END;
$$;

-- -- semaphores and variables (the claim's gate, the task services) -------------------------

CREATE FUNCTION sbx_l_semaphore_create_v1(p_app_id bigint, p_name text, p_value bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v bigint;
BEGIN
    IF NOT sbx_l_may_v1(p_app_id) THEN
        RAISE EXCEPTION 'no app %', p_app_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    INSERT INTO sbx_semaphores (app_id, name, value) VALUES (p_app_id, p_name, p_value)
    ON CONFLICT (app_id, name) DO UPDATE SET value = EXCLUDED.value
    RETURNING value INTO v;
    RETURN v;
END;
$$;

CREATE FUNCTION sbx_l_semaphore_get_v1(p_app_id bigint, p_name text) RETURNS TABLE (value bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY SELECT s.value FROM sbx_semaphores s WHERE s.app_id = p_app_id AND s.name = p_name;
    END IF;
END;
$$;

-- atomic increment/decrement (row lock); no row: no such semaphore
CREATE FUNCTION sbx_l_semaphore_add_v1(p_app_id bigint, p_name text, p_delta bigint) RETURNS TABLE (value bigint)
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY UPDATE sbx_semaphores s SET value = s.value + p_delta
                     WHERE s.app_id = p_app_id AND s.name = p_name RETURNING s.value;
    END IF;
END;
$$;

-- queries.sql semaphore_take_many: up to p_n units while the value is positive; no row: none
CREATE FUNCTION sbx_l_semaphore_take_v1(p_app_id bigint, p_name text, p_n bigint) RETURNS TABLE (taken bigint)
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY
        WITH old AS (
            SELECT s.app_id, s.name, s.value FROM sbx_semaphores s
            WHERE s.app_id = p_app_id AND s.name = p_name AND s.value > 0
            FOR UPDATE
        )
        UPDATE sbx_semaphores s SET value = s.value - least(o.value, p_n)
        FROM old o WHERE s.app_id = o.app_id AND s.name = o.name
        RETURNING least(o.value, p_n);
    END IF;
END;
$$;

CREATE FUNCTION sbx_l_semaphore_list_v1(p_app_id bigint) RETURNS TABLE (name text, value bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY SELECT s.name, s.value FROM sbx_semaphores s WHERE s.app_id = p_app_id ORDER BY s.name;
    END IF;
END;
$$;

CREATE FUNCTION sbx_l_variable_set_v1(p_app_id bigint, p_name text, p_value text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NOT sbx_l_may_v1(p_app_id) THEN
        RAISE EXCEPTION 'no app %', p_app_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    INSERT INTO sbx_variables (app_id, name, value) VALUES (p_app_id, p_name, p_value)
    ON CONFLICT (app_id, name) DO UPDATE SET value = EXCLUDED.value;
END;
$$;

CREATE FUNCTION sbx_l_variable_get_v1(p_app_id bigint, p_name text) RETURNS TABLE (value text)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY SELECT v.value FROM sbx_variables v WHERE v.app_id = p_app_id AND v.name = p_name;
    END IF;
END;
$$;

CREATE FUNCTION sbx_l_variable_list_v1(p_app_id bigint) RETURNS TABLE (name text, value text)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY SELECT v.name, v.value FROM sbx_variables v WHERE v.app_id = p_app_id ORDER BY v.name;
    END IF;
END;
$$;

-- -- hand-off, delivery ----------------------------------------------------------------------

-- sbx_complete_task_v2 for a task of an app the caller acts on; NULL (lease lost) for no such task.
CREATE FUNCTION sbx_l_complete_task_v1(
    p_task_id bigint, p_slot_id bigint, p_attempt integer, p_status integer, p_requeue boolean,
    p_exec jsonb, p_messages jsonb, p_finish_text text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    a bigint := (SELECT t.app_id FROM sbx_tasks t WHERE t.id = p_task_id);
BEGIN
    IF NOT sbx_l_may_v1(a) THEN
        RETURN NULL;
    END IF;
    PERFORM sbx_l_check_targets_v1(a, p_messages);
    RETURN sbx_complete_task_v2(p_task_id, p_slot_id, p_attempt, p_status, p_requeue, p_exec, p_messages,
                                p_finish_text);
END;
$$;

-- sbx_complete_tasks_v1 for tasks of apps the caller acts on (one of another owner refuses the batch).
CREATE FUNCTION sbx_l_complete_tasks_v1(p_rows jsonb)
RETURNS TABLE (item integer, written integer)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT t.app_id, jsonb_agg(m.msg) FILTER (WHERE m.msg IS NOT NULL) AS messages
             FROM jsonb_to_recordset(p_rows) AS x (task_id bigint, messages jsonb)
             JOIN sbx_tasks t ON t.id = x.task_id
             LEFT JOIN LATERAL jsonb_array_elements(COALESCE(x.messages, '[]')) AS m (msg) ON true
             GROUP BY t.app_id LOOP
        PERFORM sbx_l_may_v1(r.app_id);
        PERFORM sbx_l_check_targets_v1(r.app_id, r.messages);
    END LOOP;
    RETURN QUERY SELECT c.item, c.written FROM sbx_complete_tasks_v1(p_rows) AS c;
END;
$$;

-- sbx_insert_messages_v1 for an app the caller acts on (a task's `tasks.deliver`)
CREATE FUNCTION sbx_l_insert_messages_v1(p_app_id bigint, p_from_task_id bigint, p_rows jsonb) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NOT sbx_l_may_v1(p_app_id) THEN
        RAISE EXCEPTION 'no app %', p_app_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    PERFORM sbx_l_check_targets_v1(p_app_id, p_rows);
    RETURN sbx_insert_messages_v1(p_app_id, p_from_task_id, p_rows);
END;
$$;

-- -- leases: heartbeat, release, recovery -----------------------------------------------------

-- Raises unless every slot id (that exists) is of an app the caller acts on.
CREATE FUNCTION sbx_l_check_slots_v1(p_slot_ids bigint[]) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
DECLARE
    a bigint;
BEGIN
    FOR a IN SELECT DISTINCT m.app_id FROM sbx_slots s JOIN sbx_modules m ON m.id = s.module_id
             WHERE s.id = ANY (p_slot_ids) LOOP
        PERFORM sbx_l_may_v1(a);
    END LOOP;
END;
$$;

-- queries.sql heartbeat_slot
CREATE FUNCTION sbx_l_heartbeat_slot_v1(p_slot_id bigint, p_status text, p_lease_seconds double precision,
                                        p_task_ids bigint[])
RETURNS TABLE (renewed bigint, released bigint[])
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM sbx_l_check_slots_v1(ARRAY[p_slot_id]);
    RETURN QUERY
    WITH s AS (
        UPDATE sbx_slots SET heartbeat_at = now(), status = p_status
        WHERE id = p_slot_id AND sbx_slots.status NOT IN ('ERROR', 'EXITED') RETURNING sbx_slots.id
    ), ren AS (
        UPDATE sbx_tasks t
        SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => p_lease_seconds)
        WHERE t.slot_id = p_slot_id AND t.status = -3
          AND (p_task_ids IS NULL OR t.id = ANY (p_task_ids))
        RETURNING t.id
    ), stray AS (
        UPDATE sbx_tasks t
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            attempts = greatest(t.attempts - 1, 0), started_at = NULL
        WHERE t.slot_id = p_slot_id AND t.status = -3
          AND p_task_ids IS NOT NULL AND NOT (t.id = ANY (p_task_ids))
          AND t.started_at < now() - make_interval(secs => p_lease_seconds)
        RETURNING t.id
    )
    SELECT (SELECT count(*) FROM ren), ARRAY(SELECT stray.id FROM stray);
END;
$$;

-- queries.sql heartbeat_slots (the node's one heartbeat statement)
CREATE FUNCTION sbx_l_heartbeat_slots_v1(p_beats jsonb)
RETURNS TABLE (renewed bigint, released bigint[])
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM sbx_l_check_slots_v1(ARRAY(SELECT b.slot_id FROM jsonb_to_recordset(p_beats) AS b (slot_id bigint)));
    RETURN QUERY
    WITH b AS (
        SELECT * FROM jsonb_to_recordset(p_beats)
                      AS b (slot_id bigint, status text, lease_seconds float8, task_ids bigint[], waiting text,
                            output jsonb)
    ), s AS (
        UPDATE sbx_slots sl SET heartbeat_at = now(), status = b.status, waiting = b.waiting,
                                live_output = COALESCE(b.output, sl.live_output)
        FROM b WHERE sl.id = b.slot_id AND sl.status NOT IN ('ERROR', 'EXITED') RETURNING sl.id
    ), ren AS (
        UPDATE sbx_tasks t
        SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => b.lease_seconds)
        FROM b
        WHERE t.slot_id = b.slot_id AND t.status = -3 AND (b.task_ids IS NULL OR t.id = ANY (b.task_ids))
        RETURNING t.id
    ), stray AS (
        UPDATE sbx_tasks t
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            attempts = greatest(t.attempts - 1, 0), started_at = NULL
        FROM b
        WHERE t.slot_id = b.slot_id AND t.status = -3
          AND b.task_ids IS NOT NULL AND NOT (t.id = ANY (b.task_ids))
          AND t.started_at < now() - make_interval(secs => b.lease_seconds)
        RETURNING t.id
    )
    SELECT (SELECT count(*) FROM ren), ARRAY(SELECT stray.id FROM stray);
END;
$$;

-- queries.sql release_tasks (p_task_ids NULL) and release_task_ids: RUNNING tasks of a slot
-- back to READY, the attempt not counted
CREATE FUNCTION sbx_l_release_v1(p_slot_id bigint, p_task_ids bigint[]) RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM sbx_l_check_slots_v1(ARRAY[p_slot_id]);
    RETURN QUERY
    UPDATE sbx_tasks t
    SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
        attempts = greatest(t.attempts - 1, 0), started_at = NULL
    WHERE t.slot_id = p_slot_id AND t.status = -3 AND (p_task_ids IS NULL OR t.id = ANY (p_task_ids))
    RETURNING t.id;
END;
$$;

-- queries.sql recover_expired, over the apps the caller acts on (each owner's launchers recover
-- their own apps' leases, as row security made it for sbx_user members)
CREATE FUNCTION sbx_l_recover_v1() RETURNS TABLE (id bigint, status integer)
LANGUAGE plpgsql SECURITY DEFINER AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH own AS (
        SELECT sbx_l_own_apps_v1() AS app_id
    ), expired AS (
        SELECT t.id
        FROM sbx_tasks t
        WHERE t.status = -3 AND t.lease_expires_at < now()
          AND pg_postmaster_start_time() + (t.lease_expires_at - COALESCE(t.heartbeat_at, t.lease_expires_at)) < now()
          AND t.app_id IN (SELECT o.app_id FROM own o)
        ORDER BY t.lease_expires_at
        LIMIT 1000
        FOR UPDATE SKIP LOCKED
    ), recorded AS (
        INSERT INTO sbx_task_execs (task_id, attempt, slot_id, host, status, started_at, finished_at, stderr)
        SELECT t.id, t.attempts, t.slot_id, t.host, 123, COALESCE(t.started_at, now()), now(),
               'scalebox: lease expired (slot ' || COALESCE(t.slot_id::text, '?') || ' on '
               || COALESCE(t.host, '?') || ' stopped heart-beating)'
        FROM sbx_tasks t JOIN expired e ON e.id = t.id
    ), lost AS (
        UPDATE sbx_slots sl
        SET status = 'LOST', ended_at = now(), message = 'no heartbeat since ' || sl.heartbeat_at::text
        WHERE sl.status IN ('STARTING', 'READY', 'RUNNING')
          AND sl.heartbeat_at < now() - make_interval(secs => 2 * sl.heartbeat_seconds)
          AND sl.module_id IN (SELECT m.id FROM sbx_modules m WHERE m.app_id IN (SELECT o.app_id FROM own o))
    )
    UPDATE sbx_tasks t
    SET status = CASE WHEN t.attempts - t.retry_base <= m.stall_retries THEN -1 ELSE 123 END,
        finished_at = CASE WHEN t.attempts - t.retry_base <= m.stall_retries THEN NULL ELSE now() END,
        started_at = CASE WHEN t.attempts - t.retry_base <= m.stall_retries THEN NULL ELSE t.started_at END,
        slot_id = NULL, heartbeat_at = NULL, lease_expires_at = NULL
    FROM expired e, sbx_modules m
    WHERE t.id = e.id AND m.id = t.module_id
    RETURNING t.id, t.status;
END;
$$;

-- sbx_release_bound_v1 over the apps the caller acts on: bound tasks of a dead host, past
-- their locality wait, are bound no more
CREATE FUNCTION sbx_l_release_bound_v1(p_limit integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    n integer;
BEGIN
    IF sbx_l_is_admin_v1() THEN
        RETURN sbx_release_bound_v1(p_limit);
    END IF;
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
          AND t.app_id IN (SELECT sbx_l_own_apps_v1())
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

-- -- slots, hosts, the scratch index ------------------------------------------------------------

CREATE FUNCTION sbx_l_insert_slot_v1(p_module_id bigint, p_host text, p_seq integer, p_pid integer,
                                     p_work_dir text, p_heartbeat_seconds double precision) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    i bigint;
BEGIN
    IF NOT sbx_l_may_v1((SELECT m.app_id FROM sbx_modules m WHERE m.id = p_module_id)) THEN
        RAISE EXCEPTION 'no module %', p_module_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    INSERT INTO sbx_slots (module_id, host, seq, status, pid, work_dir, heartbeat_seconds)
    VALUES (p_module_id, p_host, p_seq, 'STARTING', p_pid, p_work_dir, p_heartbeat_seconds)
    RETURNING id INTO i;
    RETURN i;
END;
$$;

-- queries.sql set_slot_status
CREATE FUNCTION sbx_l_set_slot_status_v1(p_slot_id bigint, p_status text, p_message text, p_tasks_done bigint)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM sbx_l_check_slots_v1(ARRAY[p_slot_id]);
    UPDATE sbx_slots
    SET status = p_status, message = COALESCE(p_message, message), heartbeat_at = now(),
        ended_at = CASE WHEN p_status IN ('ERROR', 'EXITED') THEN now() ELSE ended_at END,
        tasks_done = tasks_done + p_tasks_done
    WHERE id = p_slot_id;
END;
$$;

CREATE FUNCTION sbx_l_upsert_host_v1(p_name text, p_info jsonb) RETURNS void
LANGUAGE sql SECURITY DEFINER AS $$
    INSERT INTO sbx_hosts (owner, name, info) VALUES (sbx_l_acting_owner_v1(), p_name, p_info)
    ON CONFLICT (owner, name) DO UPDATE SET last_seen = now(), info = EXCLUDED.info
$$;

-- queries.sql scratch_forget_host (p_replace), scratch_remove, scratch_add, in one call: files
-- gone from and now in a host's scratch, in the acting owner's index
CREATE FUNCTION sbx_l_index_scratch_v1(p_host text, p_replace boolean, p_removed text[], p_keys text[],
                                       p_bytes bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    me text := sbx_l_acting_owner_v1();
BEGIN
    IF p_replace THEN
        DELETE FROM sbx_scratch WHERE owner = me AND host = p_host;
    END IF;
    IF cardinality(p_removed) > 0 THEN
        DELETE FROM sbx_scratch WHERE owner = me AND host = p_host AND key = ANY (p_removed);
    END IF;
    IF cardinality(p_keys) > 0 THEN
        INSERT INTO sbx_scratch (owner, key, host, bytes)
        SELECT me, k, p_host, b FROM unnest(p_keys, p_bytes) AS f (k, b)
        ON CONFLICT (owner, key, host) DO UPDATE SET bytes = excluded.bytes, updated_at = now();
    END IF;
END;
$$;

-- sbx_adopt_tasks_v1 for an app the caller acts on
CREATE FUNCTION sbx_l_adopt_tasks_v1(p_app_id bigint, p_host text, p_limit integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NOT sbx_l_may_v1(p_app_id) THEN
        RETURN 0;
    END IF;
    RETURN sbx_adopt_tasks_v1(p_app_id, p_host, p_limit);
END;
$$;

-- -- a stage job's own row (its launchers' bookkeeping: drain requests, start and end, min_jobs) --

-- The app of a stage job, by its key (NULL: unknown job).
CREATE FUNCTION sbx_l_stage_job_app_v1(p_cluster text, p_slurm_job_id text) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT j.app_id FROM sbx_stage_jobs j WHERE j.cluster = p_cluster AND j.slurm_job_id = p_slurm_job_id
$$;

-- queries.sql stage_job_draining
CREATE FUNCTION sbx_l_stage_job_flags_v1(p_cluster text, p_slurm_job_id text)
RETURNS TABLE (draining boolean, end_time timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(sbx_l_stage_job_app_v1(p_cluster, p_slurm_job_id)) THEN
        RETURN QUERY SELECT j.draining, j.end_time FROM sbx_stage_jobs j
                     WHERE j.cluster = p_cluster AND j.slurm_job_id = p_slurm_job_id;
    END IF;
END;
$$;

-- queries.sql drain_stage_job: the job's id when it was not draining yet
CREATE FUNCTION sbx_l_drain_stage_job_v1(p_cluster text, p_slurm_job_id text) RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(sbx_l_stage_job_app_v1(p_cluster, p_slurm_job_id)) THEN
        RETURN QUERY UPDATE sbx_stage_jobs j SET draining = true, updated_at = now()
                     WHERE j.cluster = p_cluster AND j.slurm_job_id = p_slurm_job_id AND NOT j.draining
                     RETURNING j.id;
    END IF;
END;
$$;

-- queries.sql stage_job_started
CREATE FUNCTION sbx_l_stage_job_started_v1(p_cluster text, p_slurm_job_id text, p_alloc_cpus integer)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(sbx_l_stage_job_app_v1(p_cluster, p_slurm_job_id)) THEN
        RETURN QUERY UPDATE sbx_stage_jobs j
                     SET alloc_cpus = COALESCE(p_alloc_cpus, j.alloc_cpus), started_at = COALESCE(j.started_at, now()),
                         updated_at = now()
                     WHERE j.cluster = p_cluster AND j.slurm_job_id = p_slurm_job_id
                     RETURNING j.id;
    END IF;
END;
$$;

-- queries.sql stage_job_finished
CREATE FUNCTION sbx_l_stage_job_finished_v1(p_cluster text, p_slurm_job_id text) RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(sbx_l_stage_job_app_v1(p_cluster, p_slurm_job_id)) THEN
        RETURN QUERY UPDATE sbx_stage_jobs j SET finished_at = now(), updated_at = now()
                     WHERE j.cluster = p_cluster AND j.slurm_job_id = p_slurm_job_id
                     RETURNING j.id;
    END IF;
END;
$$;

-- queries.sql lock_stage_job_module: the job's module row, locked (NO KEY UPDATE) until the
-- caller's transaction ends
CREATE FUNCTION sbx_l_lock_stage_job_module_v1(p_cluster text, p_slurm_job_id text)
RETURNS TABLE (draining boolean, id bigint, spec jsonb, min_jobs integer, max_jobs integer)
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(sbx_l_stage_job_app_v1(p_cluster, p_slurm_job_id)) THEN
        RETURN QUERY SELECT j.draining, m.id, m.spec, m.min_jobs, m.max_jobs
                     FROM sbx_stage_jobs j JOIN sbx_modules m ON m.id = j.module_id
                     WHERE j.cluster = p_cluster AND j.slurm_job_id = p_slurm_job_id
                     FOR NO KEY UPDATE OF m;
    END IF;
END;
$$;

-- queries.sql running_stage_jobs
CREATE FUNCTION sbx_l_running_stage_jobs_v1(p_module_id bigint, p_cluster text, p_slurm_job_id text)
RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF NOT sbx_l_may_v1((SELECT m.app_id FROM sbx_modules m WHERE m.id = p_module_id)) THEN
        RETURN 0;
    END IF;
    RETURN (SELECT count(*) FROM sbx_stage_jobs j
            WHERE j.module_id = p_module_id AND j.ended_at IS NULL AND NOT j.draining
              AND (j.state = 'RUNNING' OR (j.cluster = p_cluster AND j.slurm_job_id = p_slurm_job_id)));
END;
$$;

-- Every sbx_l_ function: a fixed search_path (pg_catalog first, pg_temp last: nothing a caller
-- creates shadows a table or function), EXECUTE not for PUBLIC (sbx_grant_roles_v1 gives it to
-- sbx_launcher, sbx_user and sbx_viewer).
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'sbx\_l\_%' LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f.sig, current_schema());
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f.sig);
    END LOOP;
END;
$$;

-- The group roles (now with sbx_launcher: EXECUTE on the sbx_l_ functions, nothing else) and
-- their privileges on every sbx_ object; `scalebox db grant` and `db upgrade` call it again.
-- sbx_launchers is left out of sbx_user's writes (row security would refuse them anyway).
CREATE OR REPLACE FUNCTION sbx_grant_roles_v1() RETURNS text
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
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sbx_launcher') THEN
        IF may_create THEN CREATE ROLE sbx_launcher NOLOGIN; ELSE missing := missing || ' sbx_launcher'; END IF;
    END IF;
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

-- `scalebox db grant OWNER --launcher`: the login role p_role (made, LOGIN, when it is
-- missing and this role may create roles; its password is the admin's to set) launches for
-- p_owner: a member of sbx_launcher only, bound to p_owner in sbx_launchers. A role that is an
-- sbx_user or sbx_viewer, or owns apps, is refused (a launcher role is nothing else). Returns
-- what it could not do ('' when all was done).
CREATE FUNCTION sbx_grant_launcher_v1(p_owner text, p_role text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    missing text := sbx_grant_roles_v1();
BEGIN
    IF missing <> '' THEN
        RETURN missing;
    END IF;
    IF p_role = p_owner THEN
        RETURN 'a launcher role must not be its owner''s own role';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        IF NOT (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            RETURN 'cannot create the role ' || p_role || ' (CREATEROLE needed): ask the database admin';
        END IF;
        EXECUTE format('CREATE ROLE %I LOGIN', p_role);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname IN ('sbx_user', 'sbx_viewer')
                                           AND pg_has_role(p_role, r.oid, 'MEMBER'))
       OR EXISTS (SELECT 1 FROM sbx_apps WHERE owner = p_role)
       OR (SELECT rolsuper FROM pg_roles WHERE rolname = p_role) THEN
        RETURN 'the role ' || p_role || ' is a user of scalebox (sbx_user, sbx_viewer, an app owner or a '
            || 'superuser), not a launcher role: choose another name';
    END IF;
    EXECUTE format('GRANT sbx_launcher TO %I', p_role);
    INSERT INTO sbx_launchers (role, owner) VALUES (p_role, p_owner)
    ON CONFLICT (role) DO UPDATE SET owner = EXCLUDED.owner;
    RETURN '';
END;
$$;
SELECT sbx_grant_roles_v1();

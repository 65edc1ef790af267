-- scalebox_hpc schema, version 1. Kept equal to applying sql/migrations/*.sql in order
-- (tests/integration/test_schema.py compares the two).

CREATE TABLE sbx_schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The digest that makes bodies unique per module. convert_to() is only STABLE in general, but
-- the database encoding never changes under a table, so this wrapper is safely IMMUTABLE.
-- plpgsql, not sql (0025): an SQL function whose body is less immutable than itself is not
-- inlined, and the SQL-function executor per row cost twice the digest itself.
CREATE FUNCTION sbx_body_digest(body text) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$ BEGIN RETURN sha256(convert_to(body, 'UTF8')); END $$;

CREATE TABLE sbx_apps (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    label text,
    cluster text,
    status text NOT NULL DEFAULT 'RUNNING'
        CHECK (status IN ('INITIAL', 'RUNNING', 'PAUSED', 'FINISHED')),
    result text,
    -- set by `scalebox app cancel`: launchers kill and release what runs, and stop
    cancelled boolean NOT NULL DEFAULT false,
    spec jsonb NOT NULL,
    -- unique across databases (ids restart at 1 in each): names the app's work dirs
    uid uuid NOT NULL DEFAULT gen_random_uuid(),
    -- the app's last autoscale pass: one pass per interval across all its stage jobs
    autoscaled_at timestamptz,
    -- (0032) the app's last lease recovery: one per interval across all its launchers
    recovered_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    -- the role that created the app: the CLI's defaults act on the caller's own apps only
    owner text NOT NULL DEFAULT current_user,
    -- what every stage job of the app runs: set by its first submission, no other writer (F6)
    stage_python text,
    stage_work_root text
);
CREATE INDEX sbx_apps_owner_idx ON sbx_apps (owner, id);

CREATE TABLE sbx_modules (
    id bigserial PRIMARY KEY,
    app_id bigint NOT NULL REFERENCES sbx_apps (id) ON DELETE CASCADE,
    name text NOT NULL,
    seq integer NOT NULL,
    sink_modules text[] NOT NULL DEFAULT '{}',
    conflict_action text NOT NULL DEFAULT 'FAIL'
        CHECK (conflict_action IN ('FAIL', 'IGNORE', 'OVERWRITE')),
    -- extra attempts for a task whose slot died (status 123), from retry_rules
    stall_retries integer NOT NULL DEFAULT 2,
    -- back-pressure: while this many tasks of the module are READY, its upstream claims nothing
    max_pending integer,
    spec jsonb NOT NULL,
    -- `scalebox stage scale` overrides of slurm.min_jobs / max_jobs; last autoscale (rate limit)
    min_jobs integer,
    max_jobs integer,
    scaled_at timestamptz,
    -- delay scheduling: a task preferring another host becomes claimable anywhere after this
    locality_wait_seconds double precision NOT NULL DEFAULT 10,
    -- inputs from the body when a task has no `inputs` header (a POSIX regex; group 1 or the match)
    input_regex text,
    UNIQUE (app_id, name),
    -- what sbx_tasks' foreign key (app_id, module_id) referred to (0025; a trigger checks it since 0026)
    UNIQUE (app_id, id)
);

CREATE TABLE sbx_hosts (
    name text NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    info jsonb NOT NULL DEFAULT '{}',
    -- the role whose launchers run there (0018): each owner's hosts are their own rows
    owner text NOT NULL DEFAULT current_user,
    PRIMARY KEY (owner, name)
);

CREATE TABLE sbx_slots (
    id bigserial PRIMARY KEY,
    module_id bigint NOT NULL REFERENCES sbx_modules (id) ON DELETE CASCADE,
    host text NOT NULL,
    seq integer NOT NULL,
    status text NOT NULL DEFAULT 'STARTING'
        CHECK (status IN ('STARTING', 'READY', 'RUNNING', 'ERROR', 'EXITED', 'LOST')),
    pid integer,
    work_dir text,
    message text,
    tasks_done bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz,
    -- the slot's own heartbeat interval: it is LOST (and its host dead) after two without a beat
    heartbeat_seconds double precision NOT NULL DEFAULT 10,
    -- why a live slot claims nothing (check.sh "not now", a disk gate closed); NULL: its gates are open
    waiting text,
    -- a bounded tail of the running task's output (see migration 0010), from the heartbeat
    live_output jsonb,
    -- (0033) the lease of every RUNNING task the slot knows it holds: renewed by its beats
    -- (one row per slot, none per task); a task's own lease_expires_at is its claim's
    lease_expires_at timestamptz
);
CREATE INDEX sbx_slots_module_idx ON sbx_slots (module_id, status);
-- a host's live slots (sbx_host_live); (0032) not by heartbeat_at, so that a beat is a HOT update
CREATE INDEX sbx_slots_live_host_idx ON sbx_slots (host) WHERE status IN ('STARTING', 'READY', 'RUNNING');

CREATE TABLE sbx_tasks (
    id bigserial PRIMARY KEY,
    -- a module of that app: checked per statement by sbx_tasks_check_modules (0026; a foreign
    -- key until then, which checked each row by a query of its own)
    app_id bigint NOT NULL,
    module_id bigint NOT NULL,
    body text NOT NULL,
    -- bodies can be up to 128 KiB, beyond a btree entry: uniqueness is on the digest
    body_sha bytea GENERATED ALWAYS AS (sbx_body_digest(body)) STORED,
    headers jsonb NOT NULL DEFAULT '{}',
    status integer NOT NULL DEFAULT -1,
    -- HOST-BOUND / SLOT-BOUND dispatch, from headers to_host / to_slot
    to_host text,
    to_slot integer,
    -- location-aware dispatch: the live host holding most inputs, preferred until pref_until
    pref_host text,
    pref_until timestamptz,
    -- the preferred host holds only some of the inputs: claimed after the tasks it holds all of
    pref_partial boolean NOT NULL DEFAULT false,
    attempts integer NOT NULL DEFAULT 0,
    -- attempts before the last manual retry: the retry rules count attempts - retry_base
    retry_base integer NOT NULL DEFAULT 0,
    -- lease: who holds a RUNNING task and until when it counts as alive; the slot (a foreign
    -- key until 0027) exists when the claim sets it (sbx_l_claim_v1 checks and locks it) and
    -- is forgotten when it is deleted (sbx_slots_forget). lease_expires_at is the claim's lease;
    -- (0033) the slot's beats then renew the slot's lease (sbx_slots.lease_expires_at), not this
    slot_id bigint,
    host text,
    heartbeat_at timestamptz,
    lease_expires_at timestamptz,
    from_task_id bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    UNIQUE (module_id, body_sha)
);
-- The claim scans only READY rows of one module in id order.
CREATE INDEX sbx_tasks_ready_idx ON sbx_tasks (module_id, id) WHERE status = -1;
CREATE INDEX sbx_tasks_local_idx ON sbx_tasks (module_id, pref_host, pref_partial, id)
    WHERE status = -1 AND pref_host IS NOT NULL;
-- claims of tasks bound to and preferring no host (bound ones are in the local index of their host)
CREATE INDEX sbx_tasks_free_idx ON sbx_tasks (module_id, id)
    WHERE status = -1 AND to_host IS NULL AND pref_host IS NULL;
-- claims of tasks preferring another host, once their locality wait is over
CREATE INDEX sbx_tasks_waited_idx ON sbx_tasks (module_id, pref_until, id)
    WHERE status = -1 AND to_host IS NULL AND pref_host IS NOT NULL;
-- the hosts READY tasks are bound to (sbx_release_bound_v1)
CREATE INDEX sbx_tasks_bound_idx ON sbx_tasks (to_host) WHERE status = -1 AND to_host IS NOT NULL;
CREATE INDEX sbx_tasks_app_status_idx ON sbx_tasks (app_id, module_id, status);
-- (0032) no index on lease_expires_at: the recovery reads an app's RUNNING tasks module by
-- module (sbx_tasks_app_status_idx); since 0033 a beat writes no task row at all
-- a slot's RUNNING tasks, for its heartbeat and release (0029)
CREATE INDEX sbx_tasks_slot_idx ON sbx_tasks (slot_id) WHERE status = -3;

CREATE TABLE sbx_task_execs (
    id bigserial PRIMARY KEY,
    -- its task's (sbx_task_execs_check_tasks, sbx_tasks_delete_execs) and slot's
    -- (sbx_slots_forget): per statement since 0027, foreign keys until then
    task_id bigint NOT NULL,
    attempt integer NOT NULL,
    slot_id bigint,
    host text,
    status integer NOT NULL,
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    stdout text NOT NULL DEFAULT '',
    stderr text NOT NULL DEFAULT '',
    input_bytes bigint,
    output_bytes bigint,
    input_files jsonb NOT NULL DEFAULT '[]',
    output_files jsonb NOT NULL DEFAULT '[]',
    user_text text,
    timestamps jsonb NOT NULL DEFAULT '[]',
    -- what the run's process tree used (NULL: not measured, see README "Core-hours"): CPU
    -- seconds in user and kernel mode, the largest process's peak resident set in KiB
    cpu_user_s double precision,
    cpu_system_s double precision,
    max_rss_kb bigint
);
CREATE INDEX sbx_task_execs_task_idx ON sbx_task_execs (task_id);

CREATE TABLE sbx_semaphores (
    app_id bigint NOT NULL REFERENCES sbx_apps (id) ON DELETE CASCADE,
    name text NOT NULL,
    value bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (app_id, name)
);

CREATE TABLE sbx_variables (
    app_id bigint NOT NULL REFERENCES sbx_apps (id) ON DELETE CASCADE,
    name text NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (app_id, name)
);

-- Inserts messages as tasks. rows: JSON array of {module_id, body, headers, to_host, to_slot,
-- status, action}; action is the target module's CONFLICT_ACTION for a body that already exists:
-- FAIL raises unique_violation (the caller's transaction is lost), IGNORE keeps the old task,
-- OVERWRITE resets the old task to the new message unless it is RUNNING right now. Action
-- REMOTE (0017): a message to a module of another app in another database ({remote,
-- remote_app_id, module, body, headers}) goes to sbx_outbox, in the caller's transaction, in
-- the rows' order; the relay delivers it (scalebox_hpc/db/outbox.py).
-- Returns the rows written.
CREATE FUNCTION sbx_insert_messages_v1(p_app_id bigint, p_from_task_id bigint, p_rows jsonb)
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

-- The hand-off, in one call (one round trip, one transaction): end the run of a task this slot
-- still holds (or make it READY again for a retry), record the execution, insert the emitted
-- messages and, if asked, finish the app. Returns the messages written, or NULL when the slot
-- no longer holds the task (lease lost: nothing is written). p_attempt fences the claim: a run
-- whose task was recovered and claimed again (attempts moved on) records nothing, even when the
-- same slot holds the newer claim (an MPI farm's one slot id).
CREATE FUNCTION sbx_complete_task_v2(
    p_task_id bigint, p_slot_id bigint, p_attempt integer, p_status integer, p_requeue boolean,
    p_exec jsonb, p_messages jsonb, p_finish_text text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t sbx_tasks;
    written integer := 0;
BEGIN
    -- RUNNING as a value the planner does not see (0024): see sbx_complete_tasks_v1
    IF p_requeue THEN
        UPDATE sbx_tasks
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            started_at = NULL, finished_at = NULL
        WHERE id = p_task_id AND slot_id = p_slot_id AND status = (SELECT -3) AND attempts = p_attempt
        RETURNING * INTO t;
    ELSE
        UPDATE sbx_tasks
        SET status = p_status, finished_at = now(), lease_expires_at = NULL, heartbeat_at = now()
        WHERE id = p_task_id AND slot_id = p_slot_id AND status = (SELECT -3) AND attempts = p_attempt
        RETURNING * INTO t;
    END IF;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO sbx_task_execs
        (task_id, attempt, slot_id, host, status, started_at, finished_at, stdout, stderr,
         input_bytes, output_bytes, input_files, output_files, user_text, timestamps,
         cpu_user_s, cpu_system_s, max_rss_kb)
    SELECT p_task_id, t.attempts, p_slot_id, e.host, p_status, e.started_at, e.finished_at,
           COALESCE(e.stdout, ''), COALESCE(e.stderr, ''), e.input_bytes, e.output_bytes,
           COALESCE(e.input_files, '[]'), COALESCE(e.output_files, '[]'), e.user_text,
           COALESCE(e.timestamps, '[]'), e.cpu_user_s, e.cpu_system_s, e.max_rss_kb
    FROM jsonb_to_record(p_exec) AS e (host text, started_at timestamptz, finished_at timestamptz,
                                       stdout text, stderr text, input_bytes bigint, output_bytes bigint,
                                       input_files jsonb, output_files jsonb, user_text text,
                                       timestamps jsonb, cpu_user_s double precision,
                                       cpu_system_s double precision, max_rss_kb bigint);
    IF jsonb_array_length(p_messages) > 0 THEN
        written := sbx_insert_messages_v1(t.app_id, p_task_id, p_messages);
    END IF;
    IF p_finish_text IS NOT NULL THEN
        UPDATE sbx_apps
        SET status = 'FINISHED', result = COALESCE(result, p_finish_text), updated_at = now(),
            finished_at = COALESCE(finished_at, now())
        WHERE id = t.app_id;
    END IF;
    RETURN written;
END;
$$;

-- The hand-off of a batch in one call: p_rows is a JSON array of {ord, task_id, slot_id, attempt,
-- status, requeue, exec, messages, finish_text} (sbx_complete_task_v2's arguments per task).
-- Returns (item = ord, written) for each task recorded; a task whose lease was lost (not RUNNING,
-- another slot, or attempts moved on: the F27 fence) gets no row, or a NULL written, and nothing
-- of it is written. Each task's record stays one unit (status, execution, messages, app finish),
-- and the whole batch is one transaction. Set-based, in statements whatever the batch size: the
-- tasks that emit nothing or whose messages go to FAIL or IGNORE modules or another database's
-- outbox (0022; one statement for both since 0024), in ord order (one INSERT per action: a
-- message meets the rows of the tasks before it as one by one would, and a duplicate under FAIL
-- aborts the batch, which the caller then records task by task); those emitting to an OVERWRITE
-- module go one by one through sbx_complete_task_v2 afterwards, in ord order, because their
-- messages may reset other tasks' rows: the outcome is that of recording the others, then the
-- OVERWRITE ones, each group in order — one serial order of per-task hand-offs. A claim given
-- twice is recorded once (the first), as one by one the second would find its lease gone.
-- A hand-off batch's items (sbx_complete_tasks_v1), as the planner should see them (0027): one
-- row. jsonb_to_recordset says 100 to the planner; with a small table (a new app's first
-- hand-off) the generic plan, kept for the session, then read the table and matched it with the
-- items, rather than look each item's task up (70 ms per hand-off at 300,000 tasks until the
-- next ANALYZE). PL/pgSQL: a SQL function would be inlined, and its ROWS with it.
CREATE FUNCTION sbx_hand_off_items_v1(p_rows jsonb)
RETURNS TABLE (ord integer, task_id bigint, slot_id bigint, attempt integer, status integer, requeue boolean,
               exec jsonb, messages jsonb, finish_text text)
LANGUAGE plpgsql IMMUTABLE ROWS 1 AS $$
BEGIN
    RETURN QUERY
    SELECT x.ord, x.task_id, x.slot_id, x.attempt, x.status, x.requeue, x.exec, x.messages, x.finish_text
    FROM jsonb_to_recordset(p_rows) AS x (ord integer, task_id bigint, slot_id bigint, attempt integer,
                                          status integer, requeue boolean, exec jsonb, messages jsonb,
                                          finish_text text);
END;
$$;

CREATE FUNCTION sbx_complete_tasks_v1(p_rows jsonb)
RETURNS TABLE (item integer, written integer)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    RETURN QUERY
    WITH c AS (
        -- one item per claim: of the same claim given twice the first (the task's lease holds
        -- one claim only, so items of other attempts or slots are fenced off by the UPDATE)
        SELECT DISTINCT ON (x.task_id, x.slot_id, x.attempt) x.*
        FROM sbx_hand_off_items_v1(p_rows) AS x
        WHERE NOT jsonb_path_exists(COALESCE(x.messages, '[]'), '$[*] ? (@.action == "OVERWRITE")')
        ORDER BY x.task_id, x.slot_id, x.attempt, x.ord
    ), mine AS (
        -- (0029) the items whose task is still theirs, and none that another transaction holds:
        -- waiting for it (seen: seconds behind another node's claim statement) held the node's
        -- one session, and its other leases expired in turn. Those items are `busy` (0030)
        SELECT s.*
        FROM c s JOIN sbx_tasks t ON t.id = s.task_id
        WHERE t.slot_id = s.slot_id AND t.attempts = s.attempt AND t.status + 0 = -3
        FOR NO KEY UPDATE OF t SKIP LOCKED
    ), busy AS (
        -- (0030) the items left out of mine whose task is still theirs in this statement's
        -- snapshot: another transaction holds the row, and that one is not always taking it. A
        -- claim statement whose snapshot predates the task's claim finds the row READY there,
        -- locks its newest version, and keeps the lock to its end although its recheck left the
        -- row out (seen: 1 % of the results of 10 emulated nodes discarded, their tasks run
        -- again). Answered -1: the caller tries again shortly, and the next try records the
        -- result, or fences it off when the row was being recovered. Looked for only when an
        -- item is missing from mine (a one-time filter: no join at all otherwise).
        SELECT s.ord
        FROM c s JOIN sbx_tasks t ON t.id = s.task_id
        WHERE (SELECT count(*) FROM mine) < (SELECT count(*) FROM c)
          AND t.slot_id = s.slot_id AND t.attempts = s.attempt AND t.status + 0 = -3
          AND s.ord <> ALL (ARRAY(SELECT m.ord FROM mine m))
    ), done AS (
        UPDATE sbx_tasks t
        SET status = CASE WHEN s.requeue THEN -1 ELSE s.status END,
            slot_id = CASE WHEN s.requeue THEN NULL ELSE t.slot_id END,
            host = CASE WHEN s.requeue THEN NULL ELSE t.host END,
            heartbeat_at = CASE WHEN s.requeue THEN NULL ELSE now() END,
            started_at = CASE WHEN s.requeue THEN NULL ELSE t.started_at END,
            finished_at = CASE WHEN s.requeue THEN NULL ELSE now() END,
            lease_expires_at = NULL
        FROM mine s
        -- RUNNING is compared through an expression no index has (0027): as a literal -3 it
        -- let the planner drive the join from the partial index of RUNNING tasks (0024), as a
        -- parameter from a scan of (app_id, module_id, status) on status alone (a table without
        -- statistics yet: every item matched against every running task, 30 ms per batch of
        -- 500). Then only the primary key fits (and no sequential scan, see the settings
        -- below): an item costs the same however many tasks run or exist.
        WHERE t.id = s.task_id AND t.slot_id = s.slot_id AND t.attempts = s.attempt
          AND t.status + 0 = -3
        RETURNING s.ord, t.id, t.app_id, t.attempts, s.slot_id, s.status, s.exec, s.finish_text, s.messages
    ), execs AS (
        INSERT INTO sbx_task_execs
            (task_id, attempt, slot_id, host, status, started_at, finished_at, stdout, stderr,
             input_bytes, output_bytes, input_files, output_files, user_text, timestamps,
             cpu_user_s, cpu_system_s, max_rss_kb)
        SELECT d.id, d.attempts, d.slot_id, e.host, d.status, e.started_at, e.finished_at,
               COALESCE(e.stdout, ''), COALESCE(e.stderr, ''), e.input_bytes, e.output_bytes,
               COALESCE(e.input_files, '[]'), COALESCE(e.output_files, '[]'), e.user_text,
               COALESCE(e.timestamps, '[]'), e.cpu_user_s, e.cpu_system_s, e.max_rss_kb
        FROM done d,
             jsonb_to_record(d.exec) AS e (host text, started_at timestamptz, finished_at timestamptz,
                                           stdout text, stderr text, input_bytes bigint, output_bytes bigint,
                                           input_files jsonb, output_files jsonb, user_text text,
                                           timestamps jsonb, cpu_user_s double precision,
                                           cpu_system_s double precision, max_rss_kb bigint)
        ORDER BY d.ord
    ), msgs AS (
        SELECT d.ord, d.id AS from_task_id, d.app_id, m.*
        FROM done d,
             ROWS FROM (jsonb_to_recordset(d.messages)
                        AS (module_id bigint, body text, headers jsonb, to_host text, to_slot integer,
                            status integer, action text, remote text, remote_app_id bigint, module text))
             WITH ORDINALITY AS m (module_id, body, headers, to_host, to_slot, status, action, remote,
                                   remote_app_id, module, k)
    ), outbox AS (
        INSERT INTO sbx_outbox (app_id, from_task_id, remote, remote_app_id, module, body, headers)
        SELECT m.app_id, m.from_task_id, m.remote, m.remote_app_id, m.module, m.body, COALESCE(m.headers, '{}')
        FROM msgs m WHERE m.action = 'REMOTE'
        ORDER BY m.ord, m.k
        RETURNING sbx_outbox.from_task_id
    ), failing AS (
        INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status, from_task_id)
        SELECT m.app_id, m.module_id, m.body, COALESCE(m.headers, '{}'), m.to_host, m.to_slot,
               COALESCE(m.status, -1), m.from_task_id
        FROM msgs m WHERE m.action = 'FAIL'
        ORDER BY m.ord, m.k
        RETURNING sbx_tasks.from_task_id
    ), ignoring AS (
        INSERT INTO sbx_tasks (app_id, module_id, body, headers, to_host, to_slot, status, from_task_id)
        SELECT m.app_id, m.module_id, m.body, COALESCE(m.headers, '{}'), m.to_host, m.to_slot,
               COALESCE(m.status, -1), m.from_task_id
        FROM msgs m WHERE m.action = 'IGNORE'
        ORDER BY m.ord, m.k
        ON CONFLICT (module_id, body_sha) DO NOTHING
        RETURNING sbx_tasks.from_task_id
    ), wrote AS (
        SELECT w.from_task_id, count(*)::integer AS n
        FROM (SELECT o.from_task_id FROM outbox o UNION ALL SELECT f.from_task_id FROM failing f
              UNION ALL SELECT i.from_task_id FROM ignoring i) w
        GROUP BY w.from_task_id
    ), finished AS (
        -- the first finish text (in ord) is the app's result, as one by one
        UPDATE sbx_apps a
        SET status = 'FINISHED', result = COALESCE(a.result, f.finish_text), updated_at = now(),
            finished_at = COALESCE(a.finished_at, now())
        FROM (SELECT DISTINCT ON (d.app_id) d.app_id, d.finish_text
              FROM done d WHERE d.finish_text IS NOT NULL ORDER BY d.app_id, d.ord) f
        WHERE a.id = f.app_id
    )
    SELECT d.ord, COALESCE(w.n, 0) FROM done d LEFT JOIN wrote w ON w.from_task_id = d.id
    UNION ALL
    SELECT b.ord, -1 FROM busy b;

    FOR r IN
        SELECT x.*
        FROM jsonb_to_recordset(p_rows) AS x (ord integer, task_id bigint, slot_id bigint, attempt integer,
                                              status integer, requeue boolean, exec jsonb, messages jsonb,
                                              finish_text text)
        WHERE jsonb_path_exists(COALESCE(x.messages, '[]'), '$[*] ? (@.action == "OVERWRITE")')
        ORDER BY x.ord
    LOOP
        item := r.ord;
        written := sbx_complete_task_v2(r.task_id, r.slot_id, r.attempt, r.status, r.requeue, r.exec,
                                        COALESCE(r.messages, '[]'), r.finish_text);
        IF written IS NOT NULL THEN
            RETURN NEXT;
        END IF;
    END LOOP;
END;
$$;

-- Wake-up hints: one NOTIFY per statement and module that made tasks READY.
-- The payload is the module id; listeners still poll, so a lost hint costs latency only.
CREATE FUNCTION sbx_notify_ready_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    m bigint;
BEGIN
    FOR m IN SELECT DISTINCT module_id FROM new_rows WHERE status = -1 LOOP
        PERFORM pg_notify('sbx_tasks', m::text);
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE TRIGGER sbx_tasks_notify_insert
    AFTER INSERT ON sbx_tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sbx_notify_ready_v1();

CREATE TRIGGER sbx_tasks_notify_update
    AFTER UPDATE ON sbx_tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sbx_notify_ready_v1();

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

-- 0027: the foreign keys of sbx_tasks.slot_id, sbx_task_execs.task_id and sbx_task_execs.slot_id
-- are per statement, as the module key became in 0026. Each checked every claimed task and every
-- recorded execution by a query of its own (1,500 queries per batch of 500 no-op tasks). With
-- the hand-off's plan fix of the same migration, the database floor of benchmarks/throughput.py
-- (10,000 tasks, batches of 500, 3 runs each): claims 0.78 -> 0.63 s, hand-offs 1.52 -> 1.06 s.
-- An execution is of an existing task: locked as the key did (KEY SHARE: a delete of the task
-- waits for this transaction, then takes the execution along), refused with the key's SQLSTATE.
CREATE FUNCTION sbx_task_execs_check_tasks_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    bad bigint;
BEGIN
    -- each row's task looked up (and locked) by primary key: a lateral subquery with a locking
    -- clause is never turned into a join, so no plan kept for the session can read the whole
    -- table instead (see the claim and the hand-off below)
    SELECT n.task_id INTO bad
    FROM new_rows n
    LEFT JOIN LATERAL (SELECT t.id FROM sbx_tasks t WHERE t.id = n.task_id FOR KEY SHARE OF t) k ON true
    WHERE k.id IS NULL
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert on table "sbx_task_execs" names a task that does not exist'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (task_id)=(%s) is not present in table "sbx_tasks".', bad);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER sbx_task_execs_check_tasks
    AFTER INSERT ON sbx_task_execs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sbx_task_execs_check_tasks_v1();

-- The key's ON DELETE CASCADE: a deleted task takes its executions along.
CREATE FUNCTION sbx_tasks_delete_execs_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    DELETE FROM sbx_task_execs e USING old_rows o WHERE e.task_id = o.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER sbx_tasks_delete_execs
    AFTER DELETE ON sbx_tasks
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sbx_tasks_delete_execs_v1();

-- The keys' ON DELETE SET NULL: tasks and executions forget a deleted slot. (A slot goes with
-- its module, which takes its tasks along; this keeps a slot deleted alone from dangling.)
CREATE FUNCTION sbx_slots_forget_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    UPDATE sbx_tasks t SET slot_id = NULL WHERE t.slot_id IN (SELECT o.id FROM old_rows o);
    UPDATE sbx_task_execs e SET slot_id = NULL WHERE e.slot_id IN (SELECT o.id FROM old_rows o);
    RETURN NULL;
END;
$$;

CREATE TRIGGER sbx_slots_forget
    AFTER DELETE ON sbx_slots
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sbx_slots_forget_v1();

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_tasks_check_modules_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION sbx_modules_delete_tasks_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION sbx_task_execs_check_tasks_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION sbx_tasks_delete_execs_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION sbx_slots_forget_v1() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END;
$$;

-- Slurm stage jobs: which jobs run (or ran) each module.
CREATE TABLE sbx_stage_jobs (
    id bigserial PRIMARY KEY,
    app_id bigint NOT NULL REFERENCES sbx_apps (id) ON DELETE CASCADE,
    module_id bigint NOT NULL REFERENCES sbx_modules (id) ON DELETE CASCADE,
    slurm_job_id text NOT NULL,
    cluster text NOT NULL DEFAULT '',
    -- the Slurm state as last seen (PENDING, RUNNING, COMPLETED, TIMEOUT, ...)
    state text NOT NULL DEFAULT 'PENDING',
    -- its launchers drain (walltime signal, `stage stop`): it no longer counts as capacity
    draining boolean NOT NULL DEFAULT false,
    nodes text NOT NULL DEFAULT '',
    exit_code integer,
    reason text NOT NULL DEFAULT '',
    submitted_by text NOT NULL DEFAULT current_user,
    submitted_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz,
    UNIQUE (cluster, slurm_job_id),
    -- Slurm's EndTime while the job runs (the launchers' walltime), from the app's shared squeue
    end_time timestamptz,
    -- the CPUs allocated to the job (all its nodes), as its first node's launcher read them
    -- from SLURM_JOB_CPUS_PER_NODE at start, and when that launcher started and ended (NULL
    -- after a kill: then ended_at, when an autoscale pass saw the job end)
    alloc_cpus integer,
    started_at timestamptz,
    finished_at timestamptz,
    -- an autoscale pass scaled the job's module knowing it drains (0020): its leaving pass is
    -- then urgent only when a module still wants a job
    drain_seen boolean NOT NULL DEFAULT false
);

CREATE INDEX sbx_stage_jobs_active_idx ON sbx_stage_jobs (module_id) WHERE ended_at IS NULL;

-- The Slurm commands each autoscale pass ran, per cluster (the app's `cluster`, '' when
-- unnamed): the last minute's sum is the budget spent (SCALEBOX_SLURM_RPC_PER_MINUTE).
CREATE TABLE sbx_slurm_calls (
    id bigserial PRIMARY KEY,
    cluster text NOT NULL DEFAULT '',
    app_id bigint REFERENCES sbx_apps (id) ON DELETE SET NULL,
    at timestamptz NOT NULL DEFAULT now(),
    calls integer NOT NULL CHECK (calls >= 0)
);

CREATE INDEX sbx_slurm_calls_cluster_at_idx ON sbx_slurm_calls (cluster, at);

-- Location-aware dispatch: what each host's node-local scratch holds.
CREATE TABLE sbx_scratch (
    -- a path relative to the host's scratch root, or a dataset key
    key text NOT NULL,
    host text NOT NULL,
    bytes bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- whose launchers indexed it (0018): a task prefers hosts by its app owner's index only
    owner text NOT NULL DEFAULT current_user,
    PRIMARY KEY (owner, key, host)
);

CREATE INDEX sbx_scratch_host_idx ON sbx_scratch (owner, host);

-- A host is live while one of its slots heartbeats, judged by that slot's own heartbeat
-- interval (two intervals without a beat: dead); entries of dead hosts are ignored.
CREATE FUNCTION sbx_host_live(h text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM sbx_slots s
                   WHERE s.host = h AND s.status IN ('STARTING', 'READY', 'RUNNING')
                     AND s.heartbeat_at > now() - make_interval(secs => 2 * s.heartbeat_seconds))
$$;

-- The inputs a task names: its `inputs` header (a JSON array of keys), else what its module's
-- input_regex matches in the body (group 1, or the whole match); NULL when it names none.
CREATE FUNCTION sbx_task_inputs_v1(p_headers jsonb, p_body text, p_input_regex text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(p_headers -> 'inputs') = 'array'
            THEN ARRAY(SELECT jsonb_array_elements_text(p_headers -> 'inputs'))
        WHEN p_input_regex IS NOT NULL
            THEN array_remove(ARRAY[substring(p_body FROM p_input_regex)], NULL)
    END
$$;

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

-- On insert, each READY task gets the host it prefers until pref_until: a HOST-BOUND /
-- SLOT-BOUND task its to_host (claimable elsewhere only once that host is dead, see
-- claim_tasks); a task naming inputs the live host holding most of them (pref_partial when
-- that host holds only some). The scratch index is asked only when the task names inputs.
CREATE FUNCTION sbx_task_locality_v1() RETURNS trigger
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

-- A launcher that has just indexed its scratch adopts the READY tasks of the app (at most
-- p_limit, oldest first) that name inputs and prefer no live host: tasks queued before their
-- holders were up (e.g. submitted while the stage jobs still waited in Slurm's queue). Each
-- gets the host holding most of its inputs among every host in the scratch index (live ones
-- and p_host first at a tie), with the locality wait: a holder whose launcher starts a moment
-- later still gets its tasks, and one that never comes only delays them by the wait (then
-- anyone takes them). A task keeps its preference when the best holder is the same host.
-- Returns how many changed.
CREATE FUNCTION sbx_adopt_tasks_v1(p_app_id bigint, p_host text, p_limit integer) RETURNS integer
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

-- HOST-BOUND / SLOT-BOUND tasks whose host is dead (no slot of it heart-beats) and whose
-- locality wait is over lose their binding, so that any host takes them (they never wait
-- forever for a host that is gone). The bound hosts are found by a skip scan of
-- sbx_tasks_bound_idx (one probe per distinct host); at most p_limit tasks a call. Run with
-- lease recovery. Returns how many.
CREATE FUNCTION sbx_release_bound_v1(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
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

-- Fires only for a row it may change (0025): a row with no to_host, no pref_host, pref_partial
-- false, no `inputs` array, of a module listed in the setting sbx.plain_modules (the bulk submit
-- lists the modules of its rows that have no input_regex) would only get pref_host NULL and
-- pref_partial false, which it has. A module wrongly listed only loses locality (as if no host
-- held the inputs).
CREATE TRIGGER sbx_tasks_locality
    BEFORE INSERT ON sbx_tasks
    FOR EACH ROW
    WHEN (NEW.to_host IS NOT NULL OR NEW.pref_host IS NOT NULL OR NEW.pref_partial
          OR jsonb_typeof(NEW.headers -> 'inputs') = 'array'
          OR NOT COALESCE(NEW.module_id = ANY (string_to_array(current_setting('sbx.plain_modules', true), ',', '')::bigint[]),
                          false))
    EXECUTE FUNCTION sbx_task_locality_v1();

-- Resources per app and module, for `scalebox app show` and psql: tasks and executions, the CPU
-- the executions' process trees used (core-hours; only the executions that measured it count:
-- `measured`), their wall time, the core-hours the module's stage jobs held (allocated CPUs x
-- elapsed, a live job's up to now; NULL when no job recorded its allocation), the efficiency
-- used / allocated (NULL without allocation), and the largest peak RSS of one process (KiB).
-- LATERAL: a query of one app's rows reads that app's tasks and executions only (by index).
CREATE VIEW sbx_usage AS
SELECT m.app_id, m.id AS module_id, m.name AS module,
       t.tasks, e.executions, e.measured, e.cpu_core_hours, e.wall_hours, j.alloc_core_hours,
       CASE WHEN j.alloc_core_hours > 0 THEN COALESCE(e.cpu_core_hours, 0) / j.alloc_core_hours END AS efficiency,
       e.max_rss_kb
FROM sbx_modules m
CROSS JOIN LATERAL (SELECT count(*) AS tasks FROM sbx_tasks tk WHERE tk.module_id = m.id) t
CROSS JOIN LATERAL (
    SELECT count(*) AS executions, count(x.cpu_user_s) AS measured,
           sum(x.cpu_user_s + x.cpu_system_s) / 3600.0 AS cpu_core_hours,
           sum(extract(epoch FROM x.finished_at - x.started_at)) / 3600.0 AS wall_hours,
           max(x.max_rss_kb) AS max_rss_kb
    FROM sbx_tasks tk JOIN sbx_task_execs x ON x.task_id = tk.id
    WHERE tk.module_id = m.id) e
CROSS JOIN LATERAL (
    SELECT sum(s.alloc_cpus * extract(epoch FROM GREATEST(COALESCE(s.finished_at, s.ended_at, now()) - s.started_at,
                                                          interval '0'))) / 3600.0 AS alloc_core_hours
    FROM sbx_stage_jobs s
    WHERE s.module_id = m.id AND s.alloc_cpus IS NOT NULL AND s.started_at IS NOT NULL) j;

-- roles and row-level security (0016): see that migration for the model
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

-- the launcher role (0018): see that migration for the model
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

-- The owner the connected role acts for. session_user, not current_user: inside a SECURITY
-- DEFINER function current_user is the function's owner. PL/pgSQL (0028), as sbx_l_is_admin_v1:
-- a SQL function that is SECURITY DEFINER is never inlined and plans its query at every call
-- (0.19 ms, measured; every claim and hand-off asks), PL/pgSQL plans it once per session.
CREATE FUNCTION sbx_l_acting_owner_v1() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    RETURN COALESCE((SELECT l.owner FROM sbx_launchers l WHERE l.role = session_user), session_user::text);
END;
$$;

-- Whether the connected role is the admin: a superuser or a member of the role owning sbx_apps.
CREATE FUNCTION sbx_l_is_admin_v1() RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = session_user AND r.rolsuper)
        OR pg_has_role(session_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = 'sbx_apps'::regclass),
                       'MEMBER');
END;
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
               -- an app split over databases (0017): a module no module of this part feeds
               -- gets its work from the other parts, whenever they send it: never idle
               OR (EXISTS (SELECT 1 FROM sbx_remote_sinks s WHERE s.app_id = a.id)
                   AND NOT EXISTS (SELECT 1 FROM upstream u WHERE u.id <> p_module_id))
        FROM sbx_apps a WHERE a.id = p_app_id;
    END IF;
END;
$$;

-- -- the claim -----------------------------------------------------------------------------

-- queries.sql claim_tasks, for a module of an app the caller acts on and slots of that module
-- (tests/integration/test_launcher_role.py checks the statement below is claim_tasks's text).
-- The statement's plan is cached by PL/pgSQL as a prepared statement's would be.
-- (0030) A claim's candidates are READY in its statement's snapshot, and one whose row was
-- updated since (xmax set: another node claimed it, and it runs) is checked again in a fresh
-- snapshot before it is locked. Else the claim locked the row's newest version, its recheck
-- left it out, and the lock stayed to the claim's end: seconds on a saturated database, during
-- which the owner's heartbeat and hand-off met a held row (a heartbeat skips it, a hand-off is
-- busy: 50 emulated nodes lost leases so). VOLATILE: each call reads with a new snapshot.
CREATE FUNCTION sbx_task_still_ready_v1(p_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM sbx_tasks t WHERE t.id = p_id AND t.status = -1);
END;
$$;

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
    IF EXISTS (SELECT 1 FROM unnest(p_slot_ids) AS s (id)
               JOIN sbx_slots sl ON sl.id = s.id WHERE sl.module_id <> p_module_id) THEN
        RAISE EXCEPTION 'a slot of the claim is not a slot of module %', p_module_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- what the foreign key on sbx_tasks.slot_id did until 0027, once per claim instead of once
    -- per claimed task: the slots stay until this transaction ends (KEY SHARE); one that does
    -- not exist fails the claim below when it would take a task, as the key did
    PERFORM 1 FROM sbx_slots sl WHERE sl.id = ANY (p_slot_ids) FOR KEY SHARE OF sl;
    -- (0032) one claim of a module at a time, the next with a snapshot taken after the last one
    -- committed. 19 of 20 server connections were seen claiming at once (50 emulated nodes),
    -- each skipping the rows the others had locked, with a second look (sbx_task_still_ready_v1)
    -- at each: PostgreSQL at 1.4-1.5 of 2 cores and the fleet at half its rate. Waiting here
    -- costs no CPU, and the candidate scan below then starts past the tasks claimed before.
    PERFORM pg_advisory_xact_lock(1935827821, (p_module_id % 2147483647)::integer);
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
          AND (t.xmax = '0'::xid OR sbx_task_still_ready_v1(t.id))
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
          AND (t.xmax = '0'::xid OR sbx_task_still_ready_v1(t.id))
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
          AND (t.xmax = '0'::xid OR sbx_task_still_ready_v1(t.id))
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
    ), picked AS (
        SELECT array_agg(d.id) AS ids, array_agg(d.slot_id) AS slot_ids, array_agg(d.r) AS rs FROM dealt d
    ), claimed AS (
        -- by the ids (0027): the statement's generic plan is kept for the session, and a join with
        -- the dealt rows, planned while the table was small, read all of it per claim (a hash of a
        -- sequential scan: 200 ms per claim at 300,000 tasks until the next ANALYZE); = ANY looks
        -- each up by primary key at any size (no sequential scan: see the function's settings)
        UPDATE sbx_tasks t
        SET status = -3, slot_id = p.slot_ids[array_position(p.ids, t.id)], host = p_host,
            attempts = t.attempts + 1, started_at = now(), finished_at = NULL, heartbeat_at = now(),
            lease_expires_at = now() + make_interval(secs => p_lease_seconds)
        FROM picked p
        WHERE t.id = ANY (p.ids)
        RETURNING t.id, t.app_id, t.module_id, t.body, t.headers, t.status, t.attempts, t.retry_base,
                  t.slot_id AS claimed_by, p.rs[array_position(p.ids, t.id)] AS r
    )
    SELECT * FROM claimed ORDER BY r;
    -- claim_tasks: end
    -- (the rows claimed above are undone with the statement)
    IF FOUND AND EXISTS (SELECT 1 FROM unnest(p_slot_ids) AS s (id)
                         WHERE NOT EXISTS (SELECT 1 FROM sbx_slots sl WHERE sl.id = s.id)) THEN
        RAISE EXCEPTION 'a slot of the claim does not exist (module %)', p_module_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
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
    -- each task's app looked up by primary key (0024: as a join, a generic plan hashed the
    -- whole of sbx_tasks once per hand-off statement; LIMIT 1 keeps the lookup per item)
    FOR r IN SELECT t.app_id, jsonb_agg(m.msg) FILTER (WHERE m.msg IS NOT NULL) AS messages
             FROM jsonb_to_recordset(p_rows) AS x (task_id bigint, messages jsonb)
             CROSS JOIN LATERAL (SELECT s.app_id FROM sbx_tasks s WHERE s.id = x.task_id LIMIT 1) t
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

-- queries.sql heartbeat_slot: the node's beat of one slot that leaves why it waits (0034)
CREATE FUNCTION sbx_l_heartbeat_slot_v1(p_slot_id bigint, p_status text, p_lease_seconds double precision,
                                        p_task_ids bigint[])
RETURNS TABLE (renewed bigint, released bigint[])
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    RETURN QUERY SELECT * FROM sbx_l_heartbeat_slots_v1(jsonb_build_array(jsonb_build_object(
        'slot_id', p_slot_id, 'status', p_status, 'lease_seconds', p_lease_seconds,
        'task_ids', to_jsonb(p_task_ids), 'keep_waiting', true)));
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
                            output jsonb, keep_waiting boolean)
    ), s AS (
        -- (0033) a slot's lease is its tasks' lease: one row written per slot and beat, none per task
        UPDATE sbx_slots sl SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => b.lease_seconds),
                                status = b.status,
                                -- (0034) a beat that says nothing of why its slot waits leaves it
                                waiting = CASE WHEN b.keep_waiting THEN sl.waiting ELSE b.waiting END,
                                live_output = COALESCE(b.output, sl.live_output),
        -- (0029) a slot marked LOST that beats again was slow, not dead: it runs, so no end
        -- time and no "no heartbeat since" (seen at 50 emulated nodes: RUNNING rows with both)
                                ended_at = CASE WHEN sl.status = 'LOST' THEN NULL ELSE sl.ended_at END,
                                message = CASE WHEN sl.status = 'LOST' THEN NULL ELSE sl.message END
        FROM b WHERE sl.id = b.slot_id AND sl.status NOT IN ('ERROR', 'EXITED') RETURNING sl.id
    ), held AS (
        -- the slots' RUNNING tasks by sbx_tasks_slot_idx, read and not locked (0033)
        SELECT t.id, t.slot_id, (b.task_ids IS NULL OR t.id = ANY (b.task_ids)) AS known,
               t.started_at < now() - make_interval(secs => b.lease_seconds) AS old
        FROM b JOIN sbx_tasks t ON t.slot_id = b.slot_id
        WHERE t.status = -3
    ), strays AS (
        -- those their slot does not know, claimed over a lease ago, locked: none that another
        -- transaction holds (0029: waiting for it held the node's one session), and each checked
        -- again once locked (still RUNNING on that slot)
        SELECT t.id FROM held h JOIN sbx_tasks t ON t.id = h.id
        WHERE NOT h.known AND h.old AND t.slot_id = h.slot_id AND t.status = -3
        FOR NO KEY UPDATE OF t SKIP LOCKED
    ), stray AS (
        UPDATE sbx_tasks t
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            attempts = greatest(t.attempts - 1, 0), started_at = NULL
        FROM strays x WHERE t.id = x.id
        RETURNING t.id
    )
    SELECT (SELECT count(*) FROM held h WHERE h.known AND h.slot_id IN (SELECT s.id FROM s)),
           ARRAY(SELECT stray.id FROM stray);
END;
$$;

-- The release of launchers before 0030 (queries.sql then called it): sbx_l_release_v2's
-- released ids, the busy ones left out (not released, as before)
CREATE FUNCTION sbx_l_release_v1(p_slot_id bigint, p_task_ids bigint[]) RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    RETURN QUERY SELECT r.id FROM sbx_l_release_v2(p_slot_id, p_task_ids) AS r WHERE NOT r.busy;
END;
$$;

-- queries.sql release_tasks (p_task_ids NULL) and release_task_ids (0030): RUNNING tasks of a
-- slot back to READY, the attempt not counted; and, with busy true, those of them another
-- transaction holds (not released: the caller tries again shortly). v1 skipped those as taken,
-- but the holder may be a claim statement that only looked at the row (see
-- sbx_complete_tasks_v1's busy); such a task stayed RUNNING until its lease expired and was
-- then recovered as stalled, an attempt of its retries spent on no run.
CREATE FUNCTION sbx_l_release_v2(p_slot_id bigint, p_task_ids bigint[]) RETURNS TABLE (id bigint, busy boolean)
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM sbx_l_check_slots_v1(ARRAY[p_slot_id]);
    RETURN QUERY
    WITH mine AS (
        -- the slot's RUNNING tasks by sbx_tasks_slot_idx, and none that another transaction
        -- holds (waiting for it held the node's one session: 0029)
        SELECT t.id FROM sbx_tasks t
        WHERE t.slot_id = p_slot_id AND t.status = -3 AND (p_task_ids IS NULL OR t.id = ANY (p_task_ids))
        FOR NO KEY UPDATE OF t SKIP LOCKED
    ), gone AS (
        UPDATE sbx_tasks t
        SET status = -1, slot_id = NULL, host = NULL, heartbeat_at = NULL, lease_expires_at = NULL,
            attempts = greatest(t.attempts - 1, 0), started_at = NULL
        FROM mine m WHERE t.id = m.id
        RETURNING t.id
    )
    SELECT g.id, false FROM gone g
    UNION ALL
    -- the slot's in this statement's snapshot that mine left out: held by another transaction
    SELECT t.id, true FROM sbx_tasks t
    WHERE t.slot_id = p_slot_id AND t.status = -3 AND (p_task_ids IS NULL OR t.id = ANY (p_task_ids))
      AND t.id <> ALL (ARRAY(SELECT m.id FROM mine m));
END;
$$;

-- a launcher function: a fixed search_path, and no EXECUTE for PUBLIC (the roles get it from
-- sbx_grant_roles_v1)
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION sbx_l_release_v2(bigint, bigint[]) SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    REVOKE EXECUTE ON FUNCTION sbx_l_release_v2(bigint, bigint[]) FROM PUBLIC;
END;
$$;

-- queries.sql recover_expired, over the apps the caller acts on (each owner's launchers recover
-- their own apps' leases, as row security made it for sbx_user members); with p_every > 0 (0032)
-- only the apps nobody recovered in the last p_every seconds; p_bound_limit > 0: also unbinds the
-- READY tasks bound to a dead host and returns (NULL, NULL, unbound) last
CREATE FUNCTION sbx_l_recover_v2(p_every double precision, p_bound_limit integer)
RETURNS TABLE (id bigint, status integer, unbound integer)
LANGUAGE plpgsql SECURITY DEFINER AS $$
#variable_conflict use_column
DECLARE
    due bigint[];
BEGIN
    IF p_every > 0 THEN
        -- (0032) the apps nobody recovered for p_every seconds; one held by another recoverer is
        -- being recovered now: skipped (FOR NO KEY UPDATE: a task insert's KEY SHARE is no conflict)
        WITH free AS (
            SELECT a.id FROM sbx_apps a
            WHERE a.id IN (SELECT sbx_l_own_apps_v1())
              AND (a.recovered_at IS NULL OR a.recovered_at <= now() - make_interval(secs => p_every))
            FOR NO KEY UPDATE SKIP LOCKED
        ), marked AS (
            UPDATE sbx_apps a SET recovered_at = now() FROM free f WHERE a.id = f.id RETURNING a.id
        )
        SELECT array_agg(m.id) INTO due FROM marked m;
    ELSE
        due := ARRAY(SELECT sbx_l_own_apps_v1());
    END IF;
    IF COALESCE(cardinality(due), 0) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH expired AS (
        SELECT t.id, m.stall_retries
        FROM sbx_modules m JOIN sbx_tasks t ON t.app_id = m.app_id AND t.module_id = m.id
        -- the due apps' RUNNING tasks, module by module: every column of sbx_tasks_app_status_idx
        -- bound (an app's done tasks are not read; a second partial index of RUNNING tasks beside
        -- sbx_tasks_slot_idx made the planner pick the wrong one for the heartbeat)
        -- (0033) and its slot's, which the slot's beats renew for every task it knows: a task
        -- expires when both have (the claim's, and the slot's if it beat since and has not ended)
        LEFT JOIN sbx_slots sl ON sl.id = t.slot_id AND sl.status NOT IN ('ERROR', 'EXITED')
        WHERE m.app_id = ANY (due) AND t.status = -3 AND t.lease_expires_at < now()
          AND pg_postmaster_start_time() + (t.lease_expires_at - COALESCE(t.heartbeat_at, t.lease_expires_at)) < now()
          AND (sl.lease_expires_at IS NULL
               OR (sl.lease_expires_at < now()
                   AND pg_postmaster_start_time() + (sl.lease_expires_at - sl.heartbeat_at) < now()))
        ORDER BY t.lease_expires_at
        LIMIT 1000
        FOR UPDATE OF t SKIP LOCKED
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
          AND sl.module_id IN (SELECT m.id FROM sbx_modules m WHERE m.app_id = ANY (due))
    )
    UPDATE sbx_tasks t
    SET status = CASE WHEN t.attempts - t.retry_base <= e.stall_retries THEN -1 ELSE 123 END,
        finished_at = CASE WHEN t.attempts - t.retry_base <= e.stall_retries THEN NULL ELSE now() END,
        started_at = CASE WHEN t.attempts - t.retry_base <= e.stall_retries THEN NULL ELSE t.started_at END,
        slot_id = NULL, heartbeat_at = NULL, lease_expires_at = NULL
    FROM expired e
    WHERE t.id = e.id
    RETURNING t.id, t.status, NULL::integer;
    IF p_bound_limit > 0 THEN
        -- and the READY tasks bound to a dead host, past their locality wait, of all the
        -- caller's apps: once per recovery that found an app due
        RETURN QUERY SELECT NULL::bigint, NULL::integer, sbx_l_release_bound_v1(p_bound_limit);
    END IF;
END;
$$;

-- v1 (launchers of an older version): one body, v2's, recovering now; the bound tasks are
-- theirs to unbind with sbx_l_release_bound_v1 as before
CREATE FUNCTION sbx_l_recover_v1() RETURNS TABLE (id bigint, status integer)
LANGUAGE plpgsql SECURITY DEFINER AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT r.id, r.status FROM sbx_l_recover_v2(0, 0) r;
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

-- -- the locality index per owner (0018): see that migration ------------------------------------
ALTER TABLE sbx_hosts ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_hosts_own ON sbx_hosts
    USING (owner = current_user OR sbx_sees_all_v1())
    WITH CHECK (owner = current_user);
ALTER TABLE sbx_scratch ENABLE ROW LEVEL SECURITY;
CREATE POLICY sbx_scratch_own ON sbx_scratch
    USING (owner = current_user OR sbx_sees_all_v1())
    WITH CHECK (owner = current_user);

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
CREATE INDEX sbx_outbox_delivered_idx ON sbx_outbox (delivered_at) WHERE delivered_at IS NOT NULL;

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
-- Also deletes delivered rows older than an hour (0023): the table stays bounded by about an
-- hour of traffic; pending rows are never deleted.
CREATE FUNCTION sbx_l_outbox_delivered_v1(p_ids bigint[]) RETURNS void
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

-- queries.sql outbox_failed: a delivery to this remote failed; its pending rows (of the apps the
-- caller acts on) wait, with an exponential backoff of at most 5 minutes.
CREATE FUNCTION sbx_l_outbox_failed_v1(p_remote text, p_error text) RETURNS void
LANGUAGE sql SECURITY DEFINER AS $$
    UPDATE sbx_outbox
    SET attempts = attempts + 1, last_error = p_error,
        next_try_at = now() + least(interval '300 seconds', interval '1 second' * power(2, least(attempts, 9)))
    WHERE remote = p_remote AND delivered_at IS NULL AND app_id IN (SELECT sbx_l_own_apps_v1())
$$;

DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace
               AND p.proname IN ('sbx_l_remote_sinks_v1', 'sbx_l_outbox_remotes_v1', 'sbx_l_outbox_pending_v1',
                                 'sbx_l_outbox_delivered_v1', 'sbx_l_outbox_failed_v1', 'sbx_l_check_targets_v1',
                                 'sbx_l_module_activity_v1', 'sbx_l_outbox_low_water_v1') LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f.sig, current_schema());
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f.sig);
    END LOOP;
END;
$$;

SELECT sbx_grant_roles_v1();

-- -- the autoscale pass through the launcher's functions (0021): see that migration ------------------

-- Whether the connected role reads this app: a viewer reads every app; else sbx_l_may_v1.
CREATE FUNCTION sbx_l_reads_v1(p_app_id bigint) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = 'sbx_viewer' AND pg_has_role(session_user, r.oid, 'MEMBER'))
       AND EXISTS (SELECT 1 FROM sbx_apps a WHERE a.id = p_app_id) THEN
        RETURN true;
    END IF;
    RETURN sbx_l_may_v1(p_app_id);
END;
$$;

-- queries.sql launch_settings: mine when the app's owner is the one the role acts for
CREATE FUNCTION sbx_l_launch_settings_v1(p_app_id bigint)
RETURNS TABLE (stage_python text, stage_work_root text, owner text, mine boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_reads_v1(p_app_id) THEN
        RETURN QUERY SELECT a.stage_python, a.stage_work_root, a.owner, a.owner = sbx_l_acting_owner_v1()
                     FROM sbx_apps a WHERE a.id = p_app_id;
    END IF;
END;
$$;

-- queries.sql save_launch_settings: once; never by a launcher role (what stage jobs execute is
-- the owner's choice, made when the owner first submits: audit F6)
CREATE FUNCTION sbx_l_save_launch_settings_v1(p_app_id bigint, p_python text, p_work_root text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM sbx_launchers l WHERE l.role = session_user) THEN
        RAISE EXCEPTION 'the launcher role % may not choose the stage Python of app %', session_user, p_app_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF sbx_l_may_v1(p_app_id) THEN
        UPDATE sbx_apps SET stage_python = p_python, stage_work_root = p_work_root
        WHERE id = p_app_id AND stage_python IS NULL;
    END IF;
END;
$$;

-- queries.sql autoscale_gate: the Slurm calls counted are those of the apps the role acts on
-- (and of no app), as row security counted them for a user
CREATE FUNCTION sbx_l_autoscale_gate_v1(p_app_id bigint)
RETURNS TABLE (autoscaled_at timestamptz, now timestamptz, cluster text, calls_last_minute bigint,
               running_jobs bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY
        SELECT a.autoscaled_at, now(), COALESCE(a.cluster, ''),
               (SELECT COALESCE(sum(c.calls), 0)::bigint FROM sbx_slurm_calls c
                WHERE c.cluster = COALESCE(a.cluster, '') AND c.at > now() - interval '60 seconds'
                  AND (c.app_id IS NULL OR c.app_id IN (SELECT sbx_l_own_apps_v1()))),
               (SELECT count(*) FROM sbx_stage_jobs j
                WHERE j.app_id = a.id AND j.ended_at IS NULL AND NOT j.draining AND j.state = 'RUNNING')
        FROM sbx_apps a WHERE a.id = p_app_id;
    END IF;
END;
$$;

-- queries.sql set_app_autoscaled
CREATE FUNCTION sbx_l_set_app_autoscaled_v1(p_app_id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        UPDATE sbx_apps SET autoscaled_at = now() WHERE id = p_app_id;
    END IF;
END;
$$;

-- queries.sql lock_app_modules: the row locks last until the caller's transaction ends
CREATE FUNCTION sbx_l_lock_app_modules_v1(p_app_id bigint) RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        RETURN QUERY SELECT m.id FROM sbx_modules m WHERE m.app_id = p_app_id ORDER BY m.id FOR NO KEY UPDATE;
    END IF;
END;
$$;

-- queries.sql stage_modules
CREATE FUNCTION sbx_l_stage_modules_v1(p_app_id bigint)
RETURNS TABLE (id bigint, name text, seq integer, spec jsonb, min_jobs integer, max_jobs integer,
               scaled_at timestamptz, now timestamptz, app_status text, cancelled boolean, ready bigint,
               running bigint, live_jobs bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_reads_v1(p_app_id) THEN
        RETURN QUERY
        SELECT m.id, m.name, m.seq, m.spec, m.min_jobs, m.max_jobs, m.scaled_at, now(), a.status, a.cancelled,
               (SELECT count(*) FROM sbx_tasks t WHERE t.module_id = m.id AND t.status = -1),
               (SELECT count(*) FROM sbx_tasks t WHERE t.module_id = m.id AND t.status = -3),
               (SELECT count(*) FROM sbx_stage_jobs j
                WHERE j.module_id = m.id AND j.ended_at IS NULL AND NOT j.draining)
        FROM sbx_modules m JOIN sbx_apps a ON a.id = m.app_id
        WHERE m.app_id = p_app_id
        ORDER BY m.seq;
    END IF;
END;
$$;

-- queries.sql set_module_scaled
CREATE FUNCTION sbx_l_set_module_scaled_v1(p_module_id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1((SELECT m.app_id FROM sbx_modules m WHERE m.id = p_module_id)) THEN
        UPDATE sbx_modules SET scaled_at = now() WHERE id = p_module_id;
    END IF;
END;
$$;

-- queries.sql stage_jobs
CREATE FUNCTION sbx_l_stage_jobs_v1(p_app_id bigint, p_include_ended boolean)
RETURNS TABLE (id bigint, app_id bigint, module_id bigint, slurm_job_id text, cluster text, state text,
               draining boolean, nodes text, exit_code integer, reason text, submitted_by text,
               submitted_at timestamptz, updated_at timestamptz, ended_at timestamptz, end_time timestamptz,
               alloc_cpus integer, started_at timestamptz, finished_at timestamptz, drain_seen boolean,
               module text, submit_via jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_reads_v1(p_app_id) THEN
        RETURN QUERY
        SELECT j.id, j.app_id, j.module_id, j.slurm_job_id, j.cluster, j.state, j.draining, j.nodes, j.exit_code,
               j.reason, j.submitted_by, j.submitted_at, j.updated_at, j.ended_at, j.end_time, j.alloc_cpus,
               j.started_at, j.finished_at, j.drain_seen, m.name,
               COALESCE(m.spec->'slurm'->'submit_via', '[]'::jsonb)
        FROM sbx_stage_jobs j JOIN sbx_modules m ON m.id = j.module_id
        WHERE j.app_id = p_app_id AND (p_include_ended OR j.ended_at IS NULL)
        ORDER BY j.id DESC;
    END IF;
END;
$$;

-- queries.sql insert_stage_job: a job of one of the app's own modules
CREATE FUNCTION sbx_l_insert_stage_job_v1(p_app_id bigint, p_module_id bigint, p_slurm_job_id text, p_cluster text,
                                          p_nodes text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    new_id bigint;
BEGIN
    IF NOT sbx_l_may_v1(p_app_id)
       OR NOT EXISTS (SELECT 1 FROM sbx_modules m WHERE m.id = p_module_id AND m.app_id = p_app_id) THEN
        RAISE EXCEPTION 'module % is not a module of app %', p_module_id, p_app_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- submitted_by: the role that connected (the column's default would name the functions' owner)
    INSERT INTO sbx_stage_jobs (app_id, module_id, slurm_job_id, cluster, state, nodes, submitted_by)
    VALUES (p_app_id, p_module_id, p_slurm_job_id, p_cluster, 'PENDING', p_nodes, session_user)
    RETURNING sbx_stage_jobs.id INTO new_id;
    RETURN new_id;
END;
$$;

-- queries.sql update_stage_job
CREATE FUNCTION sbx_l_update_stage_job_v1(p_id bigint, p_state text, p_ended boolean, p_nodes text,
                                          p_exit_code integer, p_reason text, p_end_time timestamptz) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1((SELECT j.app_id FROM sbx_stage_jobs j WHERE j.id = p_id)) THEN
        UPDATE sbx_stage_jobs
        SET state = p_state, nodes = COALESCE(p_nodes, nodes), exit_code = COALESCE(p_exit_code, exit_code),
            reason = COALESCE(p_reason, reason), updated_at = now(), end_time = COALESCE(p_end_time, end_time),
            ended_at = CASE WHEN p_ended THEN COALESCE(ended_at, now()) ELSE ended_at END
        WHERE id = p_id;
    END IF;
END;
$$;

-- queries.sql stage_job_drain_seen (0020)
CREATE FUNCTION sbx_l_stage_job_drain_seen_v1(p_cluster text, p_slurm_job_id text) RETURNS SETOF boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(sbx_l_stage_job_app_v1(p_cluster, p_slurm_job_id)) THEN
        RETURN QUERY SELECT j.drain_seen FROM sbx_stage_jobs j
                     WHERE j.cluster = p_cluster AND j.slurm_job_id = p_slurm_job_id;
    END IF;
END;
$$;

-- queries.sql mark_drain_seen (0020): only jobs of the apps the role acts on
CREATE FUNCTION sbx_l_mark_drain_seen_v1(p_ids bigint[]) RETURNS void
LANGUAGE sql SECURITY DEFINER AS $$
    UPDATE sbx_stage_jobs SET drain_seen = true
    WHERE id = ANY(p_ids) AND draining AND app_id IN (SELECT sbx_l_own_apps_v1())
$$;

-- queries.sql input_holders
CREATE FUNCTION sbx_l_input_holders_v1(p_module_id bigint, p_limit integer)
RETURNS TABLE (host text, inputs bigint, bytes numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1((SELECT m.app_id FROM sbx_modules m WHERE m.id = p_module_id)) THEN
        RETURN QUERY
        SELECT sc.host, count(*), sum(sc.bytes)::numeric
        FROM (SELECT sbx_task_inputs_v1(t.headers, t.body, m.input_regex) AS inputs
              FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id
              WHERE t.module_id = p_module_id AND t.status = -1
              ORDER BY t.id
              LIMIT p_limit) AS q
        CROSS JOIN LATERAL unnest(q.inputs) AS i (key)
        JOIN sbx_scratch sc ON sc.key = i.key
          -- the app owner's index (0018: each owner's launchers index their own)
          AND sc.owner = (SELECT a.owner FROM sbx_modules m JOIN sbx_apps a ON a.id = m.app_id WHERE m.id = p_module_id)
        GROUP BY sc.host
        ORDER BY count(*) DESC, sum(sc.bytes) DESC, sc.host;
    END IF;
END;
$$;

-- queries.sql slurm_calls_by_cluster: of the apps the role acts on (and of no app)
CREATE FUNCTION sbx_l_slurm_calls_by_cluster_v1() RETURNS TABLE (cluster text, calls bigint)
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT c.cluster, sum(c.calls)::bigint FROM sbx_slurm_calls c
    WHERE c.at > now() - interval '60 seconds' AND (c.app_id IS NULL OR c.app_id IN (SELECT sbx_l_own_apps_v1()))
    GROUP BY c.cluster
$$;

-- queries.sql record_slurm_calls: counted against one of the role's apps; rows over an hour old go
CREATE FUNCTION sbx_l_record_slurm_calls_v1(p_cluster text, p_app_id bigint, p_calls integer) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF sbx_l_may_v1(p_app_id) THEN
        DELETE FROM sbx_slurm_calls WHERE at < now() - interval '1 hour';
        INSERT INTO sbx_slurm_calls (cluster, app_id, calls) VALUES (p_cluster, p_app_id, p_calls);
    END IF;
END;
$$;

DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace
               AND p.proname IN ('sbx_l_reads_v1', 'sbx_l_launch_settings_v1', 'sbx_l_save_launch_settings_v1',
                                 'sbx_l_autoscale_gate_v1', 'sbx_l_set_app_autoscaled_v1',
                                 'sbx_l_lock_app_modules_v1', 'sbx_l_stage_modules_v1', 'sbx_l_set_module_scaled_v1',
                                 'sbx_l_stage_jobs_v1', 'sbx_l_insert_stage_job_v1', 'sbx_l_update_stage_job_v1',
                                 'sbx_l_stage_job_drain_seen_v1', 'sbx_l_mark_drain_seen_v1',
                                 'sbx_l_input_holders_v1', 'sbx_l_slurm_calls_by_cluster_v1',
                                 'sbx_l_record_slurm_calls_v1') LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f.sig, current_schema());
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f.sig);
    END LOOP;
END;
$$;

-- the claim (0022): the claim and the batch hand-off plan once per session, not once per call. Measured
-- (EXPLAIN ANALYZE, 2 slots, batches of 4..50): planning the claim statement took 1.2 ms of
-- the server's CPU, executing it 0.1..0.6 ms; PL/pgSQL kept planning it per call because
-- its custom plans (LIMIT known) always looked cheaper than the generic one. The statements'
-- plans do not depend on the values (every scan is the partial index of its CTE, ordered
-- and limited; the hand-off joins by primary key), so the generic plan is the one wanted.
ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, double precision)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET plan_cache_mode = force_generic_plan;
-- (0024) and no hash or merge join in it: the generic plan guesses 100 items whatever the batch,
-- and below some 50,000 tasks it then hashed a sequential scan of sbx_tasks per statement; a
-- nested loop over the items looks each task up by primary key, at any table size
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_hashjoin = off;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_mergejoin = off;
ALTER FUNCTION sbx_l_complete_tasks_v1(jsonb) SET plan_cache_mode = force_generic_plan;
-- (0027) nor a sequential scan: a generic plan made while the table was small (a new app's first
-- hand-off) scanned all of sbx_tasks per item, and the session keeps it as the table grows
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET enable_seqscan = off;
ALTER FUNCTION sbx_l_complete_tasks_v1(jsonb) SET enable_seqscan = off;
-- and no JIT: a disabled scan costs 10^10, past jit_above_cost, and compiling the statements
-- of the functions it calls took 165 ms of a hand-off (measured); no statement here gains by it
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET jit = off;
ALTER FUNCTION sbx_l_complete_tasks_v1(jsonb) SET jit = off;
-- the claim likewise (0027): its UPDATE had hashed a sequential scan of sbx_tasks
ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, double precision)
    SET enable_seqscan = off;
ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, double precision)
    SET jit = off;
-- (0032) the node's heartbeat statement updates its slots by primary key (it had hashed a
-- sequential scan of sbx_slots: jsonb_to_recordset is guessed at 100 rows)
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_hashjoin = off;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_mergejoin = off;
ALTER FUNCTION sbx_l_heartbeat_slots_v1(jsonb) SET enable_seqscan = off;

-- (0032) no JIT in any launcher function (and so in nothing they call): their statements are short
-- OLTP ones, and an estimate gone stale or a disabled plan node (enable_seqscan = off costs
-- 10^10) can price one past jit_above_cost at any time. Each already has a SET clause
-- (search_path), so one more costs nothing per call.
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'sbx\_l\_%'
               AND NOT ('jit=off' = ANY (COALESCE(p.proconfig, '{}'))) LOOP
        EXECUTE format('ALTER FUNCTION %s SET jit = off', f.sig);
    END LOOP;
END;
$$;

SELECT sbx_grant_roles_v1();

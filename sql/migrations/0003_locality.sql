-- Location-aware dispatch: what each host's node-local scratch holds, and each READY task's
-- preferred host (the live host holding most of its inputs), claimable elsewhere after a wait.

CREATE TABLE sbx_scratch (
    -- a path relative to the host's scratch root, or a dataset key
    key text NOT NULL,
    host text NOT NULL,
    bytes bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, host)
);

CREATE INDEX sbx_scratch_host_idx ON sbx_scratch (host);

ALTER TABLE sbx_modules
    -- delay scheduling: a task preferring another host becomes claimable anywhere after this
    ADD COLUMN locality_wait_seconds double precision NOT NULL DEFAULT 10,
    -- inputs from the body when a task has no `inputs` header (a POSIX regex; group 1 or the match)
    ADD COLUMN input_regex text;

ALTER TABLE sbx_tasks
    ADD COLUMN pref_host text,
    ADD COLUMN pref_until timestamptz;

CREATE INDEX sbx_tasks_local_idx ON sbx_tasks (module_id, pref_host, id)
    WHERE status = -1 AND pref_host IS NOT NULL;

-- A host is live while one of its slots heartbeats: entries of dead hosts are ignored.
CREATE FUNCTION sbx_host_live(h text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM sbx_slots s
                   WHERE s.host = h AND s.status IN ('STARTING', 'READY', 'RUNNING')
                     AND s.heartbeat_at > now() - interval '60 seconds')
$$;

-- On insert: the live host whose scratch holds most of the task's inputs (then most bytes).
CREATE FUNCTION sbx_task_locality_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    m record;
    inputs text[];
BEGIN
    IF NEW.to_host IS NOT NULL THEN
        RETURN NEW;
    END IF;
    IF jsonb_typeof(NEW.headers -> 'inputs') = 'array' THEN
        inputs := ARRAY(SELECT jsonb_array_elements_text(NEW.headers -> 'inputs'));
    END IF;
    SELECT locality_wait_seconds, input_regex INTO m FROM sbx_modules WHERE id = NEW.module_id;
    IF inputs IS NULL AND m.input_regex IS NOT NULL THEN
        inputs := ARRAY[substring(NEW.body FROM m.input_regex)];
    END IF;
    IF inputs IS NULL OR cardinality(inputs) = 0 THEN
        RETURN NEW;
    END IF;
    SELECT sc.host INTO NEW.pref_host
    FROM sbx_scratch sc
    WHERE sc.key = ANY (inputs) AND sbx_host_live(sc.host)
    GROUP BY sc.host
    ORDER BY count(*) DESC, sum(sc.bytes) DESC, sc.host
    LIMIT 1;
    IF NEW.pref_host IS NOT NULL THEN
        NEW.pref_until := now() + make_interval(secs => m.locality_wait_seconds);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER sbx_tasks_locality
    BEFORE INSERT ON sbx_tasks
    FOR EACH ROW EXECUTE FUNCTION sbx_task_locality_v1();

-- 1. The claim's "anywhere" part in two index scans: the tasks preferring no host (oldest first),
-- and those preferring another host whose locality wait is over (longest expired first).
-- Before, one scan of every unbound READY task in id order read, and filtered out, each task
-- still within its wait on another host: an idle host beside 200k tasks preferring busy hosts
-- read them all at every claim.
DROP INDEX sbx_tasks_free_idx;
CREATE INDEX sbx_tasks_free_idx ON sbx_tasks (module_id, id)
    WHERE status = -1 AND to_host IS NULL AND pref_host IS NULL;
CREATE INDEX sbx_tasks_waited_idx ON sbx_tasks (module_id, pref_until, id)
    WHERE status = -1 AND to_host IS NULL AND pref_host IS NOT NULL;

-- 2. Adoption prefers the holder of a task's inputs even when its launcher is not up yet (see
--    below): with launchers starting one after another, the first no longer takes the tasks of
--    the others before they adopt them.
-- A launcher that has just indexed its scratch adopts the READY tasks of the app (at most
-- p_limit, oldest first) that name inputs and prefer no live host: tasks queued before their
-- holders were up (e.g. submitted while the stage jobs still waited in Slurm's queue). Each
-- gets the host holding most of its inputs among every host in the scratch index (live ones
-- and p_host first at a tie), with the locality wait: a holder whose launcher starts a moment
-- later still gets its tasks, and one that never comes only delays them by the wait (then
-- anyone takes them). A task keeps its preference when the best holder is the same host.
-- Returns how many changed.
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
            WHERE sc.key = ANY (c.inputs)
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

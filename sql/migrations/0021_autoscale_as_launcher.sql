-- 0021: the autoscale pass through the launcher's functions (issue 16). A stage job connected as
-- a launcher role (0018) has no table privileges: the reads and writes of its app's autoscale
-- pass (the gate, the modules and jobs, the marks, the launch settings, the Slurm-call counts,
-- the locality read of a submit) go through these SECURITY DEFINER functions, each limited to the
-- apps the connected role acts on (sbx_l_may_v1: another owner's app is insufficient_privilege).
-- The reads that the CLI shares (`stage list`, `doctor`) also show a viewer (sbx_viewer) every
-- app, as row security did. The CLI uses them too: one code path, whatever the role.

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

SELECT sbx_grant_roles_v1();

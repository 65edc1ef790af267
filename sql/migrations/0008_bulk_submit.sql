-- Bulk submit (issue 13): the locality trigger asks the scratch index only for a task that
-- names inputs (an `inputs` array header, or a module with input_regex). Before, every
-- insert ran sbx_best_holder_v1 with NULL inputs too — about 0.4 ms a row, planned anew each
-- time: 100 000 tasks took 40 s in this trigger alone. The result is unchanged: inputs that
-- are NULL have no holder (pref_host NULL, pref_partial false).
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
        FROM sbx_best_holder_v1(sbx_task_inputs_v1(NEW.headers, NEW.body, m.input_regex), NULL) AS b;
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

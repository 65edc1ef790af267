-- 0022: the claim and the batch hand-off plan once per session, not once per call. Measured
-- (EXPLAIN ANALYZE, 2 slots, batches of 4..50): planning the claim statement took 1.2 ms of
-- the server's CPU, executing it 0.1..0.6 ms; PL/pgSQL kept planning it per call because
-- its custom plans (LIMIT known) always looked cheaper than the generic one. The statements'
-- plans do not depend on the values (every scan is the partial index of its CTE, ordered
-- and limited; the hand-off joins by primary key), so the generic plan is the one wanted.
ALTER FUNCTION sbx_l_claim_v1(bigint, bigint, text, bigint[], integer[], integer[], integer, double precision)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION sbx_complete_tasks_v1(jsonb) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION sbx_l_complete_tasks_v1(jsonb) SET plan_cache_mode = force_generic_plan;

-- 0010: what a live slot waits for and what its running task prints, both carried by the
-- node's one heartbeat statement (no write of their own):
--  waiting: why the slot claims nothing now although it is up (check.sh said "not now", a
--           disk gate is closed); NULL while its gates are open;
--  live_output: a bounded tail of the running task's stdout and stderr, as
--           {"task_id": N, "stdout": {"end": BYTES, "text": "..."}, "stderr": {...}} (`end`: the
--           stream's size when read, `text`: its last bytes, terminal-safe; `task show --follow`
--           prints what came after what it printed). Only meaningful while task_id runs here.
ALTER TABLE sbx_slots ADD COLUMN waiting text;
ALTER TABLE sbx_slots ADD COLUMN live_output jsonb;

-- 0015: an app has an owner, and the launch settings of its stage jobs are columns (issue 16).
-- owner: the database role that created the app (current_user); the CLI's defaults (the newest
-- app, `autoscale` without --app) consider only the caller's own apps (audit F18).
-- stage_python / stage_work_root: the interpreter and work root the app's first stage job was
-- submitted with, that every later job of the app uses. They were the app variables
-- `_stage.python` and `_stage.work_root`, which any task could overwrite with `scalebox variable
-- set` and so choose the program the next stage job runs (audit F6): variables whose names start
-- with '_' are now refused, and these columns have no writer but the first submission.
ALTER TABLE sbx_apps ADD COLUMN owner text NOT NULL DEFAULT current_user;
ALTER TABLE sbx_apps ADD COLUMN stage_python text;
ALTER TABLE sbx_apps ADD COLUMN stage_work_root text;
CREATE INDEX sbx_apps_owner_idx ON sbx_apps (owner, id);

UPDATE sbx_apps a SET stage_python = p.value, stage_work_root = w.value
FROM sbx_variables p, sbx_variables w
WHERE p.app_id = a.id AND p.name = '_stage.python' AND w.app_id = a.id AND w.name = '_stage.work_root';
DELETE FROM sbx_variables WHERE name LIKE '\_%';

#!/usr/bin/env bash
# cron (scalebox standard module): one long-running task that sends the time of each tick
# (YYYY-MM-DDTHH:MM:SS, UTC) to the modules named in cron.txt, at the tick.
#   run.sh BODY HEADERS_JSON      BODY is not used (start the module with `start_task: ANY`)
# Settings (environment):
#   CRON_FILE      the path of cron.txt: lines SCHEDULE,MODULE ('@every 1m30s,mod', '*/5 * * * *,mod',
#                  '@daily,mod'); '#' starts a comment line. Or CRON_TABLE: the lines themselves.
#   CRON_DURATION  optional: end (status 0) after this long, e.g. 10m; else run until the app is FINISHED
# Each module named in cron.txt must be in this module's sink_modules. The work is in Python
# (scalebox_hpc/modules/cron/), run with the launcher's own interpreter (SCALEBOX_PYTHON): the
# module runs bare, not in a container image. Exit codes: 0 done, 10 CRON_FILE missing,
# 14 bad configuration (a bad line names its line number), 1 other; 143 on TERM.
set -euo pipefail
python=${SCALEBOX_PYTHON:-}
if [ -z "$python" ] || ! [ -x "$python" ]; then
    echo "cron: SCALEBOX_PYTHON (the launcher's Python) is not set or not executable: the cron module runs bare" >&2
    exit 14
fi
exec "$python" -u -P -m scalebox_hpc.modules.cron

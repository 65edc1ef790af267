"""An MPI farm's run.sh (on worker ranks 1..N-1, no database connection and no task-services
socket) uses semaphores and variables through rank 0's request directory: the same exit
statuses, stdout and stderr as the same run.sh run by a launcher's slot (the socket)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.launcher.launcher import LauncherConfig
from scalebox_hpc.models import Message
from scalebox_hpc.node import run_launcher
from scalebox_hpc.pipeline import load_pipeline
from tests.helpers import write_app
from tests.integration.test_mpi_local import finish, stage

pytestmark = [pytest.mark.pg]

RUN_SH = """
b=$1
rc=0; scalebox semaphore increment hits >/dev/null || rc=$?; echo "inc=$rc"
scalebox semaphore create "s-$b" 5
scalebox semaphore decrement "s-$b" 2
scalebox semaphore increment "s-$b" -- -1
scalebox semaphore increment "s-$b" +1
scalebox semaphore decrement "s-$b" 1
echo "s=$(scalebox semaphore get "s-$b")"
scalebox variable set "v-$b" "value of $b"
echo "get=$(scalebox variable get "v-$b")"
"$SCALEBOX_PYTHON" -m scalebox_hpc variable list --json | grep -F -- "\"v-$b\"" | tr -d ,
rc=0; "$SCALEBOX_PYTHON" -m scalebox_hpc variable set _x y || rc=$?; echo "py-reserved=$rc"
rc=0; scalebox variable set shared "$b" || rc=$?; echo "set=$rc"
rc=0; scalebox semaphore get hits --app 999999999 || rc=$?; echo "other-app=$rc"
rc=0; scalebox variable set _stage.python /tmp/evil || rc=$?; echo "reserved=$rc"
rc=0; scalebox semaphore get nosuch || rc=$?; echo "missing=$rc"
rc=0; scalebox semaphore increment || rc=$?; echo "usage=$rc"
rc=0; scalebox semaphore create "s-$b" notanumber || rc=$?; echo "badint=$rc"
"""

BODIES = [f"t{i}" for i in range(6)]


def make_app(dsn: str, tmp_path: Path, mpi: bool) -> int:
    app_yaml = write_app(tmp_path / ("app-mpi" if mpi else "app-slots"), f"""
        name: farm-svc
        modules:
          work:
            {"mpi: {mode: farm}" if mpi else ""}
            arguments: {{heartbeat_seconds: 4, max_idle_polls: 2, sleep_interval_seconds: 0.2}}
    """, {"work/run.sh": RUN_SH})
    with connect(dsn) as conn:
        app_id = apps.create_app(conn, load_pipeline(app_yaml))
        apps.semaphore_create(conn, app_id, "hits", 0)
        apps.add_tasks(conn, app_id, "work", [Message(b) for b in BODIES])
    return app_id


def outcome(dsn: str, app_id: int) -> dict[str, Any]:
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT t.body, t.status, e.stdout, e.stderr FROM sbx_tasks t JOIN sbx_task_execs e ON e.task_id = t.id "
            "WHERE t.app_id = %s ORDER BY e.id", (app_id,)).fetchall()
        return {
            "execs": {r["body"]: (r["status"], r["stdout"], r["stderr"].replace(str(app_id), "APP")) for r in rows},
            "hits": apps.semaphore_get(conn, app_id, "hits"),
            "semaphores": {b: apps.semaphore_get(conn, app_id, f"s-{b}") for b in BODIES},
            "variables": {k: v for k, v in apps.variable_list(conn, app_id).items() if k != "shared"},
            "shared": apps.variable_list(conn, app_id).get("shared"),
        }


def test_farm_run_sh_uses_semaphores_and_variables_as_a_slot_does(pg_dsn: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    farm_app = make_app(pg_dsn, tmp_path, mpi=True)
    out = finish(stage(pg_dsn, farm_app, "work", work, ranks=3))
    farm = outcome(pg_dsn, farm_app)
    assert farm["hits"] == 6, (farm, out[-4000:])
    assert farm["semaphores"] == dict.fromkeys(BODIES, 2)
    assert farm["variables"] == {f"v-{b}": f"value of {b}" for b in BODIES}
    assert farm["shared"] in BODIES
    first = farm["execs"]["t0"]
    assert first[0] == 0, first
    assert first[1].splitlines() == [
        "inc=0", "5", "3", "2", "3", "2", "s=2", "get=value of t0", '  "v-t0": "value of t0"', "py-reserved=1",
        "set=0",
        "other-app=1", "reserved=1", "missing=1", "usage=2", "badint=2"], first
    assert "scalebox: error: a task may only use its own app's semaphores and variables (app APP)" in first[2]
    assert "_stage.python" in first[2] and "reserved" in first[2], first[2]
    assert "Error: Missing argument 'NAME'." in first[2], first[2]
    # the request directories went with their tasks
    assert not list(work.rglob("svc-*")), list(work.rglob("svc-*"))

    # the same run.sh run by a launcher's slot (the socket path): the same results, byte for byte
    slots_app = make_app(pg_dsn, tmp_path, mpi=False)
    run_launcher(pg_dsn, LauncherConfig(app_id=slots_app, host="testhost", work_root=work, local=True,
                                        modules=("work",)))
    slots = outcome(pg_dsn, slots_app)
    assert {k: v for k, v in farm.items() if k != "shared"} == {k: v for k, v in slots.items() if k != "shared"}

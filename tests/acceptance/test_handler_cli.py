"""`scalebox run` of a pipeline whose first module is an in-slot Python handler."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.acceptance.test_cli import sbx
from tests.helpers import write_app

pytestmark = pytest.mark.pg

SPLIT = """
from scalebox_hpc.launcher.pyworker_child import HandlerTask


def split(task: HandlerTask) -> int:
    n = int(task.headers.get("n", 40))
    for i in range(n):
        task.send_message(f"part-{i}", headers={"i": i})
    with open("sink-tasks.txt", "w") as fh:  # task-exec files work as for run.sh
        fh.write("from-file\\n")
    print(f"split {task.body} into {n + 1}")
    return 0
"""


def test_a_handler_feeds_a_run_sh_module(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "app", """
        name: split
        parameters: {start_task: go}
        modules:
          split:
            handler: split.py:split
            sink_modules: [count]
          count:
            slots: [".*:2"]
    """, {"count/run.sh": 'echo "$1" >> "$WORK_DIR/seen"\n'})
    (tmp_path / "app" / "split").mkdir()
    (tmp_path / "app" / "split" / "split.py").write_text(textwrap.dedent(SPLIT))
    sbx(cli_env, "run", str(app))
    status = json.loads(sbx(cli_env, "status", "--json").stdout)
    by_module = {m["module"]: m for m in status["modules"]}
    assert (by_module["split"]["ok"], by_module["count"]["ok"]) == (1, 41)
    assert all(m["failed"] == 0 for m in status["modules"])
    seen = sorted(line for f in (tmp_path / "work").rglob("seen") for line in f.read_text().split())
    assert seen == sorted([f"part-{i}" for i in range(40)] + ["from-file"])
    [go] = [t for t in json.loads(sbx(cli_env, "task", "list", "--json").stdout) if t["body"] == "go"]
    shown = json.loads(sbx(cli_env, "task", "show", str(go["id"]), "--json").stdout)
    assert shown["execs"][0]["stdout"] == "split go into 41\n"

"""What the CLI tells a user about an app (issue 14), without a database: stuck modules, honest
app states, status names in ``-s``, YAML 1.2 TABs in pipeline files."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import click
import pytest

from scalebox_hpc.cli import StatusType
from scalebox_hpc.db.apps import ModuleCounts, StuckModule, all_work_stuck, app_state, last_line, stuck_modules
from scalebox_hpc.errors import PipelineError
from scalebox_hpc.pipeline import load_pipeline


def slot(module: str, status: str, *, live: bool | None = None, message: str | None = None) -> dict[str, Any]:
    return {"module": module, "status": status, "message": message,
            "live": status in ("STARTING", "READY", "RUNNING") if live is None else live}


def counts(name: str, **by: int) -> ModuleCounts:
    codes = {"ready": -1, "running": -3, "ok": 0, "failed": 1, "initial": -9}
    return ModuleCounts(name, {codes[k]: v for k, v in by.items()}, 0)


def test_a_module_whose_slots_all_failed_is_stuck_with_the_first_message() -> None:
    c = [counts("prep", ok=14), counts("hasher", ready=14)]
    s = [slot("prep", "EXITED"), *(slot("hasher", "ERROR", message=f"image 'x' not found ({i})") for i in range(3))]
    [stuck] = stuck_modules(c, s)
    assert stuck == StuckModule("hasher", 14, 3, 3, "image 'x' not found (0)")
    assert stuck.describe() == "hasher: all 3 slot(s) failed: image 'x' not found (0) — 14 task(s) left READY"
    assert all_work_stuck(c, [stuck])


def test_not_stuck_while_a_slot_lives_or_before_any_slot_started() -> None:
    c = [counts("hasher", ready=5)]
    assert stuck_modules(c, [slot("hasher", "ERROR", message="m"), slot("hasher", "STARTING")]) == []
    assert stuck_modules(c, []) == []  # slots not registered yet: wait
    # a slot whose launcher died (heartbeat stale) is no live slot
    [stuck] = stuck_modules(c, [slot("hasher", "RUNNING", live=False)])
    assert stuck.describe() == "hasher: no live slot (all 1 ended) — 5 task(s) left READY"
    mixed = stuck_modules(c, [slot("hasher", "ERROR", message="boom"), slot("hasher", "EXITED")])
    assert mixed[0].describe().startswith("hasher: no live slot (1 of 2 failed, the others ended): boom")


def test_a_module_without_any_slot_is_stuck_only_when_asked() -> None:
    c = [counts("total", ready=1), counts("calc", ok=4)]
    s = [slot("calc", "EXITED")]
    assert stuck_modules(c, s) == []
    [stuck] = stuck_modules(c, s, without_slots=True)
    assert stuck.describe().startswith("total: no slot runs it here (an MPI collective module runs only as ")
    assert all_work_stuck(c, [stuck])


def test_a_run_waits_while_other_work_can_still_go_on() -> None:
    s = [slot("hasher", "ERROR", message="m"), slot("prep", "READY")]
    stuck = stuck_modules([counts("hasher", ready=3)], s)
    assert not all_work_stuck([counts("prep", ready=2), counts("hasher", ready=3)], stuck)
    assert not all_work_stuck([counts("prep", running=1), counts("hasher", ready=3)], stuck)
    assert all_work_stuck([counts("prep", ok=2), counts("hasher", ready=3)], stuck)
    assert not all_work_stuck([counts("prep", ok=2)], [])


@pytest.mark.parametrize(("status", "c", "s", "expected"), [
    ("RUNNING", [counts("m", ok=3, failed=1)], [slot("m", "EXITED")], "IDLE"),
    ("RUNNING", [counts("m", ok=3)], [], "IDLE"),
    ("RUNNING", [counts("m", ready=3)], [slot("m", "ERROR")], "WAITING"),
    ("RUNNING", [counts("m", ready=3)], [slot("m", "READY")], "RUNNING"),
    ("RUNNING", [counts("m", running=1)], [], "RUNNING"),  # a launcher that died: until its lease ends
    ("RUNNING", [counts("m", ok=1)], [slot("m", "READY")], "RUNNING"),  # slots still up (idle polls)
    ("FINISHED", [counts("m", ready=3)], [], "FINISHED"),
    ("PAUSED", [counts("m", ready=3)], [], "PAUSED"),
])
def test_honest_app_state(status: str, c: list[ModuleCounts], s: list[dict[str, Any]], expected: str) -> None:
    assert app_state(status, c, s) == expected


def test_last_line() -> None:
    assert last_line("a\nb: failed\n\n  \n") == "b: failed"
    assert last_line("") == last_line(None) == ""


@pytest.mark.parametrize(("given", "expected"), [
    ("failed", "failed"), ("FAILED", "failed"), ("ready", -1), ("running", -3), ("timeout", 124),
    ("stalled", 123), ("initial", -9), ("ok", 0), ("output-invalid", -103), ("-101", -101), ("2", 2), (7, 7),
])
def test_status_names(given: str | int, expected: int | str) -> None:
    assert StatusType().convert(given, None, None) == expected


@pytest.mark.parametrize(("given", "says"), [("faild", "did you mean 'failed'"), ("99999999999", "out of range"),
                                             ("many", "not a status code or name")])
def test_bad_status_names(given: str, says: str) -> None:
    with pytest.raises(click.BadParameter, match=says):
        StatusType().convert(given, None, None)


# Scalebox's own tests/timeout-gen/app.yaml, as its Go (YAML 1.2) loader read it: a TAB after a colon
TIMEOUT_GEN = (
    "name: timeout-gen\n"
    "parameters:\n"
    "  start_task: go\n"
    "jobs:\n"
    "  gen:\n"
    "    arguments:\n"
    "      task_timeout_seconds:\t2\n"
    "      sleep_interval_seconds:\t0.2   \t# a TAB before a comment\n"
    "    environments: ['A=1',\t'QUOTED=a:\tb']\n"
)


def write(root: Path, text: str) -> Path:
    (root / "gen").mkdir(parents=True, exist_ok=True)
    (root / "gen" / "run.sh").write_text("#!/bin/bash\ntrue\n")
    app = root / "app.yaml"
    app.write_text(text)
    return app


def test_a_tab_after_a_colon_is_white_space_as_in_yaml_1_2(tmp_path: Path) -> None:
    spec = load_pipeline(write(tmp_path, TIMEOUT_GEN))
    [gen] = spec.modules
    assert gen.arguments.task_max_seconds == 2
    assert gen.arguments.sleep_interval_seconds == 0.2
    assert gen.environments == {"A": "1", "QUOTED": "a:\tb"}  # a TAB inside quotes is kept


def test_a_tab_in_indentation_is_still_refused_at_its_line(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        name: t
        modules:
          gen:
        \targuments: {}
        """)
    with pytest.raises(PipelineError, match=r"app\.yaml:4"):
        load_pipeline(write(tmp_path, text))


def test_errors_after_a_tab_keep_their_line(tmp_path: Path) -> None:
    text = TIMEOUT_GEN + "    sink_jobs:\t[nowhere]\n"
    with pytest.raises(PipelineError, match=r"app\.yaml:10: .*nowhere"):
        load_pipeline(write(tmp_path, text))

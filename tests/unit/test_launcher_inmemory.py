"""The real launcher, in process: its slots run real /bin/sh scripts (LocalRuntime) against
InMemoryQueue instead of PostgreSQL. Only the public API is used (Launcher(config, queue_factory,
runtime, wakeups).start() / wait() / stop()), so these survive changes to how the launcher
reaches its queue."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.runtime.local import LocalRuntime
from scalebox_hpc.testing import InMemoryQueue
from tests.helpers import wait_until, write_app

FAST = "arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.05, heartbeat_seconds: 0.4}"
ENDS = 60.0
"""Seconds a launcher gets to end by itself: a bound for a hang, not a measured duration."""


class Harness:
    """One app in an InMemoryQueue and the launcher of host ``testhost`` for it."""

    def __init__(self, tmp_path: Path, yaml_text: str, scripts: dict[str, str]) -> None:
        self.wakeups = Wakeups()
        self.queue = InMemoryQueue(notify=self.wakeups.notify)  # hand-offs wake the slots, as NOTIFY does
        self.app = self.queue.create_app(load_pipeline(write_app(tmp_path / "app", yaml_text, scripts)))
        config = LauncherConfig(app_id=self.app, host="testhost", work_root=tmp_path / "work", local=True)
        self.launcher = Launcher(config, lambda: self.queue, LocalRuntime(), self.wakeups)

    def tasks(self, module: str | None = None) -> dict[str, dict[str, Any]]:
        return {r["body"]: r for r in self.queue.tasks(self.app, module=module)}

    def until(self, what: str, predicate: Callable[[], bool]) -> None:
        """Wait for ``predicate`` (a state the launcher reaches), failing after a generous bound."""
        wait_until(predicate, ENDS, what, every=0.02)


@pytest.fixture
def stop_launchers() -> Iterator[list[Launcher]]:
    started: list[Launcher] = []
    yield started
    for launcher in started:  # a failed test must not leave slot threads running scripts
        launcher.stop(grace=0.1)


def test_a_two_module_pipeline_runs_end_to_end(tmp_path: Path, stop_launchers: list[Launcher]) -> None:
    h = Harness(tmp_path, f"""
        name: two
        parameters: {{start_task: go}}
        modules:
          split:
            sink_modules: [work]
            {FAST}
          work:
            slots: ['.*:2']
            {FAST}
    """, {
        "split/run.sh": 'for i in 1 2 3 4; do echo "$1-$i" >> sink-tasks.txt; done\necho split "$1"\n',
        "work/run.sh": 'echo "$1 on slot $SLOT_SEQ" > "done-$1"\n',
    })
    stop_launchers.append(h.launcher)
    assert h.launcher.start() == 3
    assert h.launcher.wait(ENDS), "the slots did not idle out"
    assert h.launcher.exit_code() == 0
    tasks = h.tasks()
    assert {body: row["status"] for body, row in tasks.items()} == {
        "go": 0, "go-1": 0, "go-2": 0, "go-3": 0, "go-4": 0}
    assert {tasks[f"go-{i}"]["module"] for i in range(1, 5)} == {"work"}
    assert tasks["go-1"]["headers"]["from_module"] == "split"
    [ex] = h.queue.executions(tasks["go"]["id"])
    assert (ex["status"], ex["stdout"], ex["host"]) == (0, "split go\n", "testhost")
    done = sorted(p.name for p in (tmp_path / "work").rglob("done-*"))
    assert done == ["done-go-1", "done-go-2", "done-go-3", "done-go-4"]
    assert sorted(s["status"] for s in h.queue.slots(h.app)) == ["EXITED"] * 3
    assert sum(s["tasks_done"] for s in h.queue.slots(h.app)) == 5


def test_a_failed_run_is_retried_by_its_retry_rules(tmp_path: Path, stop_launchers: list[Launcher]) -> None:
    h = Harness(tmp_path, f"""
        name: retry
        parameters: {{start_task: flaky}}
        modules:
          m:
            parameters: {{retry_rules: ['3:2']}}
            {FAST}
    """, {  # the work dir persists across a slot's tasks: the first two runs fail, the third succeeds
        "m/run.sh": 'n=$(cat n 2>/dev/null || echo 0); echo $((n+1)) > n; [ "$n" -ge 2 ] || exit 3\n',
    })
    stop_launchers.append(h.launcher)
    h.launcher.start()
    assert h.launcher.wait(ENDS)
    task = h.tasks()["flaky"]
    assert (task["status"], task["attempts"]) == (0, 3)
    assert [(e["attempt"], e["status"]) for e in h.queue.executions(task["id"])] == [(1, 3), (2, 3), (3, 0)]


def test_retries_are_bounded_by_the_rules(tmp_path: Path, stop_launchers: list[Launcher]) -> None:
    h = Harness(tmp_path, f"""
        name: bounded
        parameters: {{start_task: bad}}
        modules:
          m:
            parameters: {{retry_rules: ['7']}}
            {FAST}
    """, {"m/run.sh": "echo no >&2; exit 7\n"})
    stop_launchers.append(h.launcher)
    h.launcher.start()
    assert h.launcher.wait(ENDS)
    task = h.tasks()["bad"]
    assert (task["status"], task["attempts"]) == (7, 2)
    assert [e["stderr"] for e in h.queue.executions(task["id"])] == ["no\n", "no\n"]


def test_a_drain_kills_and_releases_the_running_task(tmp_path: Path, stop_launchers: list[Launcher]) -> None:
    h = Harness(tmp_path, f"""
        name: drain
        parameters: {{start_task: long}}
        modules:
          m:
            {FAST}
    """, {"m/run.sh": "touch started\nsleep 60\n"})
    stop_launchers.append(h.launcher)
    h.launcher.start()
    h.until("run.sh started", lambda: any((tmp_path / "work").rglob("started")))
    assert h.tasks()["long"]["status"] == -3
    h.launcher.stop(grace=0.1)
    assert h.launcher.alive() == 0
    task = h.tasks()["long"]
    assert (task["status"], task["attempts"], task["slot_id"]) == (-1, 0, None)  # the attempt is not counted
    assert h.queue.executions(task["id"]) == []
    assert [s["status"] for s in h.queue.slots(h.app)] == ["EXITED"]


def test_cancelling_the_app_stops_the_launcher(tmp_path: Path, stop_launchers: list[Launcher]) -> None:
    h = Harness(tmp_path, f"""
        name: cancel
        parameters: {{start_task: long}}
        modules:
          m:
            {FAST}
    """, {"m/run.sh": "touch started\nsleep 60\n"})
    stop_launchers.append(h.launcher)
    h.launcher.start()
    h.until("run.sh started", lambda: any((tmp_path / "work").rglob("started")))
    h.queue.cancel_app(h.app)  # the heartbeat thread notices, aborts and releases
    assert h.launcher.wait(ENDS)
    assert h.tasks()["long"]["status"] == -1
    assert h.queue.app(h.app)["result"] == "cancelled"


def test_a_result_is_held_through_an_outage_and_recorded_after(tmp_path: Path,
                                                               stop_launchers: list[Launcher]) -> None:
    h = Harness(tmp_path, f"""
        name: outage
        parameters: {{start_task: t}}
        modules:
          m:
            {FAST}
    """, {"m/run.sh": "echo ran >> runs\n"})
    h.queue.fail_next(2, methods={"complete"})  # the first two hand-offs meet a database away
    stop_launchers.append(h.launcher)
    h.launcher.start()
    assert h.launcher.wait(ENDS)
    task = h.tasks()["t"]
    assert (task["status"], task["attempts"]) == (0, 1)
    assert h.queue.calls["complete"] == 3
    [runs] = (tmp_path / "work").rglob("runs")
    assert runs.read_text() == "ran\n"  # held and handed off again, not run again


def test_the_launcher_recovers_a_dead_slots_task_and_runs_it(tmp_path: Path,
                                                            stop_launchers: list[Launcher]) -> None:
    h = Harness(tmp_path, f"""
        name: recover
        modules:
          m:
            {FAST}
    """, {"m/run.sh": "true\n"})
    h.queue.add_tasks(h.app, "m", ["orphan"])
    module = h.queue.modules(h.app)["m"].id
    dead = h.queue.create_slot(module, host="gone", seq=0, pid=1, work_dir="/nowhere", heartbeat_seconds=0.1)
    [orphan] = h.queue.claim(h.app, module, host="gone", slot_id=dead, slot_seq=0, lease_seconds=0.1)
    stop_launchers.append(h.launcher)
    h.launcher.start()  # its heartbeat thread recovers the expired lease, its slot runs the task
    assert h.launcher.wait(ENDS)
    assert h.tasks()["orphan"]["status"] == 0
    assert [(e["status"], e["host"]) for e in h.queue.executions(orphan.id)] == [(123, "gone"), (0, "testhost")]
    assert {s["host"]: s["status"] for s in h.queue.slots(h.app)} == {"gone": "LOST", "testhost": "EXITED"}


def test_the_heartbeat_carries_why_a_slot_waits_and_the_output_of_its_task(
        tmp_path: Path, stop_launchers: list[Launcher]) -> None:
    gate, go = tmp_path / "open", tmp_path / "go"
    h = Harness(tmp_path, """
        name: beats
        parameters: {start_task: only}
        modules:
          work:
            arguments: {sleep_interval_seconds: 0.05, heartbeat_seconds: 0.4, slot_options: [always_running]}
    """, {
        "work/check.sh": f'[ -e {gate} ] || {{ echo "not yet" >&2; exit 1; }}\n',
        "work/run.sh": f'echo "started $1"\nwhile [ ! -e {go} ]; do sleep 0.05; done\necho done >&2\n',
    })
    sent: list[Any] = []
    beat = h.queue.heartbeat_slots

    def recording(beats: Any) -> list[int]:
        sent.extend(b.output for b in beats)
        return beat(beats)

    h.queue.heartbeat_slots = recording  # type: ignore[method-assign]
    h.launcher.start()
    stop_launchers.append(h.launcher)

    def slot() -> dict[str, Any]:
        rows = h.queue.slots(h.app)
        return rows[0] if rows else {}  # {}: not registered yet

    h.until("the slot says why it waits", lambda: slot().get("waiting") == "check.sh exited 1: not yet (not now)")
    gate.touch()
    h.until("the task's output reaches the slot's row",
            lambda: ((slot()["live_output"] or {}).get("stdout") or {}).get("text") == "started only\n")
    assert slot()["waiting"] is None  # the gate is open again
    [task] = h.tasks().values()
    assert slot()["live_output"]["task_id"] == task["id"]
    beats_before = len(sent)
    h.until("more beats", lambda: len(sent) > beats_before + 2)
    assert sent[-1] is None  # unchanged output is not sent again
    go.touch()
    h.until("the task done", lambda: h.tasks()["only"]["status"] == 0)
    h.until("the tail cleared", lambda: slot()["live_output"] == {"task_id": None})

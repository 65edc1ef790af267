"""Why READY tasks do not move, and what a running task prints (issue 14): `scalebox` as a
subprocess on a real PostgreSQL, bare modules. Each reason `status`, `app show` and `slot list`
give is one rule of the claim, and goes away when that rule lets the tasks go."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import write_app

pytestmark = pytest.mark.pg

SCALEBOX = [sys.executable, "-m", "scalebox_hpc"]
BOUND = 60.0
"""How long a test waits for the state it expects before it fails (not a timing assertion)."""
FAST = "{heartbeat_seconds: 1, sleep_interval_seconds: 0.2, slot_options: [always_running]}"


def sbx(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SCALEBOX, *args], env=env, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"scalebox {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def until(what: str, probe: Callable[[], Any]) -> Any:
    """``probe()`` once it returns something true; fails after BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {what} after {BOUND}s")
        time.sleep(0.3)


def why(env: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """`status --json`: module -> its reasons."""
    return {m["module"]: m["why"] for m in json.loads(sbx(env, "status", "--json").stdout)["modules"]}


def kinds(env: dict[str, str]) -> dict[str, set[str]]:
    return {m: {w["kind"] for w in ws} for m, ws in why(env).items()}


def statuses(env: dict[str, str], module: str) -> list[int]:
    return [t["status"] for t in json.loads(sbx(env, "task", "list", "-m", module, "--json").stdout)]


@pytest.fixture
def launcher(cli_env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts `scalebox launcher --app 1 --host node-a` (stopped with SIGTERM after the test)."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([*SCALEBOX, "launcher", "--app", "1", "--host", "node-a", "--grace", "2", *args],
                                env=cli_env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_no_live_slot_paused_and_initial_are_said(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "p", """
        name: held
        parameters: {start_task: go}
        modules:
          work: {}
    """, {"work/run.sh": "true\n"})
    sbx(cli_env, "app", "create", str(app))
    sbx(cli_env, "task", "add", "--initial", "later")
    [initial, no_slot] = why(cli_env)["work"]
    assert initial["kind"] == "tasks_initial" and initial["text"].startswith("1 task(s) INITIAL"), initial
    assert "scalebox task retry --status initial --app 1" in initial["text"]
    assert no_slot["kind"] == "no_slot" and "scalebox run --app 1" in no_slot["text"], no_slot
    out = sbx(cli_env, "status").stdout
    assert "why tasks wait:" in out and "work: no slot has run it yet" in out, out

    sbx(cli_env, "app", "pause")
    assert kinds(cli_env)["work"] == {"tasks_initial", "app_paused", "no_slot"}
    shown = sbx(cli_env, "app", "show").stdout
    assert "work: the app is PAUSED: nothing is claimed (`scalebox app resume 1`)" in shown, shown
    assert json.loads(sbx(cli_env, "app", "show", "--json").stdout)["why"]["work"][1]["kind"] == "app_paused"

    initial_app = write_app(tmp_path / "i", """
        name: not-yet
        parameters: {start_task: go, initial_status: INITIAL}
        modules:
          work: {}
    """, {"work/run.sh": "true\n"})
    sbx(cli_env, "app", "create", str(initial_app))
    assert "app_initial" in kinds(cli_env)["work"]
    assert "the app is INITIAL: nothing is claimed until `scalebox app resume 2`" in sbx(cli_env, "status").stdout


def test_each_claim_rule_that_holds_ready_tasks_is_named_and_lets_go(
        cli_env: dict[str, str], tmp_path: Path, launcher: Callable[..., subprocess.Popen[str]]) -> None:
    gate = tmp_path / "open"
    app = write_app(tmp_path / "w", f"""
        name: why
        modules:
          gated:
            arguments: {FAST}
          disk:
            arguments: {{heartbeat_seconds: 1, sleep_interval_seconds: 0.2, slot_options: [always_running],
                        free_space_gb: 1000000000}}
          sem:
            arguments: {{heartbeat_seconds: 1, sleep_interval_seconds: 0.2, slot_options: [always_running],
                        semaphore: tokens}}
          producer:
            sink_modules: [pressed]
            arguments: {FAST}
          pressed:
            slots: ["nowhere:1"]
            arguments: {{max_pending: 1}}
          bound:
            arguments: {{heartbeat_seconds: 1, sleep_interval_seconds: 0.2, slot_options: [always_running],
                        locality_wait_seconds: 3600}}
    """, {
        "gated/run.sh": "true\n",
        "gated/check.sh": f'if [ ! -e {gate} ]; then echo "the licence server is busy" >&2; exit 1; fi\n',
        **{f"{m}/run.sh": "true\n" for m in ("disk", "sem", "producer", "pressed", "bound")},
    })
    sbx(cli_env, "app", "create", str(app))
    for module in ("gated", "disk", "sem", "producer", "bound"):
        sbx(cli_env, "task", "add", "-m", module, f"{module}-1")
    sbx(cli_env, "task", "add", "-m", "pressed", "full")
    sbx(cli_env, "task", "add", "-m", "bound", "-H", "to_host=node-b", "elsewhere")
    sbx(cli_env, "semaphore", "create", "tokens", "0")
    launcher()

    expected = {"gated": "check_sh", "disk": "disk_gate", "sem": "semaphore", "producer": "back_pressure",
                "bound": "host"}
    def all_shown() -> dict[str, set[str]] | None:
        k = kinds(cli_env)
        return k if all(kind in k.get(m, set()) for m, kind in expected.items()) else None

    got = until("every reason shown", all_shown)
    assert got["gated"] == {"check_sh"} and got["disk"] == {"disk_gate"}, got  # their slots are live
    assert until("bound-1 done", lambda: statuses(cli_env, "bound") == [0, -1])  # only the one for node-b waits
    for module in ("gated", "disk", "sem", "producer"):
        assert statuses(cli_env, module) == [-1], module  # held, as said

    texts = {m: [w["text"] for w in ws] for m, ws in why(cli_env).items()}
    assert texts["gated"] == ["1 of its 1 live slot(s) wait (node-a slot 0): check.sh exited 1: "
                              "the licence server is busy (not now)"], texts
    assert "free space" in texts["disk"][0] and "< free_space_gb 1000000000" in texts["disk"][0], texts
    assert texts["sem"][0].startswith("semaphore 'tokens' is 0: "), texts
    assert texts["producer"][0] == "back-pressure: its sink pressed has 1 or more READY tasks (max_pending 1)"
    assert texts["bound"][0].startswith("1 task(s) bound to host node-b (to_host), which runs no live slot"), texts
    listed = sbx(cli_env, "slot", "list").stdout
    [row] = [line for line in listed.splitlines() if line.split()[:2] == ["node-a", "gated"]]
    assert row.endswith("waits: check.sh exited 1: the licence server is busy (not now)"), listed
    assert "gated: 1 of its 1 live slot(s) wait" in listed  # and the reasons, per module
    status = sbx(cli_env, "status").stdout
    assert "sem: semaphore 'tokens' is 0" in status and "producer: back-pressure" in status, status

    # each rule opened: the tasks go, and the reasons with them
    gate.touch()
    sbx(cli_env, "semaphore", "increment", "tokens")
    assert until("gated and sem done", lambda: statuses(cli_env, "gated") == [0] and statuses(cli_env, "sem") == [0])
    def gate_reason_gone() -> dict[str, set[str]] | None:
        k = kinds(cli_env)
        return None if k["gated"] else k

    left = until("the gate's reason gone", gate_reason_gone)
    assert left["sem"] == set() and left["disk"] == {"disk_gate"}, left
    slots = json.loads(sbx(cli_env, "slot", "list", "--json").stdout)
    assert [s["waiting"] for s in slots if s["module"] == "gated"] == [None]


def test_task_show_follow_prints_the_running_tasks_output_and_its_end(
        cli_env: dict[str, str], tmp_path: Path, launcher: Callable[..., subprocess.Popen[str]]) -> None:
    go = tmp_path / "go"
    app = write_app(tmp_path / "f", f"""
        name: follow
        parameters: {{start_task: only}}
        modules:
          work:
            arguments: {FAST}
    """, {"work/run.sh": f'i=0\nwhile [ ! -e {go} ]; do i=$((i+1)); echo "tick $i"; sleep 0.2; done\n'
                         'echo "finishing after go"\necho "a last word" >&2\n'})
    sbx(cli_env, "app", "create", str(app))
    launcher()
    until("running", lambda: statuses(cli_env, "work") == [-3])
    def shown_with_output() -> str | None:
        out = sbx(cli_env, "task", "show", "1").stdout
        return out if "output so far" in out else None

    shown = until("its output in task show", shown_with_output)
    assert "running on node-a slot 0 for " in shown and "  stdout: " in shown and "tick " in shown, shown

    safety = threading.Timer(BOUND, go.touch)  # a follower that hangs must not hang the test
    safety.start()
    follow = subprocess.Popen([*SCALEBOX, "task", "show", "--follow", "1"], env=cli_env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follow.stdout is not None
        lines = []
        for line in follow.stdout:  # the live tail comes, while the task runs
            lines.append(line)
            if line.startswith("tick ") and any(x.startswith("following the output") for x in lines):
                break
        go.touch()  # now it prints what it prints only after this
        out, err = follow.communicate(timeout=BOUND)
    finally:
        follow.kill()
        safety.cancel()
    out = "".join(lines) + out
    assert follow.returncode == 0, err
    assert "finishing after go\n" in out and "a last word" in err, (out, err)
    assert out.strip().splitlines()[-1] == "task 1 ended: OK", out
    ticks = [int(x.split()[1]) for x in out.splitlines() if x.startswith("tick ")]
    assert ticks == sorted(set(ticks)), ticks  # every line once, in order

    done = sbx(cli_env, "task", "show", "--follow", "1")
    assert "task 1 is not running (OK): nothing to follow" in done.stderr, done.stderr

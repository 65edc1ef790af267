"""In-slot Python handlers (``handler: file.py:function``) through the real launcher and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.launcher.outputs import TAIL_BYTES
from scalebox_hpc.models import Message
from tests.integration.test_launcher import FAST, create, launch, slots, tasks

pytestmark = pytest.mark.pg

HANDLERS = '''
import ctypes, os, sys, time

def handle(task):
    body = task.body
    print(f"pid={os.getpid()} body={body} attempt={task.attempt} cwd_ok={os.getcwd() == str(task.work_dir)}")
    if body == "sleep":
        time.sleep(60)
    if body == "exit7":
        os._exit(7)
    if body == "exit0":
        os._exit(0)
    if body == "forkdie":  # the forked child keeps the reply pipe open: the death is seen anyway
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        os._exit(5)
    if body == "segv":
        ctypes.string_at(0)
    if body == "boom":
        raise ValueError("the handler failed on purpose")
    if body == "sysexit":
        sys.exit(4)
    if body == "str":
        return "nope"
    if body == "big":
        for i in range(40000):
            print(f"line {i:06d} " + "x" * 40)
        return 0
    if body == "binary":
        sys.stdout.buffer.write(b"bad \\xff\\xfe nul \\x00 end\\n")
        sys.stdout.flush()
        return 0
    if body.startswith("flaky"):
        return 3 if task.attempt == 1 else 0
    if body == "emit":
        task.send_message("m1", headers={"k": "v"})
        task.send_message("m2")
        return None
    if body == "emitfail":
        task.send_message("never")
        task.set_finished("never")
        return 2
    if body == "finish":
        task.set_finished("done by handler")
        return 0
    if body == "cli":  # send-message from a child process: the emit buffer, as for run.sh
        import subprocess
        subprocess.run(["send-message", "via-cli", '{"c": 1}'], check=True)
        return 0
    if body == "sinkfile":
        with open("sink-tasks.txt", "w") as fh:
            fh.write("from-file\\n")
        return 0
    return 0
'''


def make_app(pg_dsn: str, root: Path, arguments: str = "max_idle_polls: 3", extra: str = "",
             handler: str = "h.py:handle", source: str = HANDLERS) -> int:
    (root / "a").mkdir(parents=True, exist_ok=True)
    (root / "a" / "h.py").write_text(textwrap.dedent(source))
    return create(pg_dsn, root, f"""
        name: py
        modules:
          a:
            handler: "{handler}"
            sink_modules: [b]
            arguments: {{sleep_interval_seconds: 0.2, {arguments}}}
            {extra}
          b:
            {FAST}
    """, {"b/run.sh": 'echo "b got $1"\n'})


def add(pg_dsn: str, app_id: int, *bodies: str, module: str = "a") -> None:
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, module, [Message(b) for b in bodies])


def by_body(pg_dsn: str, app_id: int) -> dict[tuple[str, str], dict[str, Any]]:
    return {(t["module"], t["body"]): t for t in tasks(pg_dsn, app_id)}


def execs(pg_dsn: str, task_id: int) -> list[dict[str, Any]]:
    with connect(pg_dsn) as conn:
        return list(apps.get_task(conn, task_id)["execs"])


def pid_of(ex: dict[str, Any]) -> int:
    return int(ex["stdout"].split()[0].removeprefix("pid="))


def test_status_zero_emits_to_the_sink_in_the_hand_off(pg_dsn: str, tmp_path: Path) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app")
    add(pg_dsn, app_id, "emit", "plain", "sinkfile", "cli")
    launch(pg_dsn, app_id, tmp_path / "work")
    rows = by_body(pg_dsn, app_id)
    assert set(rows) == {("a", "emit"), ("a", "plain"), ("a", "sinkfile"), ("a", "cli"), ("b", "m1"), ("b", "m2"),
                         ("b", "from-file"), ("b", "via-cli")}
    assert rows[("b", "via-cli")]["headers"]["c"] == 1
    assert all(r["status"] == 0 for r in rows.values()), rows
    assert rows[("b", "m1")]["headers"]["k"] == "v"
    assert rows[("b", "m1")]["headers"]["from_module"] == "a"
    [ex] = execs(pg_dsn, rows[("a", "plain")]["id"])
    assert ex["stdout"].endswith("body=plain attempt=1 cwd_ok=True\n") and ex["stderr"] == ""
    [b_ex] = execs(pg_dsn, rows[("b", "m2")]["id"])
    assert b_ex["stdout"] == "b got m2\n"
    # one worker served all three tasks
    assert len({pid_of(execs(pg_dsn, rows[("a", b)]["id"])[0]) for b in ("emit", "plain", "sinkfile", "cli")}) == 1
    assert not list((tmp_path / "work").rglob("sink-tasks.txt"))


def test_set_finished_finishes_the_app(pg_dsn: str, tmp_path: Path) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app")
    add(pg_dsn, app_id, "finish")
    launch(pg_dsn, app_id, tmp_path / "work")
    with connect(pg_dsn) as conn:
        row = apps.get_app(conn, app_id)
    assert (row["status"], row["result"]) == ("FINISHED", "done by handler")


def test_failures_follow_retry_rules_and_emit_nothing(pg_dsn: str, tmp_path: Path) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app", extra="parameters: {retry_rules: ['3']}")
    add(pg_dsn, app_id, "flaky", "boom", "sysexit", "str", "emitfail")
    launch(pg_dsn, app_id, tmp_path / "work")
    rows = by_body(pg_dsn, app_id)
    assert {b: r["status"] for (_, b), r in rows.items()} == {
        "flaky": 0, "boom": 1, "sysexit": 4, "str": -103, "emitfail": 2}  # nothing emitted by a failure
    with connect(pg_dsn) as conn:
        assert apps.get_app(conn, app_id)["status"] == "RUNNING"
    assert [e["status"] for e in sorted(execs(pg_dsn, rows[("a", "flaky")]["id"]), key=lambda e: e["id"])] == [3, 0]
    [boom] = execs(pg_dsn, rows[("a", "boom")]["id"])
    assert "Traceback" in boom["stderr"] and "ValueError: the handler failed on purpose" in boom["stderr"]
    [bad] = execs(pg_dsn, rows[("a", "str")]["id"])
    assert "returned a str" in bad["stderr"]


def test_timeout_is_124_and_the_next_task_gets_a_new_worker(pg_dsn: str, tmp_path: Path) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app", arguments="max_idle_polls: 3, task_max_seconds: 1")
    add(pg_dsn, app_id, "before")
    launch(pg_dsn, app_id, tmp_path / "work")
    add(pg_dsn, app_id, "sleep")
    launch(pg_dsn, app_id, tmp_path / "work")
    add(pg_dsn, app_id, "after")
    launch(pg_dsn, app_id, tmp_path / "work")
    rows = by_body(pg_dsn, app_id)
    assert {b: r["status"] for (m, b), r in rows.items() if m == "a"} == {"before": 0, "sleep": 124, "after": 0}
    [slept] = execs(pg_dsn, rows[("a", "sleep")]["id"])
    assert "body=sleep" in slept["stdout"]  # the output so far is kept
    assert "task_max_seconds" in slept["stderr"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid_of(slept), 0)


def test_a_dying_worker_fails_its_task_alone(pg_dsn: str, tmp_path: Path) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app")
    add(pg_dsn, app_id, "one")
    launch(pg_dsn, app_id, tmp_path / "work")
    for body in ("exit7", "segv", "exit0", "forkdie", "two"):  # one launch each: the order is known
        add(pg_dsn, app_id, body)
        launch(pg_dsn, app_id, tmp_path / "work")
    rows = by_body(pg_dsn, app_id)
    assert {b: r["status"] for (m, b), r in rows.items() if m == "a"} == {
        "one": 0, "exit7": 7, "segv": 128 + signal.SIGSEGV, "exit0": -103, "forkdie": 5, "two": 0}
    [segv] = execs(pg_dsn, rows[("a", "segv")]["id"])
    assert "killed by SIGSEGV" in segv["stderr"] and "Fatal Python error" in segv["stderr"]
    [exit0] = execs(pg_dsn, rows[("a", "exit0")]["id"])
    assert "died (exit 0) before it reported" in exit0["stderr"]
    assert all(s["status"] == "EXITED" for s in slots(pg_dsn, app_id))


def test_an_unimportable_handler_is_101_per_task(pg_dsn: str, tmp_path: Path) -> None:
    source = "import no_such_module_here\n\ndef handle(task):\n    return 0\n"
    app_id = make_app(pg_dsn, tmp_path / "app", source=source)
    add(pg_dsn, app_id, "x", "y")
    launch(pg_dsn, app_id, tmp_path / "work")
    rows = [t for t in tasks(pg_dsn, app_id) if t["module"] == "a"]
    assert sorted(t["status"] for t in rows) == [-101, -101]
    for t in rows:
        [ex] = execs(pg_dsn, t["id"])
        assert "cannot import" in ex["stderr"] and "No module named 'no_such_module_here'" in ex["stderr"]


def test_an_unimportable_handler_ends_the_slot_after_five(pg_dsn: str, tmp_path: Path) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app", source="def other(task):\n    return 0\n")
    add(pg_dsn, app_id, *[f"t{i}" for i in range(7)])
    launch(pg_dsn, app_id, tmp_path / "work", modules=("a",))  # b would wait for a's READY tasks
    statuses = sorted(t["status"] for t in tasks(pg_dsn, app_id) if t["module"] == "a")
    assert statuses == [-101] * 5 + [-1] * 2
    [slot, *_] = slots(pg_dsn, app_id)
    assert slot["status"] == "ERROR" and "crash loop" in slot["message"]


def test_huge_and_binary_output_is_capped_and_kept(pg_dsn: str, tmp_path: Path) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app")
    add(pg_dsn, app_id, "big")
    launch(pg_dsn, app_id, tmp_path / "work")
    add(pg_dsn, app_id, "binary")
    launch(pg_dsn, app_id, tmp_path / "work")
    add(pg_dsn, app_id, "small")
    launch(pg_dsn, app_id, tmp_path / "work")
    rows = by_body(pg_dsn, app_id)
    assert all(r["status"] == 0 for r in rows.values())
    [big] = execs(pg_dsn, rows[("a", "big")]["id"])
    assert len(big["stdout"].encode()) <= TAIL_BYTES and big["stdout"].endswith("line 039999 " + "x" * 40 + "\n")
    [binary] = execs(pg_dsn, rows[("a", "binary")]["id"])
    assert "bad \ufffd\ufffd nul \ufffd end\n" in binary["stdout"]
    [small] = execs(pg_dsn, rows[("a", "small")]["id"])
    assert small["stdout"].count("\n") == 1  # the earlier tasks' output is not repeated


def test_drain_past_grace_gives_the_task_back(pg_dsn: str, tmp_path: Path) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app", arguments="max_idle_polls: 1000")
    add(pg_dsn, app_id, "sleep")
    env = dict(os.environ, SCALEBOX_DSN=pg_dsn, SCALEBOX_WORK_ROOT=str(tmp_path / "work"))
    proc = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "launcher", "--app", str(app_id), "-m", "a",
                             "--grace", "1"], env=env)
    deadline = time.monotonic() + 30
    out: list[Path] = []
    while time.monotonic() < deadline:
        out = [p for p in (tmp_path / "work").rglob("run.out") if "body=sleep" in p.read_text()]
        if out:
            break
        time.sleep(0.1)
    assert out, "the handler never started"
    pid = int(out[0].read_text().split()[0].removeprefix("pid="))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    [task] = [t for t in tasks(pg_dsn, app_id) if t["module"] == "a"]
    assert (task["status"], task["attempts"]) == (-1, 0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

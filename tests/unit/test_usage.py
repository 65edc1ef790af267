"""Core-hours per task, the pure parts and the plumbing: rusage of a reaped run (an injected
wait4), the warm agent's reply, the handler worker's usage frames, a Slurm job's CPUs, the
table `app show` prints; and, through the real launcher on the in-memory queue, that a run's
usage reaches its execution record (and that an srun step's does not)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalebox_hpc.cli.usage import usage_lines
from scalebox_hpc.db.usage import ModuleUsage
from scalebox_hpc.launcher import pyworker
from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
from scalebox_hpc.launcher.pyworker_child import HEADER, USAGE_REPLY, Meter
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import Usage, usage_columns
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.runtime.local import LocalRun, LocalRuntime, usage_of
from scalebox_hpc.runtime.warm import exit_reply
from scalebox_hpc.slurm.environment import JobEnvironment, allocated_cpus, cpus_per_node_total
from scalebox_hpc.testing import InMemoryQueue
from tests.helpers import wait_until, write_app


@dataclass
class Rusage:
    ru_utime: float = 0.0
    ru_stime: float = 0.0
    ru_maxrss: int = 0


# -- a reaped run's rusage ----------------------------------------------------------------------------
def _run(tmp_path: Path, **kw: Any) -> LocalRun:
    proc = subprocess.Popen(["true"], cwd=tmp_path, stdin=subprocess.DEVNULL, start_new_session=True)
    return LocalRun(proc, **kw)


def test_a_reaped_run_reports_its_trees_rusage(tmp_path: Path) -> None:
    seen: list[int] = []

    def wait4(pid: int, options: int) -> tuple[int, int, Rusage]:
        seen.append(pid)
        _, status, _ = os.wait4(pid, options)  # the real child is reaped; its numbers are ours
        return pid, status, Rusage(ru_utime=1.5, ru_stime=0.25, ru_maxrss=90_000)

    run = _run(tmp_path, wait4=wait4, peak=lambda: 60_000)
    outcome = run.wait(30)
    assert outcome is not None and outcome.returncode == 0
    assert outcome.usage == Usage(cpu_user_s=1.5, cpu_system_s=0.25, max_rss_kb=90_000)
    assert seen == [run.proc.pid] and run.proc.returncode == 0  # Popen knows: it never waits again


def test_a_peak_not_above_the_launchers_is_not_the_runs(tmp_path: Path) -> None:
    """A forked child's ru_maxrss starts with its copy of the launcher: at or below the
    launcher's own peak it may be that copy, so it is not recorded."""
    def wait4(pid: int, options: int) -> tuple[int, int, Rusage]:
        _, status, _ = os.wait4(pid, options)
        return pid, status, Rusage(ru_utime=0.01, ru_maxrss=60_000)

    outcome = _run(tmp_path, wait4=wait4, peak=lambda: 60_000).wait(30)
    assert outcome is not None and outcome.usage == Usage(cpu_user_s=0.01, cpu_system_s=0.0, max_rss_kb=None)
    assert usage_of(Rusage(ru_maxrss=60_001), floor_kb=60_000).max_rss_kb == 60_001


def test_an_engine_client_whose_container_runs_elsewhere_reports_nothing(tmp_path: Path) -> None:
    run = _run(tmp_path)
    run.measures_usage = False  # podman/docker per task: wait4 sees only the client
    outcome = run.wait(30)
    assert outcome is not None and outcome.returncode == 0 and outcome.usage is None


def test_a_run_popen_reaped_first_has_no_usage(tmp_path: Path) -> None:
    run = _run(tmp_path)
    run.proc.wait()
    outcome = run.wait(30)
    assert outcome is not None and outcome.returncode == 0 and outcome.usage is None


def test_a_killed_run_keeps_what_it_used(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: pass"], start_new_session=True)
    run = LocalRun(proc, peak=lambda: 10**9)
    wait_until(lambda: sum(psutil.Process(proc.pid).cpu_times()[:2]) > 0, 30, "the loop to use some CPU")
    outcome = run.kill(grace=1.0)
    assert outcome.timed_out and outcome.usage is not None and outcome.usage.cpu_s > 0
    assert outcome.usage.max_rss_kb is None  # below the (pretended) launcher's peak


def test_usage_columns() -> None:
    assert usage_columns(None) == {"cpu_user_s": None, "cpu_system_s": None, "max_rss_kb": None}
    assert usage_columns(Usage(1.0, 2.0, 2**63)) == {"cpu_user_s": 1.0, "cpu_system_s": 2.0, "max_rss_kb": None}
    assert usage_columns(Usage(1.0, 2.0, 7))["max_rss_kb"] == 7


# -- the warm agent's reply ---------------------------------------------------------------------------
def test_the_agents_reply_gives_the_code_and_the_cpu_in_ticks() -> None:
    assert exit_reply("exit 3 0 27 40", ticks_per_second=100) == (0, Usage(cpu_user_s=0.27, cpu_system_s=0.4))
    assert exit_reply("exit 3 2") == (2, None)  # /proc unreadable in the container
    assert exit_reply("exit 3 0 -1 5") == (0, None)
    assert exit_reply("exit 3 0 5") == (0, None)


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=20),
                max_size=4))
def test_the_agents_reply_is_parsed_whatever_follows_the_code(extra: list[str]) -> None:
    """A run can write into the slot's FIFO: whatever follows ``exit ID CODE`` is usage or none."""
    code, usage = exit_reply(" ".join(["exit", "1", "0", *extra]))
    assert code == 0
    assert usage is None or (usage.cpu_user_s >= 0 and usage.cpu_system_s >= 0 and usage.max_rss_kb is None)


# -- the handler worker's usage ----------------------------------------------------------------------
def test_a_handler_reply_carries_the_tasks_usage() -> None:
    reply = pyworker.decode_reply(USAGE_REPLY.pack(4, 1_500_000, 250_000, 2048))
    assert (reply.status, reply.usage) == (4, Usage(cpu_user_s=1.5, cpu_system_s=0.25, max_rss_kb=2048))
    assert pyworker.decode_reply(USAGE_REPLY.pack(0, 1, 2, -1)).usage == Usage(1e-6, 2e-6, None)
    assert pyworker.decode_reply(bytes([7])).usage is None  # a status alone: nothing measured
    json_reply = pyworker.decode_reply(b'{"status": 0, "messages": [["m", null, {}]], "usage": [10, 20, null]}')
    assert json_reply.usage == Usage(1e-5, 2e-5, None) and json_reply.messages == [("m", None, {})]
    for bad in (USAGE_REPLY.pack(0, -1, 0, 0), USAGE_REPLY.pack(0, 0, 0, -5),
                b'{"status": 0, "usage": [1, 2]}', b'{"status": 0, "usage": [true, 2, 3]}',
                b'{"status": 0, "usage": [1.5, 2, 3]}', b'{"status": 0, "usage": "x"}'):
        with pytest.raises(pyworker.ProtocolError):
            pyworker.decode_reply(bad)
    assert HEADER.unpack(HEADER.pack(USAGE_REPLY.size))[0] == 25


@given(st.binary(min_size=USAGE_REPLY.size, max_size=USAGE_REPLY.size))
def test_any_usage_frame_is_a_reply_or_a_protocol_error(data: bytes) -> None:
    try:
        reply = pyworker.decode_reply(data)
    except pyworker.ProtocolError:
        return
    assert reply.usage is not None and reply.usage.cpu_user_s >= 0 and 0 <= (reply.status or 0) <= 255


def test_the_workers_meter_counts_a_peak_only_when_it_rose_during_the_task() -> None:
    before = Meter(own=Rusage(1.0, 0.5, 50_000), children=Rusage(2.0, 0.0, 40_000))
    same = Meter(own=Rusage(1.25, 0.5, 50_000), children=Rusage(2.5, 0.25, 40_000))
    assert same.since(before) == [750_000, 250_000, None]
    assert Meter(own=Rusage(1.0, 0.5, 70_000), children=before.children).since(before) == [0, 0, 70_000]
    # a child forked from the 50 MB worker shows 50 MB at least: not above the worker's, unknown
    assert Meter(own=before.own, children=Rusage(2.0, 0.0, 50_000)).since(before)[2] is None
    assert Meter(own=before.own, children=Rusage(2.0, 0.0, 80_000)).since(before)[2] == 80_000


# -- a Slurm job's CPUs -------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "cpus"), [
    ("72", 72), ("4(x2),2", 10), (" 1(x2) ", 2), ("2,3,4", 9), ("", None), ("x", None), ("4(x)", None),
    ("4(x2", None), ("0", None), ("1,,2", None), ("-3", None),
])
def test_slurm_job_cpus_per_node_is_summed_over_the_nodes(text: str, cpus: int | None) -> None:
    assert cpus_per_node_total(text) == cpus


@given(st.text(max_size=40))
def test_the_cpus_per_node_parser_is_total(text: str) -> None:
    total = cpus_per_node_total(text)
    assert total is None or total > 0


def test_the_allocation_falls_back_to_cpus_on_node_times_nodes() -> None:
    assert allocated_cpus({"SLURM_JOB_CPUS_PER_NODE": "8(x3)", "SLURM_CPUS_ON_NODE": "1"}) == 24
    assert allocated_cpus({"SLURM_CPUS_ON_NODE": "16", "SLURM_JOB_NUM_NODES": "2"}) == 32
    assert allocated_cpus({"SLURM_CPUS_ON_NODE": "16"}) == 16
    assert allocated_cpus({"SLURM_CPUS_ON_NODE": "many"}) is None
    assert allocated_cpus({}) is None
    fixture = Path(__file__).parent / "slurm_fixtures" / "env_srun_task1.txt"
    env = dict(line.split("=", 1) for line in fixture.read_text().splitlines() if "=" in line)
    assert JobEnvironment.from_env(env).cpus == 2  # SLURM_JOB_CPUS_PER_NODE=1(x2)


# -- the table of `app show` --------------------------------------------------------------------------
def test_the_usage_table_shows_measured_modules_and_says_what_is_missing() -> None:
    rows = [
        ModuleUsage("calc", tasks=10, executions=12, measured=10, cpu_core_hours=0.5, wall_hours=1.0,
                    alloc_core_hours=2.0, efficiency=0.25, max_rss_kb=3 * 1024 * 1024),
        ModuleUsage("idle", tasks=0, executions=0, measured=0, cpu_core_hours=None, wall_hours=None,
                    alloc_core_hours=None, efficiency=None, max_rss_kb=None),
        ModuleUsage("ext", tasks=1, executions=1, measured=0, cpu_core_hours=None, wall_hours=0.001,
                    alloc_core_hours=None, efficiency=None, max_rss_kb=None),
    ]
    lines = usage_lines(rows)
    assert lines[0].split() == ["module", "tasks", "execs", "cpu", "core-h", "wall", "h", "alloc", "core-h",
                                "efficiency", "max", "RSS"]
    assert lines[1].split() == ["calc", "10", "12", "0.5000", "1.0000", "2.0000", "25.0%", "3.0", "GiB"]
    assert lines[2].split() == ["ext", "1", "1", "-", "0.0010", "-", "-", "-"]
    assert "3 execution(s) without a CPU measurement" in lines[3]
    assert usage_lines(rows[1:2]) == []


# -- through the launcher -----------------------------------------------------------------------------
BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"


@pytest.fixture
def launchers() -> Iterator[list[Launcher]]:
    started: list[Launcher] = []
    yield started
    for launcher in started:
        launcher.stop(grace=0.1)


def _launch(tmp_path: Path, yaml_text: str, scripts: dict[str, str], bodies: list[str],
            launchers: list[Launcher]) -> dict[str, dict[str, Any]]:
    wakeups = Wakeups()
    queue = InMemoryQueue(notify=wakeups.notify)
    app = queue.create_app(load_pipeline(write_app(tmp_path / "app", yaml_text, scripts)))
    from scalebox_hpc.models import Message

    queue.add_tasks(app, "a", [Message(b) for b in bodies])
    launcher = Launcher(LauncherConfig(app_id=app, host="testhost", work_root=tmp_path / "work", local=True),
                        lambda: queue, LocalRuntime(), wakeups)
    launchers.append(launcher)
    launcher.start()
    launcher.wait(60)
    return {t["body"]: queue.executions(t["id"])[-1] for t in queue.tasks(app)}


def test_a_runs_usage_reaches_its_execution(tmp_path: Path, launchers: list[Launcher]) -> None:
    got = _launch(tmp_path, """
        name: u
        modules:
          a:
            arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.05}
    """, {"a/run.sh": f"[ \"$1\" = busy ] && exec {sys.executable} -c '{BUSY}'\nexit 0\n"}, ["busy", "idle"],
        launchers)
    assert got["busy"]["status"] == 0 and got["busy"]["cpu_user_s"] + got["busy"]["cpu_system_s"] >= 0.25
    assert got["idle"]["cpu_user_s"] is not None and got["idle"]["cpu_user_s"] < 0.25


def test_an_srun_steps_usage_is_not_recorded(tmp_path: Path, launchers: list[Launcher],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside an allocation an MPI task runs as `srun -n K ...`: its ranks run under slurmstepd,
    so what wait4 of srun says is not their CPU. (Here a fake srun runs the program as its child:
    measurable, yet not recorded, as on a real cluster.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "$1" != -n ]; do shift; done\nshift 2\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    got = _launch(tmp_path, """
        name: u
        modules:
          a:
            mpi: {ranks: 1}
            arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.05}
    """, {"a/run.sh": f"exec {sys.executable} -c '{BUSY}'\n"}, ["busy"], launchers)
    assert got["busy"]["status"] == 0, got
    assert (got["busy"]["cpu_user_s"], got["busy"]["cpu_system_s"], got["busy"]["max_rss_kb"]) == (None, None, None)

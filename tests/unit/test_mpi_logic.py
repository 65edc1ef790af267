"""Pure logic of MPI stages: the farm's dynamic scheduling and batching, the singleton guard,
MPI-task argv, the ``mpi:`` pipeline key; and that the package imports without mpi4py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from scalebox_hpc import mpi
from scalebox_hpc.errors import InvalidMessageError, MpiError, PipelineError
from scalebox_hpc.launcher.mpi_dispatch import Dispatcher
from scalebox_hpc.launcher.mpirun import mpi_argv, task_ranks, wrap
from scalebox_hpc.models import Task, TaskResult
from scalebox_hpc.pipeline import ModuleSpec, load_pipeline


def task(i: int) -> Task:
    return Task(id=i, app_id=1, module_id=1, body=str(i), headers={}, status=-3, attempts=1)


def result(status: int = 0) -> TaskResult:
    now = datetime.now(UTC)
    return TaskResult(status=status, started_at=now, finished_at=now)


def test_dispatch_is_dynamic_not_round_robin() -> None:
    d = Dispatcher(batch=4)
    for rank in (1, 2, 3):
        d.ready(rank)
    assert d.claim_size() == 4
    d.add([task(i) for i in range(10)])
    assert d.claim_size() == 0
    first = d.assign(now=0.0)
    assert [(a.rank, a.task.id) for a in first] == [(1, 0), (2, 1), (3, 2)]
    # rank 2 is fast: it finishes twice before the others finish once and gets the next tasks
    assert d.finish(2, 1, result(), "n1", now=1.0)
    assert [(a.rank, a.task.id) for a in d.assign(now=1.0)] == [(2, 3)]
    assert d.finish(2, 3, result(), "n1", now=2.0)
    assert [(a.rank, a.task.id) for a in d.assign(now=2.0)] == [(2, 4)]
    assert set(d.running) == {1, 2, 3}
    assert [f.task.id for f in d.done] == [1, 3]


def test_stale_or_foreign_results_are_ignored() -> None:
    d = Dispatcher(batch=2)
    d.ready(1)
    d.add([task(7)])
    d.assign(now=0.0)
    assert not d.finish(1, 8, result(), "h", now=1.0)  # not the task rank 1 runs
    assert not d.finish(2, 7, result(), "h", now=1.0)  # rank 2 runs nothing
    assert d.finish(1, 7, result(), "h", now=1.0)
    assert not d.finish(1, 7, result(), "h", now=1.0)  # twice


def test_a_task_claimed_again_while_a_rank_runs_it_is_not_run_twice() -> None:
    """F27: its lease expired (an outage), it was recovered and this stage claimed it again:
    the running rank's result is recorded against the newer claim, no second rank runs it."""
    d = Dispatcher(batch=2)
    d.ready(1)
    d.ready(2)
    d.add([task(7)])
    d.assign(now=0.0)
    again = Task(id=7, app_id=1, module_id=1, body="7", headers={}, status=-3, attempts=2)
    d.add([again, task(8)])
    assert [(a.rank, a.task.id) for a in d.assign(now=1.0)] == [(2, 8)]
    assert d.finish(1, 7, result(), "h", now=2.0)
    assert [(f.task.id, f.task.attempts) for f in d.done] == [(7, 2)]


def test_results_flush_by_batch_size_age_or_quiet() -> None:
    d = Dispatcher(batch=2, flush_seconds=0.5)
    for rank in (1, 2, 3):
        d.ready(rank)
    d.add([task(i) for i in range(6)])
    d.assign(now=0.0)
    assert not d.flush_due(0.0)
    d.finish(1, 0, result(), "h", now=1.0)
    assert not d.flush_due(1.2)  # one result, others still run, young
    assert d.flush_due(1.6)  # old enough
    d.finish(2, 1, result(1), "h", now=1.7)
    assert d.flush_due(1.7)  # a full batch
    batch = d.take_done()
    assert [(f.task.id, f.result.status if f.result else None) for f in batch] == [(0, 0), (1, 1)]
    assert d.done == [] and not d.flush_due(5.0)
    d.assign(now=2.0)
    d.finish(3, 2, None, "h", now=3.0)  # aborted: to release
    assert d.take_done()[0].result is None


def test_hung_and_lost_ranks() -> None:
    d = Dispatcher(batch=2, hang_seconds=3.0)
    d.ready(1)
    d.ready(2)
    d.add([task(1), task(2), task(3)])
    d.assign(now=0.0)
    d.seen(1, 2.5)
    assert d.hung(now=3.5) == [2]
    lost = d.lose(2)
    assert lost is not None and lost.id == 2
    d.ready(2)  # a lost rank never comes back
    assert 2 not in d.idle and 2 not in d.running
    assert [t.id for t in d.take_pending()] == [3]
    assert d.hung(now=10.0) == [1]
    assert Dispatcher(batch=1).hung(now=1e9) == []


def test_claims_only_when_an_idle_rank_would_wait() -> None:
    d = Dispatcher(batch=3)
    assert d.claim_size() == 0  # nobody ready yet
    d.ready(1)
    assert d.claim_size() == 3
    d.add([task(1)])
    assert d.claim_size() == 0
    assert d.quiet() is False
    d.assign(now=0.0)
    d.finish(1, 1, result(), "h", now=1.0)
    assert d.quiet() and d.claim_size() == 3


def test_singleton_guard() -> None:
    mpi.check_size(4, 4, minimum=2)
    mpi.check_size(3, None, minimum=2)
    with pytest.raises(MpiError, match="has 1 rank\\(s\\) but the launch asked for 4"):
        mpi.check_size(1, 4, minimum=2)
    with pytest.raises(MpiError, match="needs at least 2"):
        mpi.check_size(1, None, minimum=2)
    assert mpi.expected_size({"SLURM_NTASKS": "8"}) == 8
    # SCALEBOX_MPI_RANKS is a setting: node.run_mpi_stage passes it on as StageConfig.expected_ranks
    assert mpi.expected_size({"SCALEBOX_MPI_RANKS": "3", "SLURM_NTASKS": "8"}) == 8
    assert mpi.expected_size({"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "8"}) == 2
    assert mpi.expected_size({}) is None
    with pytest.raises(MpiError, match="no MPI task is running"):
        mpi.task()


def spec(**mpi_keys: object) -> ModuleSpec:
    return ModuleSpec.model_validate({"name": "m", "code_path": "/x", "mpi": mpi_keys})


def test_mpi_task_argv() -> None:
    argv = ["/app/run.sh", "body", "{}"]
    assert wrap(spec(), {}, argv, {}) == argv
    assert wrap(spec(), {"ranks": 4}, argv, {}) == argv  # an ordinary module: the header is data
    assert task_ranks(spec(ranks=3), {}) == 3
    assert task_ranks(spec(ranks=3), {"ranks": "2"}) == 2
    assert task_ranks(spec(ranks=4), {"ranks": 4}) == 4
    assert task_ranks(spec(), {"ranks": 4}) is None
    with pytest.raises(InvalidMessageError):
        task_ranks(spec(ranks=3), {"ranks": "many"})
    with pytest.raises(InvalidMessageError):
        task_ranks(spec(ranks=3), {"ranks": 0})
    assert mpi_argv(argv, 4, {"SLURM_JOB_ID": "7"}) == [
        "srun", "--mpi=pmi2", "--overlap", "--kill-on-bad-exit=1", "-n", "4", *argv]
    local = mpi_argv(argv, 2, {})
    assert local[0].endswith("mpiexec") and local[1:] == ["-n", "2", *argv]


def test_mpi_pipeline_key(tmp_path: Path) -> None:
    def load(body: str) -> object:
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / "run.sh").write_text("true\n")
        (tmp_path / "app.yaml").write_text(textwrap.dedent(body))
        return load_pipeline(tmp_path / "app.yaml")

    app = load("""
        name: t
        modules:
          a: {mpi: {mode: FARM, ranks_per_node: 4, batch: 16}}
          c: {mpi: {mode: collective, handler: "h.py:run"}}
    """)
    a, c = app.modules  # type: ignore[attr-defined]
    assert (a.mpi.mode, a.mpi.ranks_per_node, a.mpi.batch) == ("farm", 4, 16)
    assert c.mpi.handler == "h.py:run"  # no run.sh needed for a collective module
    assert ModuleSpec.model_validate(a.model_dump(mode="json")) == a
    bad = {
        "mpi: {mode: collective}": "needs a handler",
        "mpi: {mode: farm, handler: 'x.py:f'}": "only used by mode collective",
        "mpi: {mode: farm, ranks: 2}": "ranks is for MPI tasks",
        "mpi: {ranks_per_node: 2}": "need mode farm or collective",
        "mpi: {mode: gang}": "farm",
        "mpi: {ranks: 0}": "greater than or equal to 1",
        "mpi: {mode: collective, handler: nocolon}": "file.py:function",
        "mpi: {mdoe: farm}": "did you mean 'mode'",
    }
    for text, message in bad.items():
        with pytest.raises(PipelineError, match=message):
            load(f"name: t\nmodules:\n  a: {{{text}}}\n")


def test_handler_loading(tmp_path: Path) -> None:
    (tmp_path / "h.py").write_text("def run(task):\n    return 5\n")
    assert mpi.load_handler("h.py:run", tmp_path)(None) == 5  # type: ignore[arg-type]
    assert mpi.load_handler("json:dumps", tmp_path)([1]) == "[1]"  # type: ignore[arg-type]
    with pytest.raises(MpiError, match="has no function 'nope'"):
        mpi.load_handler("h.py:nope", tmp_path)
    with pytest.raises(MpiError, match="cannot import"):
        mpi.load_handler("missing.py:run", tmp_path)


def test_package_imports_without_mpi4py() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["mpi4py"] = None  # as if not installed
        import scalebox_hpc.cli, scalebox_hpc.node, scalebox_hpc.mpi
        from scalebox_hpc.launcher import mpi_stage
        from scalebox_hpc.errors import MpiError
        try:
            scalebox_hpc.mpi.load_mpi()
        except MpiError as exc:
            print("ok", exc.hint)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ok") and "scalebox_hpc[mpi]" in out.stdout


def _segment(shm: Path, name: str, age: float) -> Path:
    path = shm / name
    path.write_bytes(b"\0" * 16)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_stale_segments_go_held_and_young_ones_stay(tmp_path: Path) -> None:
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    stale = _segment(shm, "mpich_shm_dead_0", 60)
    mapped = _segment(shm, "mpich_shm_live_0", 60)
    opened = _segment(shm, "mpich_shm_live_1", 60)
    young = _segment(shm, "mpich_shm_new_0", 1)
    other = _segment(shm, "PostgreSQL.123", 60)
    (proc / "42" / "fd").mkdir(parents=True)
    (proc / "42" / "maps").write_text(
        f"7f00-7f10 rw-s 00000000 00:1a 77 {mapped}\n7f10-7f20 r-xp 00000000 08:01 5 /usr/lib/libc.so.6\n"
    )
    (proc / "42" / "fd" / "5").symlink_to(opened)
    (proc / "self").mkdir()  # not a pid: ignored
    (proc / "43").mkdir()  # a process that vanished meanwhile: no fd/, no maps

    removed = mpi.remove_stale_segments(shm, min_age=10, proc=proc)

    assert removed == [stale]
    assert not stale.exists() and mapped.exists() and opened.exists() and young.exists() and other.exists()


def test_no_shm_dir_is_not_an_error(tmp_path: Path) -> None:
    assert mpi.remove_stale_segments(tmp_path / "absent", proc=tmp_path) == []


def _deadline_child(body: str, **env: str) -> subprocess.CompletedProcess[str]:
    code = ("import time\nfrom scalebox_hpc import mpi, settings\n"  # the timeout as the root reads it
            "with mpi.init_deadline(settings.Settings.from_environ().mpi_init_timeout):\n"
            f"    {body}\ntime.sleep(1.0)\n")
    environ = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=environ,
                          check=False)


def test_a_hung_init_ends_the_process_with_its_traceback() -> None:
    proc = _deadline_child("time.sleep(30)", SCALEBOX_MPI_INIT_TIMEOUT="0.5")
    assert proc.returncode == 1 and "Timeout (0:00:00.500000)!" in proc.stderr, proc.stderr
    assert 'File "<string>", line 4' in proc.stderr, proc.stderr  # where it hung: the sleep


def test_the_deadline_is_off_once_init_returned_or_when_disabled() -> None:
    assert _deadline_child("pass", SCALEBOX_MPI_INIT_TIMEOUT="0.5").returncode == 0  # slept past it afterwards
    assert _deadline_child("time.sleep(1.0)", SCALEBOX_MPI_INIT_TIMEOUT="0").returncode == 0

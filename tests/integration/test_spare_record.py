"""A slot session's run record is one file reused run after run (renamed to the run's record
name while it runs, back after): the fence sees what it saw with a new file per run (real
processes, no mocks; see scalebox_hpc/runtime/local.py SpareRecord)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalebox_hpc.runtime import fence
from scalebox_hpc.runtime.base import RunSpec, SessionSpec
from scalebox_hpc.runtime.local import SPARE_RECORD, LocalRuntime, LocalSession
from tests.helpers import running, wait_until


@pytest.fixture
def slot(tmp_path: Path) -> SessionSpec:
    work = tmp_path / "app-1" / "m" / "host-slot0"
    private = work.parent / f".{work.name}.scalebox"
    for d in (work, private):
        d.mkdir(parents=True)
    return SessionSpec(name="app-1.m.host-slot0", work_dir=work, private_dir=private, code_path=tmp_path)


@pytest.fixture
def session(slot: SessionSpec) -> Iterator[LocalSession]:
    s = LocalRuntime().open(slot)
    yield s
    s.close()


def spec(slot: SessionSpec, text: str, label: str = "run") -> RunSpec:
    path = slot.work_dir.parent / f"{label}.sh"
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return RunSpec(argv=[str(path)], cwd=slot.work_dir, env={"PATH": os.environ["PATH"]},
                   stdout_path=slot.private_dir / f"{label}.out", stderr_path=slot.private_dir / f"{label}.err")


def records(slot: SessionSpec) -> list[Path]:
    return sorted(slot.private_dir.glob(f"{fence.RECORD_PREFIX}*{fence.RECORD_SUFFIX}"))


def test_the_spare_is_the_live_runs_record_and_only_while_it_runs(slot: SessionSpec, session: LocalSession) -> None:
    spare = slot.private_dir / SPARE_RECORD
    for label in ("a-much-longer-label-than-the-next", "b"):  # a shorter record after a longer one
        run = session.start(spec(slot, "touch started; sleep 30\n", label))
        wait_until(lambda: (slot.work_dir / "started").exists())
        [path] = records(slot)
        assert not spare.exists() and path.stat().st_mode & 0o777 == 0o600
        record = fence.read_record(path)  # the whole file parses: nothing left of the longer one
        [root] = record.roots
        assert root.pid == run.proc.pid and root.find() is not None
        assert record.label == f"{label} of {slot.name}" and record.owner == fence.this_process()
        run.kill(grace=1.0)
        (slot.work_dir / "started").unlink()
        assert records(slot) == [] and spare.exists()


def test_a_second_live_run_gets_a_record_of_its_own(slot: SessionSpec, session: LocalSession) -> None:
    first = session.start(spec(slot, "sleep 30\n", "first"))
    second = session.start(spec(slot, "sleep 30\n", "second"))
    assert {fence.read_record(p).roots[0].pid for p in records(slot)} == {first.proc.pid, second.proc.pid}
    first.kill(grace=1.0)
    assert [fence.read_record(p).roots[0].pid for p in records(slot)] == [second.proc.pid]
    second.kill(grace=1.0)
    assert records(slot) == []


def test_a_killed_launchers_run_recorded_in_the_spare_is_ended_by_the_next_session(slot: SessionSpec) -> None:
    old = LocalRuntime().open(slot)
    run = old.start(spec(slot, "sleep 60\n"))  # never waited for: as if its launcher died
    pid = run.proc.pid
    assert [fence.read_record(p).roots[0].pid for p in records(slot)] == [pid]
    ended = fence.sweep(slot.private_dir, slot.name, grace=1.0)  # what the next session's open does
    assert pid in ended and records(slot) == []
    run.wait(5)
    assert not running(pid)
    old.close()


def test_something_planted_at_the_spares_name_is_not_used(slot: SessionSpec, session: LocalSession,
                                                         tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (slot.private_dir / SPARE_RECORD).symlink_to(victim)
    run = session.start(spec(slot, "sleep 30\n"))
    [path] = records(slot)
    assert not path.is_symlink() and fence.read_record(path).roots[0].pid == run.proc.pid
    run.kill(grace=1.0)
    assert records(slot) == [] and victim.read_text() == "precious\n"

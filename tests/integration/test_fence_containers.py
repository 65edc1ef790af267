"""F4/F25 in warm containers, against the real Apptainer and Podman: a request's background
children end with it, and a killed launcher's container and processes end when the slot's next
session opens (no leftover container name blocks it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from scalebox_hpc.runtime.base import RunSpec, Session, SessionSpec
from scalebox_hpc.runtime.choose import RuntimeChooser
from scalebox_hpc.runtime.container import HostDirs, container_prefix
from tests.components import apptainer_available, need, podman_available

pytestmark = pytest.mark.apptainer

REPO = Path(__file__).resolve().parents[2]
ENGINES = [pytest.param("apptainer"), pytest.param("podman", marks=pytest.mark.podman)]


@pytest.fixture(scope="session")
def sif_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sif-cache")


@pytest.fixture
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    name = str(request.param)
    reason = apptainer_available() if name == "apptainer" else podman_available()
    if reason:
        need(name, reason)
    monkeypatch.setenv("SCALEBOX_CONTAINERS", str(REPO / "containers"))
    return name


@pytest.fixture
def slot(tmp_path: Path) -> SessionSpec:
    work = tmp_path / "app-1" / "m" / "host-slot0"
    private = work.parent / f".{work.name}.scalebox"
    for d in (work, private, tmp_path / "code", tmp_path / "local"):
        d.mkdir(parents=True)
    return SessionSpec(name=f"app-1.m.host-slot0-{os.getpid()}", work_dir=work, private_dir=private,
                       code_path=tmp_path / "code", image="scalebox-base")


def chooser(engine: str, slot: SessionSpec, sif_cache: Path) -> RuntimeChooser:
    return RuntimeChooser(engine, host=HostDirs(local_dir=slot.code_path.parent / "local"), sif_cache=sif_cache)


def script(slot: SessionSpec, text: str) -> RunSpec:
    path = slot.code_path / "run.sh"
    path.write_text("#!/bin/sh\n" + text)  # busybox sh: the image has no bash
    path.chmod(0o755)
    return RunSpec(argv=[str(path), "b", "{}"], cwd=slot.work_dir, env={"PATH": os.environ["PATH"]},
                   stdout_path=slot.private_dir / "run.out", stderr_path=slot.private_dir / "run.err")


def leftovers(marker: str) -> list[psutil.Process]:
    """Running (not zombie) processes with ``marker`` in their command line."""
    found = []
    for p in psutil.process_iter():
        try:
            if any(marker in a for a in p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def containers(prefix: str) -> list[str]:
    out = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True,
                         check=True).stdout
    return [n for n in out.split() if n.startswith(prefix)]


@pytest.fixture
def sessions() -> Iterator[list[Session]]:
    opened: list[Session] = []
    yield opened
    for s in opened:
        s.close()


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_background_children_of_a_request_end_with_it(engine: str, slot: SessionSpec, sif_cache: Path,
                                                      sessions: list[Session]) -> None:
    marker = f"2.{os.getpid() % 1000}1"
    session = chooser(engine, slot, sif_cache).open(slot)
    sessions.append(session)
    spec = script(slot, f"sh -c 'sleep {marker}; echo late >> /work/sink-tasks.txt' &\necho started\nexit 0\n")
    t0 = time.monotonic()
    outcome = session.start(spec).wait(30)
    assert outcome is not None and outcome.returncode == 0
    assert time.monotonic() - t0 < 5
    assert leftovers(marker) == []  # ended by the agent before it answered "exit"
    time.sleep(3)
    assert not (slot.work_dir / "sink-tasks.txt").exists()
    # the agent goes on serving requests
    outcome = session.start(script(slot, "echo again > again.txt\n")).wait(30)
    assert outcome is not None and outcome.returncode == 0
    assert (slot.work_dir / "again.txt").read_text() == "again\n"


STARTER = """
import os, sys, time
from pathlib import Path
from scalebox_hpc.runtime.base import RunSpec, SessionSpec
from scalebox_hpc.runtime.choose import RuntimeChooser
from scalebox_hpc.runtime.container import HostDirs
engine, name, work, private, code, local, cache = sys.argv[1:8]
session = RuntimeChooser(engine, host=HostDirs(local_dir=Path(local)), sif_cache=Path(cache)).open(SessionSpec(
    name=name, work_dir=Path(work), private_dir=Path(private), code_path=Path(code), image="scalebox-base"))
session.start(RunSpec(argv=[code + "/run.sh", "b", "{}"], cwd=Path(work), env={"PATH": os.environ["PATH"]},
                      stdout_path=Path(private) / "run.out", stderr_path=Path(private) / "run.err"))
print(session.name, flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_a_killed_launchers_warm_container_ends_when_the_slot_reopens(
    engine: str, slot: SessionSpec, sif_cache: Path, sessions: list[Session],
) -> None:
    marker = f"4{os.getpid() % 1000}.3"
    script(slot, f"sh -c 'sleep {marker}; echo late > /work/task-exec.json' &\n"
                 f"touch /work/started\nsleep 30{marker}\n")
    argv = [sys.executable, "-c", STARTER, engine, slot.name, str(slot.work_dir), str(slot.private_dir),
            str(slot.code_path), str(slot.code_path.parent / "local"), str(sif_cache)]
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert launcher.stdout is not None
    old_name = launcher.stdout.readline().strip()
    deadline = time.monotonic() + 60
    while not (slot.work_dir / "started").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    launcher.kill()  # kill -9: the container, its agent and the run are orphans now
    launcher.wait()
    assert len(leftovers(marker)) >= 2
    if engine == "podman":
        assert containers(old_name) == [old_name]
    session = chooser(engine, slot, sif_cache).open(slot)
    sessions.append(session)
    assert leftovers(marker) == []  # ended before open() returned
    new_name = session.name  # type: ignore[attr-defined]
    assert new_name != old_name and new_name.startswith(container_prefix(slot))
    if engine == "podman":
        assert containers(container_prefix(slot)) == [new_name]  # the stale one was removed
    outcome = session.start(script(slot, "echo fresh > fresh.txt\n")).wait(30)
    assert outcome is not None and outcome.returncode == 0
    time.sleep(4.5)
    assert not (slot.work_dir / "task-exec.json").exists()


@pytest.mark.podman
@pytest.mark.parametrize("engine", [pytest.param("podman", marks=pytest.mark.podman)], indirect=True)
def test_stale_containers_of_the_slot_are_removed_and_others_kept(
    engine: str, slot: SessionSpec, sif_cache: Path, sessions: list[Session],
) -> None:
    """An old-format name and one of a dead launcher go; another slot's container stays."""
    first = chooser(engine, slot, sif_cache).open(slot)  # builds the image
    sessions.append(first)
    image = first.image  # type: ignore[attr-defined]
    prefix = container_prefix(slot)
    stale = [f"{prefix}1", f"{prefix}4194000-abc-1"]  # old format; a pid that is not running
    other = f"{prefix[:-1]}0-{os.getpid()}-x"  # slot0N..., not this slot
    for name in [*stale, other]:
        subprocess.run(["podman", "run", "-d", "--name", name, image, "sleep", "300"], check=True,
                       capture_output=True)
    try:
        first.close()
        session = chooser(engine, slot, sif_cache).open(slot)
        sessions.append(session)
        assert containers(prefix) == [session.name]  # type: ignore[attr-defined]
        assert containers(other) == [other]
    finally:
        for name in [*stale, other]:  # one by one: a name already gone fails the whole command
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, check=False)


@pytest.mark.podman
@pytest.mark.parametrize("engine", [pytest.param("podman", marks=pytest.mark.podman)], indirect=True)
def test_remove_goes_on_past_a_container_already_gone(engine: str, slot: SessionSpec, sif_cache: Path,
                                                      sessions: list[Session]) -> None:
    """Podman 4.3's `rm -f GONE A B` removes neither A nor B: the sweep removes one by one."""
    from scalebox_hpc.runtime.podman import EngineCli

    first = chooser(engine, slot, sif_cache).open(slot)
    sessions.append(first)
    image = first.image  # type: ignore[attr-defined]
    names = [f"sbx-rm-test-{os.getpid()}-{i}" for i in range(2)]
    for name in names:
        subprocess.run(["podman", "run", "-d", "--name", name, image, "sleep", "300"], check=True, capture_output=True)
    try:
        EngineCli("podman", "podman").remove([f"sbx-rm-test-{os.getpid()}-gone", *names])
        assert containers(f"sbx-rm-test-{os.getpid()}-") == []
    finally:
        for name in names:
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, check=False)

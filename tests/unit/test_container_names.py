"""F25: container names are unique per launcher process and checkable; the sweep at a session's
open removes only this slot's containers of launchers that are gone (no engine needed)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from scalebox_hpc.runtime import fence
from scalebox_hpc.runtime.base import SessionSpec
from scalebox_hpc.runtime.container import (
    _live_owner,
    container_name,
    container_prefix,
    owner_tag,
    sweep_containers,
)


def spec(name: str) -> SessionSpec:
    return SessionSpec(name=name, work_dir=Path("/w"), private_dir=Path("/p"), code_path=Path("/c"))


class FakeEngine:
    """Holds container names; records what the sweep removes."""

    name = "podman"

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.removed: list[str] = []

    def containers(self, prefix: str) -> list[str]:
        return [n for n in self.names if prefix.replace(".", "") in n.replace(".", "")]  # a loose filter

    def remove(self, names: Sequence[str]) -> None:
        self.removed += names


def test_names_carry_the_launcher_and_never_repeat() -> None:
    s = spec("app-3.calc.host1-slot1")
    a, b = container_name(s), container_name(s)
    me = fence.this_process()
    assert re.fullmatch(rf"sbx-app-3\.calc\.host1-slot1-{me.pid}-[0-9a-z]+-\d+", a)
    assert a != b and a.rsplit("-", 1)[0] == b.rsplit("-", 1)[0]
    assert a.startswith(container_prefix(s)) and owner_tag() in a
    # another launcher process (same slot) gets another name
    code = ("from pathlib import Path; from scalebox_hpc.runtime.base import SessionSpec; "
            "from scalebox_hpc.runtime.container import container_name; "
            "print(container_name(SessionSpec(name='app-3.calc.host1-slot1', work_dir=Path('/w'), "
            "private_dir=Path('/p'), code_path=Path('/c'))))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other.startswith(container_prefix(s)) and other.rsplit("-", 1)[0] != a.rsplit("-", 1)[0]


def test_prefixes_of_distinct_slots_never_overlap() -> None:
    slot1, slot10 = container_prefix(spec("app-3.calc.host1-slot1")), container_prefix(spec("app-3.calc.host1-slot10"))
    assert not slot10.startswith(slot1)
    # names changed to safe characters or shortened get a hash: "a b" and "a-b" differ
    assert container_prefix(spec("app-1.a b.h-slot0")) != container_prefix(spec("app-1.a-b.h-slot0"))
    long_a, long_b = "app-1." + "m" * 100 + ".h-slot0", "app-1." + "m" * 100 + ".h-slot1"
    assert container_prefix(spec(long_a)) != container_prefix(spec(long_b))
    assert len(container_prefix(spec(long_a))) < 80


def test_live_owner_tells_dead_live_and_own_launchers_apart() -> None:
    prefix = container_prefix(spec("app-1.m.h-slot0"))
    child = subprocess.Popen(["sleep", "30"])
    try:
        proc = fence.Proc.of(child.pid)
        assert proc is not None
        assert _live_owner(f"{prefix}{owner_tag(proc)}-1", prefix) == child.pid  # another live launcher
        assert _live_owner(f"{prefix}{child.pid}-zzz-1", prefix) is None  # same pid, another start: reused
    finally:
        child.kill()
        child.wait()
    assert _live_owner(f"{prefix}{owner_tag(proc)}-1", prefix) is None  # that launcher is gone
    assert _live_owner(f"{prefix}{owner_tag()}-1", prefix) is None  # ours, from a session never closed
    assert _live_owner(f"{prefix}7", prefix) is None  # the old sbx-SLOT-N format


def test_sweep_removes_only_stale_containers_of_this_slot(caplog: pytest.LogCaptureFixture) -> None:
    s = spec("app-1.m.h-slot0")
    prefix = container_prefix(s)
    child = subprocess.Popen(["sleep", "30"])
    try:
        live = fence.Proc.of(child.pid)
        assert live is not None
        names = [f"{prefix}3", f"{prefix}{os.getpid()}-abc-2", f"{prefix}{owner_tag(live)}-1",
                 "sbx-app-1.m.h-slot01-1", "sbx-app-1.m.h-slot0x-1"]
        engine = FakeEngine(names)
        with caplog.at_level(logging.WARNING):
            removed = sweep_containers(engine, s)  # type: ignore[arg-type]  # only the sweep's two methods
    finally:
        child.kill()
        child.wait()
    assert removed == engine.removed == names[:2]
    assert f"belongs to a live launcher (pid {child.pid})" in caplog.text

"""A slot facing a database outage backs off instead of spinning or idling out."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from scalebox_hpc.db.queue import ModuleRef
from scalebox_hpc.errors import DatabaseError
from scalebox_hpc.launcher.slot import Slot, SlotContext, SlotControl
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import ConflictAction
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.local import LocalRuntime


class DownQueue:
    """A queue port whose database is away: every claim fails."""

    def __init__(self) -> None:
        self.claims = 0

    def claim(self, *args: Any, **kwargs: Any) -> list[Any]:
        self.claims += 1
        raise DatabaseError("cannot reach PostgreSQL: connection refused")

    def create_slot(self, *args: Any, **kwargs: Any) -> int:
        return 1

    def set_slot_status(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        return None


def slot_context(tmp_path: Path, max_idle_polls: int, control: SlotControl) -> SlotContext:
    """One slot of module `a` (run.sh: true) polling every 10 ms."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "run.sh").write_text("true\n")
    spec = ModuleSpec.model_validate({"name": "a", "code_path": str(tmp_path / "code"), "arguments": {
        "max_idle_polls": max_idle_polls, "sleep_interval_seconds": 0.01}})
    ref = ModuleRef(1, "a", (), ConflictAction.FAIL)
    return SlotContext(app_id=1, module=spec, ref=ref, modules={"a": ref}, host="h", seq=0,
                       work_dir=tmp_path / "work", runtime=LocalRuntime(), wakeups=Wakeups(), control=control,
                       base_env={})


def test_outage_backs_off_exponentially_and_never_idles_out(tmp_path: Path) -> None:
    control = SlotControl()
    ctx = slot_context(tmp_path, 1, control)
    wakeups = ctx.wakeups
    queue = DownQueue()
    slot = Slot(ctx, queue)  # type: ignore[arg-type]
    thread = threading.Thread(target=slot.run)
    thread.start()
    wakeups.notify(1)  # a hint on the module channel must not cut the backoff short
    time.sleep(1.8)
    assert thread.is_alive()  # an outage is not idleness
    control.draining.set()
    wakeups.notify_all()
    thread.join(5)
    assert not thread.is_alive()
    assert 2 <= queue.claims <= 4, queue.claims  # 0.5 s, 1 s, 2 s ... not a spin


class EmptyQueue(DownQueue):
    """A reachable queue with nothing to do: the app runs, quiet."""

    def claim(self, *args: Any, **kwargs: Any) -> list[Any]:
        self.claims += 1
        return []

    def module_activity(self, app_id: int, module_id: int) -> tuple[str, bool]:
        return "RUNNING", False

    def heartbeat(self, *args: Any, **kwargs: Any) -> None:
        return None

    def recover_expired(self, **kwargs: Any) -> list[Any]:
        return []

    def app_cancelled(self, app_id: int) -> bool:
        return False


def test_an_idle_slot_ends_only_when_its_stage_job_may_leave(tmp_path: Path) -> None:
    answers = [False, False, True]
    asked: list[bool] = []

    def may_idle_exit() -> bool:
        asked.append(answers[len(asked)])
        return asked[-1]

    ctx = slot_context(tmp_path, 2, SlotControl(may_idle_exit=may_idle_exit))
    queue = EmptyQueue()
    thread = threading.Thread(target=Slot(ctx, queue).run)  # type: ignore[arg-type]
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert asked == [False, False, True]
    assert queue.claims == 6  # asked after every idle timeout (2 empty polls), not after every poll


def test_once_one_slot_may_leave_the_others_do_not_ask_again() -> None:
    from scalebox_hpc.launcher.launcher import _once_true

    calls: list[int] = []

    def ask() -> bool:
        calls.append(1)
        return len(calls) >= 2

    asked = _once_true(ask)
    assert [asked(), asked(), asked(), asked()] == [False, True, True, True]
    assert len(calls) == 2

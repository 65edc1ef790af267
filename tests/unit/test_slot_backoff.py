"""A slot facing a database outage backs off instead of spinning or idling out."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from scalebox_hpc.launcher.slot import Slot, SlotContext, SlotControl
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.local import LocalRuntime
from scalebox_hpc.testing import InMemoryQueue


def quiet_queue() -> InMemoryQueue:
    """A reachable queue with nothing to do: app 1 runs, its module `a` (id 1) has no tasks."""
    queue = InMemoryQueue()
    assert queue.create_app({"name": "t", "modules": {"a": {}}}) == 1
    return queue


def slot_context(tmp_path: Path, queue: InMemoryQueue, max_idle_polls: int, control: SlotControl) -> SlotContext:
    """One slot of module `a` (run.sh: true) of app 1 polling every 10 ms."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "run.sh").write_text("true\n")
    spec = ModuleSpec.model_validate({"name": "a", "code_path": str(tmp_path / "code"), "arguments": {
        "max_idle_polls": max_idle_polls, "sleep_interval_seconds": 0.01}})
    refs = queue.modules(1)
    return SlotContext(app_id=1, module=spec, ref=refs["a"], modules=refs, host="h", seq=0,
                       work_dir=tmp_path / "work", runtime=LocalRuntime(), wakeups=Wakeups(), control=control,
                       base_env={})


def test_outage_backs_off_exponentially_and_never_idles_out(tmp_path: Path) -> None:
    control = SlotControl()
    queue = quiet_queue()
    queue.fail_next(10**9, methods={"claim"})  # the database is away: every claim fails
    ctx = slot_context(tmp_path, queue, 1, control)
    wakeups = ctx.wakeups
    slot = Slot(ctx, queue)
    thread = threading.Thread(target=slot.run)
    thread.start()
    wakeups.notify(1)  # a hint on the module channel must not cut the backoff short
    time.sleep(1.8)
    assert thread.is_alive()  # an outage is not idleness
    control.draining.set()
    wakeups.notify_all()
    thread.join(5)
    assert not thread.is_alive()
    assert 2 <= queue.calls["claim"] <= 4, queue.calls  # 0.5 s, 1 s, 2 s ... not a spin


def test_an_idle_slot_ends_only_when_its_stage_job_may_leave(tmp_path: Path) -> None:
    answers = [False, False, True]
    asked: list[bool] = []

    def may_idle_exit() -> bool:
        asked.append(answers[len(asked)])
        return asked[-1]

    queue = quiet_queue()
    ctx = slot_context(tmp_path, queue, 2, SlotControl(may_idle_exit=may_idle_exit))
    thread = threading.Thread(target=Slot(ctx, queue).run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert asked == [False, False, True]
    assert queue.calls["claim"] == 6  # asked after every idle timeout (2 empty polls), not after every poll


def test_once_one_slot_may_leave_the_others_do_not_ask_again() -> None:
    from scalebox_hpc.launcher.launcher import _once_true

    calls: list[int] = []

    def ask() -> bool:
        calls.append(1)
        return len(calls) >= 2

    asked = _once_true(ask)
    assert [asked(), asked(), asked(), asked()] == [False, True, True, True]
    assert len(calls) == 2

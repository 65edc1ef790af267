"""A slot facing a database outage backs off instead of spinning or idling out."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

from scalebox_hpc.launcher.slot import Slot, SlotContext, SlotControl
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.local import LocalRuntime
from scalebox_hpc.testing import FakeClock, InMemoryQueue


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
    """On a fake clock: the claims of a slot whose every claim fails come 0.5 s, 1 s, 2 s ...
    apart (doubling up to 30 s), and the slot, whose module idles out after one empty poll, is
    still polling after 40 of them: an outage is not idleness."""
    control = SlotControl()
    queue = quiet_queue()
    queue.fail_next(10**9, methods={"claim"})  # the database is away: every claim fails
    clock = FakeClock()
    claims: list[float] = []
    claim = queue.claim

    def timed_claim(*args: Any, **kwargs: Any) -> Any:
        claims.append(clock.monotonic())
        if len(claims) == 40:
            control.draining.set()  # stop the slot; it never stopped by itself
        return claim(*args, **kwargs)

    queue.claim = timed_claim  # type: ignore[method-assign]
    slot = Slot(slot_context(tmp_path, queue, 1, control), queue, clock=clock)
    slot.run()  # in this thread: it ends when drained
    gaps = [b - a for a, b in itertools.pairwise(claims)]
    assert gaps[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert set(gaps[7:]) == {30.0}
    assert len(claims) == 40
    assert slot.final_status == "EXITED"


def test_a_module_hint_does_not_cut_an_outage_wait_short_but_a_drain_does() -> None:
    """The real (clock-less) outage wait is on channel -2 of the slot's wake-ups."""
    wakeups = Wakeups()
    seen = wakeups.generation(-2)
    wakeups.notify(1)  # a NOTIFY hint for the module
    assert wakeups.wait(-2, seen, 0) is False
    wakeups.notify_all()  # drain, shutdown
    assert wakeups.wait(-2, seen, 0) is True


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

"""A run.sh slot behind the node's dispatcher runs its prefetched tasks as one batch and hands
their results over together (one statement), not one hand-off per task: except the results that
emitted messages (handed over at once: downstream waits for them), and a drain stops the batch
(the tasks not started go back)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scalebox_hpc.launcher.slot import Batches, Slot, SlotContext, SlotControl
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import ModuleRef, Task, TaskResult, TaskStatus
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.local import LocalRuntime
from scalebox_hpc.testing import InMemoryQueue

RUN_SH = """#!/bin/sh
case "$1" in emit*) echo "next-$1" >> sink-tasks.txt ;; esac
"""


class Prefetching(InMemoryQueue):
    """The dispatcher's shape for a slot: its claim gets one task, ``take_more`` the others
    (as if prefetched), and the hand-offs are recorded (then completed, as the dispatcher would)."""

    def __init__(self) -> None:
        super().__init__()
        self.singles: list[int] = []
        self.groups: list[list[int]] = []

    def take_more(self, app_id: int, module_id: int, *, host: str, slot_id: int, slot_seq: int, limit: int,
                  lease_seconds: float = 30.0) -> list[Task]:
        return self.claim(app_id, module_id, host=host, slot_id=slot_id, slot_seq=slot_seq, limit=limit,
                          lease_seconds=lease_seconds)

    def hand_off(self, task: Task, result: TaskResult, *, slot_id: int, host: str, sender: ModuleRef,
                 modules: dict[str, ModuleRef], requeue: bool, requeue_for: Callable[[int], bool]) -> None:
        self.singles.append(task.id)
        self.complete(task, result, slot_id=slot_id, host=host, sender=sender, modules=modules, requeue=requeue)

    def hand_off_many(
        self, items: Sequence[tuple[Task, TaskResult, bool, Callable[[int], bool]]], *, slot_id: int, host: str,
        sender: ModuleRef, modules: dict[str, ModuleRef], seconds: float | None = None,
    ) -> None:
        self.groups.append([task.id for task, *_ in items])
        for task, result, requeue, _rule in items:
            self.complete(task, result, slot_id=slot_id, host=host, sender=sender, modules=modules, requeue=requeue)


def slot_for(tmp_path: Path, bodies: list[str], control: SlotControl) -> tuple[Slot, Prefetching]:
    queue = Prefetching()
    assert queue.create_app({"name": "t", "modules": {"a": {"sink_modules": ["b"]}, "b": {}}}) == 1
    queue.add_tasks(1, "a", bodies)
    code = tmp_path / "code"
    code.mkdir()
    (code / "run.sh").write_text(RUN_SH)
    (code / "run.sh").chmod(0o755)
    spec = ModuleSpec.model_validate({"name": "a", "code_path": str(code), "sink_modules": ["b"], "arguments": {
        "max_idle_polls": 1, "sleep_interval_seconds": 0.01}})
    refs = queue.modules(1)
    ctx = SlotContext(app_id=1, module=spec, ref=refs["a"], modules=refs, host="h", seq=0,
                      work_dir=tmp_path / "work", runtime=LocalRuntime(), wakeups=Wakeups(), control=control,
                      base_env={})
    assert isinstance(queue, Batches)
    return Slot(ctx, queue), queue


def statuses(queue: Prefetching, module: str) -> list[Any]:
    return [(t["body"], t["status"]) for t in queue.tasks(1, module=module)]


def test_a_script_slot_hands_its_batch_over_in_one_go(tmp_path: Path) -> None:
    slot, queue = slot_for(tmp_path, [f"t{i}" for i in range(5)], SlotControl())
    slot.run()
    assert slot.final_status == "EXITED"
    assert queue.singles == []
    assert [len(g) for g in queue.groups] == [5]
    assert {s for _, s in statuses(queue, "a")} == {0}
    assert slot.tasks_done == 5


def test_results_with_messages_are_handed_over_at_once(tmp_path: Path) -> None:
    slot, queue = slot_for(tmp_path, ["t0", "emit1", "t2", "t3", "emit4", "t5"], SlotControl())
    slot.run()
    assert [len(g) for g in queue.groups] == [2, 3, 1]  # up to each emitting task, then the rest
    assert sorted(b for b, _ in statuses(queue, "b")) == ["next-emit1", "next-emit4"]
    assert slot.tasks_done == 6


def test_a_drain_stops_the_batch_and_gives_the_rest_back(tmp_path: Path) -> None:
    control = SlotControl()
    slot, queue = slot_for(tmp_path, [f"t{i}" for i in range(5)], control)
    execute = slot.runner.execute
    ran: list[str] = []

    def execute_then_drain(task: Task) -> TaskResult | None:
        result = execute(task)
        ran.append(task.body)
        if len(ran) == 2:
            control.draining.set()
        return result

    slot.runner.execute = execute_then_drain  # type: ignore[method-assign]
    slot.run()
    assert ran == ["t0", "t1"]
    assert queue.groups == [[t["id"] for t in queue.tasks(1, module="a")][:2]]
    assert statuses(queue, "a") == [("t0", 0), ("t1", 0), *((f"t{i}", TaskStatus.READY) for i in range(2, 5))]
    assert [t["attempts"] for t in queue.tasks(1, module="a")][2:] == [0, 0, 0]  # not counted


def test_a_drain_right_after_an_emitting_task_stops_the_batch_too(tmp_path: Path) -> None:
    """The emitting result is handed over at once; the drain that follows stops the batch there
    (handing over early must not make the next task look like the batch's first)."""
    control = SlotControl()
    slot, queue = slot_for(tmp_path, ["t0", "emit1", "t2", "t3"], control)
    execute = slot.runner.execute
    ran: list[str] = []

    def execute_then_drain(task: Task) -> TaskResult | None:
        result = execute(task)
        ran.append(task.body)
        if task.body == "emit1":
            control.draining.set()
        return result

    slot.runner.execute = execute_then_drain  # type: ignore[method-assign]
    slot.run()
    assert ran == ["t0", "emit1"]
    assert statuses(queue, "a") == [("t0", 0), ("emit1", 0), ("t2", TaskStatus.READY), ("t3", TaskStatus.READY)]

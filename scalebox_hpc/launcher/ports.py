"""The seams the launcher is typed against; concrete objects come from the composition roots."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from scalebox_hpc.models import Beat, Completion, ModuleRef, Released, SlotWant, Task, TaskResult


class TaskQueue(Protocol):
    """One slot's handle on the shared queue (PgQueue in production)."""

    def modules(self, app_id: int) -> dict[str, ModuleRef]: ...
    def module_specs(self, app_id: int) -> dict[str, dict[str, Any]]: ...
    def claim(
        self, app_id: int, module_id: int, *, host: str, slot_id: int, slot_seq: int,
        limit: int = 1, lease_seconds: float = 30.0, semaphore: str | None = None,
    ) -> list[Task]: ...
    def claim_for_slots(
        self, app_id: int, module_id: int, *, host: str, slots: Sequence[SlotWant],
        lease_seconds: float = 30.0, semaphore: str | None = None,
    ) -> dict[int, list[Task]]:
        """One statement claims for several slots of one module (every rule of :meth:`claim`);
        returns the tasks per slot id (a slot absent: none for it). A task addressed to a
        slot's seq (``to_slot``) goes to that slot; the others are dealt round-robin, at most
        ``want`` each. With a ``semaphore``, one unit per claimed task, taken atomically."""
        ...
    def app_cancelled(self, app_id: int) -> bool: ...
    def complete(
        self, task: Task, result: TaskResult, *, slot_id: int, host: str, sender: ModuleRef,
        modules: dict[str, ModuleRef], requeue: bool = False,
    ) -> int: ...
    def recover_expired(self, *, every: float = 0.0) -> list[tuple[int, int]]: ...
    def heartbeat(
        self, slot_id: int, *, status: str, lease_seconds: float, task_ids: Sequence[int] | None = None,
    ) -> list[int]: ...
    def heartbeat_slots(self, beats: Sequence[Beat]) -> list[int]:
        """One statement renews every slot of the node and its tasks' leases (as
        :meth:`heartbeat` does for one); returns the ids of stray tasks released."""
        ...
    def app_uid(self, app_id: int) -> str: ...
    def task_service(self, app_id: int, request: Any) -> Any:
        """A running task's call (a :class:`scalebox_hpc.taskapi.Request`) for ``app_id``: its
        value, or a ScaleboxError to hand back to the task."""
        ...
    def index_scratch(
        self, host: str, added: list[tuple[str, int]], removed: list[str], *, replace: bool = False,
    ) -> None: ...
    def adopt_tasks(self, app_id: int, host: str, *, limit: int = ...) -> int: ...
    def release(self, slot_id: int) -> Released:
        """Give the slot's RUNNING tasks back to READY: how many, and the ids another
        transaction held (not released: to try again shortly; the node's dispatcher does)."""
        ...
    def module_activity(self, app_id: int, module_id: int) -> tuple[str, bool]: ...
    def register_host(self, name: str, info: dict[str, Any]) -> None: ...
    def create_slot(
        self, module_id: int, *, host: str, seq: int, pid: int, work_dir: str, heartbeat_seconds: float = ...,
    ) -> int: ...
    def set_slot_status(
        self, slot_id: int, status: str, *, message: str | None = None, tasks_done: int = 0
    ) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class HandsOff(Protocol):
    """A queue that records hand-offs in the background (the node's dispatcher): the slot
    goes on to its next task while its last result is being committed."""

    def hand_off(
        self, task: Task, result: TaskResult, *, slot_id: int, host: str, sender: ModuleRef,
        modules: dict[str, ModuleRef], requeue: bool, requeue_for: Callable[[int], bool],
    ) -> None: ...


class BatchQueue(TaskQueue, Protocol):
    """The MPI stage's rank 0: a TaskQueue that also records and releases tasks in batches."""

    def complete_many(
        self, items: Sequence[Completion], *, slot_id: int, sender: ModuleRef, modules: dict[str, ModuleRef],
    ) -> list[int | None]:
        """Record a batch of results atomically per item; per item the messages written, None
        when its lease was lost, or :data:`~scalebox_hpc.models.HAND_OFF_BUSY` when its row was
        held by another transaction (nothing recorded: try it again shortly)."""
        ...
    def release_ids(self, slot_id: int, task_ids: Sequence[int]) -> Released: ...


QueueFactory = Callable[[], BatchQueue]
"""Opens the node's queue session (called once per launcher, by its dispatcher)."""


class StageHooks(Protocol):
    """What a Slurm stage job adds to a launcher (or to an MPI stage's rank 0), built by the
    composition root: walltime and `scalebox stage stop` drains, autoscaling, min_jobs. The
    hooks never raise: a database or Slurm failure is logged and answered safely (no drain,
    stay up)."""

    def tick(self) -> bool:
        """Called every fraction of a second; True: drain now (walltime, `stage stop`)."""
        ...

    def may_idle_exit(self) -> bool:
        """Asked when the stage has been idle long enough to end; False: stay up (warm capacity)."""
        ...

    def leaving(self) -> None:
        """The stage drains or ends: it no longer counts as capacity."""
        ...


class NoStageHooks:
    """Outside a stage job: never drains by itself, may always end when idle."""

    def tick(self) -> bool:
        return False

    def may_idle_exit(self) -> bool:
        return True

    def leaving(self) -> None:
        return None


class Clock(Protocol):
    """Time, injectable for tests."""

    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...

"""A slot's view of the database: :class:`SlotPort`, the ``TaskQueue`` each slot gets, every call
of which is served by the node's :class:`~scalebox_hpc.launcher.dispatcher.Dispatcher` (claims from
its prefetch when it can, hand-offs batched, everything else passed through in order). A slot
holds no connection; this module imports no database code (the import-linter contract)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from scalebox_hpc.models import Beat, ModuleRef, Released, SlotWant, Task, TaskResult

if TYPE_CHECKING:
    from scalebox_hpc.launcher.dispatcher import Dispatcher


class SlotPort:
    """One slot's TaskQueue, served by the node's :class:`Dispatcher` (never a connection)."""

    def __init__(self, dispatcher: Dispatcher, *, prefetch: bool = True) -> None:
        self._d = dispatcher
        self._prefetch = prefetch

    @property
    def connects(self) -> int:
        """How often the node's connection was (re)opened."""
        return self._d.connects

    def close(self) -> None:
        """Nothing to close: the dispatcher owns the connection (the launcher closes it)."""

    # -- the slot's hot path --------------------------------------------------------------------
    def create_slot(
        self, module_id: int, *, host: str, seq: int, pid: int, work_dir: str, heartbeat_seconds: float = 10.0,
    ) -> int:
        slot_id = int(self._d.call("create_slot", module_id, host=host, seq=seq, pid=pid, work_dir=work_dir,
                                   heartbeat_seconds=heartbeat_seconds))
        self._d.register_slot(slot_id, prefetch=self._prefetch)
        return slot_id

    def claim(
        self, app_id: int, module_id: int, *, host: str, slot_id: int, slot_seq: int,
        limit: int = 1, lease_seconds: float = 30.0, semaphore: str | None = None,
    ) -> list[Task]:
        kwargs = {"host": host, "lease_seconds": lease_seconds, "semaphore": semaphore}
        if limit == 1:
            task = self._d.take_prefetched(slot_id)
            if task is not None:
                self._d.refill(slot_id, slot_seq, app_id, module_id, **kwargs)
                return [task]
        tasks: list[Task] = self._d.call("claim", app_id, module_id, slot_id=slot_id, slot_seq=slot_seq,
                                         limit=limit, **kwargs)
        return tasks

    def take_more(self, app_id: int, module_id: int, *, host: str, slot_id: int, slot_seq: int, limit: int,
                  lease_seconds: float = 30.0) -> list[Task]:
        """Up to ``limit`` more of the slot's prefetched tasks, at once and without a round trip
        (a batch for its Python handler); one refill is queued for them all."""
        tasks = self._d.take_prefetched_many(slot_id, limit)
        if tasks:
            self._d.refill(slot_id, slot_seq, app_id, module_id, host=host, lease_seconds=lease_seconds,
                           semaphore=None)
        return tasks

    def hand_off_many(
        self, items: Sequence[tuple[Task, TaskResult, bool, Callable[[int], bool]]], *, slot_id: int, host: str,
        sender: ModuleRef, modules: dict[str, ModuleRef], seconds: float | None = None,
    ) -> None:
        """:meth:`hand_off` for a batch's (task, result, requeue, requeue_for) items, all in one
        batch of the dispatcher (one statement); ``seconds``: the batch's run time."""
        kwargs = {"slot_id": slot_id, "host": host, "sender": sender, "modules": modules}
        self._d.hand_off_many([(task, result, requeue_for, {**kwargs, "requeue": requeue})
                               for task, result, requeue, requeue_for in items], batch_seconds=seconds)

    def complete(
        self, task: Task, result: TaskResult, *, slot_id: int, host: str, sender: ModuleRef,
        modules: dict[str, ModuleRef], requeue: bool = False,
    ) -> int:
        return int(self._d.call("complete", task, result, slot_id=slot_id, host=host, sender=sender,
                                modules=modules, requeue=requeue))

    def hand_off(
        self, task: Task, result: TaskResult, *, slot_id: int, host: str, sender: ModuleRef,
        modules: dict[str, ModuleRef], requeue: bool, requeue_for: Callable[[int], bool],
    ) -> None:
        """Hand the result over and return at once: the dispatcher records it with the next
        batch (one transaction per task, only while its lease is held, which it keeps renewing
        until then), retries through an outage, and records -103 instead of a result the
        database refuses (``requeue_for(status)``: whether that status gets another attempt)."""
        self._d.hand_off(task, result, slot_id=slot_id, host=host, sender=sender, modules=modules,
                         requeue=requeue, requeue_for=requeue_for)

    # -- everything else, passed through in order ---------------------------------------------
    def claim_for_slots(
        self, app_id: int, module_id: int, *, host: str, slots: Sequence[SlotWant],
        lease_seconds: float = 30.0, semaphore: str | None = None,
    ) -> dict[int, list[Task]]:
        got: dict[int, list[Task]] = self._d.call("claim_for_slots", app_id, module_id, host=host, slots=slots,
                                                  lease_seconds=lease_seconds, semaphore=semaphore)
        return got

    def modules(self, app_id: int) -> dict[str, ModuleRef]:
        got: dict[str, ModuleRef] = self._d.call("modules", app_id)
        return got

    def module_specs(self, app_id: int) -> dict[str, dict[str, Any]]:
        got: dict[str, dict[str, Any]] = self._d.call("module_specs", app_id)
        return got

    def app_cancelled(self, app_id: int) -> bool:
        return bool(self._d.call("app_cancelled", app_id))

    def recover_expired(self, *, every: float = 0.0) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = self._d.call("recover_expired", every=every)
        return got

    def heartbeat(
        self, slot_id: int, *, status: str, lease_seconds: float, task_ids: Sequence[int] | None = None,
    ) -> list[int]:
        got: list[int] = self._d.call("heartbeat", slot_id, status=status, lease_seconds=lease_seconds,
                                      task_ids=task_ids)
        return got

    def heartbeat_slots(self, beats: Sequence[Beat]) -> list[int]:
        got: list[int] = self._d.call("heartbeat_slots", beats)
        return got

    def app_uid(self, app_id: int) -> str:
        return str(self._d.call("app_uid", app_id))

    def task_service(self, app_id: int, request: Any) -> Any:
        return self._d.call("task_service", app_id, request)

    def index_scratch(
        self, host: str, added: list[tuple[str, int]], removed: list[str], *, replace: bool = False,
    ) -> None:
        self._d.call("index_scratch", host, added, removed, replace=replace)

    def adopt_tasks(self, app_id: int, host: str, *, limit: int = 100_000) -> int:
        return int(self._d.call("adopt_tasks", app_id, host, limit=limit))

    def release(self, slot_id: int) -> Released:
        return Released(self._d.call("release", slot_id))  # the busy ones: the dispatcher retries them

    def module_activity(self, app_id: int, module_id: int) -> tuple[str, bool]:
        got: tuple[str, bool] = self._d.call("module_activity", app_id, module_id)
        return got

    def register_host(self, name: str, info: dict[str, Any]) -> None:
        self._d.call("register_host", name, info)

    def set_slot_status(
        self, slot_id: int, status: str, *, message: str | None = None, tasks_done: int = 0
    ) -> None:
        self._d.call("set_slot_status", slot_id, status, message=message, tasks_done=tasks_done)

"""The in-memory queue's module look-ups and claims (locality tiers, back-pressure, semaphores)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from scalebox_hpc.errors import NotFoundError
from scalebox_hpc.models import (
    AppStatus,
    ModuleRef,
    SlotWant,
    Task,
    TaskStatus,
)
from scalebox_hpc.testing.core import _QueueCore
from scalebox_hpc.testing.rows import (
    _Task,
)


class _Claims(_QueueCore):
    """Module look-ups and claims of :class:`~scalebox_hpc.testing.InMemoryQueue`."""

    # -- modules --------------------------------------------------------------------------------
    def modules(self, app_id: int) -> dict[str, ModuleRef]:
        """The app's modules by name; NotFoundError when the app does not exist."""
        with self._call("modules"):
            refs = {m.name: m.ref() for m in self._modules_of(app_id)}
            if not refs:
                raise NotFoundError("app", app_id)
            return refs

    def module_specs(self, app_id: int) -> dict[str, dict[str, Any]]:
        """The app's stored module specs (pipeline.ModuleSpec as JSON) by name."""
        with self._call("module_specs"):
            return {m.name: copy.deepcopy(m.spec) for m in self._modules_of(app_id)}

    # -- claims -----------------------------------------------------------------------------------
    def claim(
        self, app_id: int, module_id: int, *, host: str, slot_id: int, slot_seq: int,
        limit: int = 1, lease_seconds: float = 30.0, semaphore: str | None = None,
    ) -> list[Task]:
        """Claim up to ``limit`` READY tasks for one slot (the one-slot case of :meth:`claim_for_slots`)."""
        with self._call("claim"):
            got = self._claim(app_id, module_id, host, [SlotWant(slot_id, slot_seq, limit)], lease_seconds, semaphore)
            return got.get(slot_id, [])

    def claim_for_slots(
        self, app_id: int, module_id: int, *, host: str, slots: Sequence[SlotWant],
        lease_seconds: float = 30.0, semaphore: str | None = None,
    ) -> dict[int, list[Task]]:
        """Claim for several slots of one module on ``host`` at once: a task addressed to a slot's
        seq goes to it, the others are dealt round-robin, oldest first, at most ``want`` each.
        With a ``semaphore``, one unit per claimed task (the units not used go back)."""
        with self._call("claim_for_slots"):
            return self._claim(app_id, module_id, host, slots, lease_seconds, semaphore)

    def _claim(
        self, app_id: int, module_id: int, host: str, slots: Sequence[SlotWant], lease_seconds: float,
        semaphore: str | None,
    ) -> dict[int, list[Task]]:
        slots = [s for s in slots if s.want > 0]
        limit = sum(s.want for s in slots)
        if not limit:
            return {}
        sems: dict[str, int] = {}
        if semaphore is not None:  # semaphore_take_many: up to `limit` units while positive
            app = self._s.apps.get(app_id)
            sems = app.semaphores if app is not None else {}
            if sems.get(semaphore, 0) <= 0:
                return {}
            limit = min(limit, sems[semaphore])
            sems[semaphore] -= limit
        picked = self._candidates(app_id, module_id, host, {s.slot_seq for s in slots}, limit)
        if picked and (unknown := [s.slot_id for s in slots if s.slot_id not in self._s.slots]):
            # the foreign key sbx_tasks.slot_id: checked only when a task would be written
            if semaphore is not None:
                sems[semaphore] += limit
            raise NotFoundError("slot", unknown[0])
        if semaphore is not None:
            sems[semaphore] += limit - len(picked)
        return self._deal(picked, slots, host, lease_seconds)

    def _candidates(self, app_id: int, module_id: int, host: str, seqs: set[int], limit: int) -> list[_Task]:
        """The tasks claim_tasks takes, best first: those preferring this host, then those
        preferring another whose locality wait is over, then those preferring none."""
        s, now = self._s, self._now()
        app = s.apps.get(app_id)
        if app is None or app.status != AppStatus.RUNNING or self._sinks_full(module_id):
            return []
        ready = [t for t in s.tasks.values() if t.module_id == module_id and t.status == TaskStatus.READY
                 and (t.to_slot is None or t.to_slot in seqs)]
        local = sorted((t for t in ready if t.pref_host == host), key=lambda t: (t.pref_partial, t.id))
        waited = sorted((t for t in ready if t.to_host is None and t.pref_host is not None and t.pref_host != host
                         and t.pref_until is not None and t.pref_until <= now),
                        key=lambda t: (t.pref_until or now, t.id))
        free = sorted((t for t in ready if t.to_host is None and t.pref_host is None), key=lambda t: t.id)
        return list(itertools.islice(itertools.chain(local, waited, free), limit))

    def _sinks_full(self, module_id: int) -> bool:
        """Back-pressure: a sink module with ``max_pending`` has that many READY tasks."""
        me = self._s.modules.get(module_id)
        if me is None:
            return False
        for sink in self._s.modules.values():
            if sink.app_id == me.app_id and sink.name in me.sink_modules and sink.max_pending is not None:
                ready = sum(1 for t in self._s.tasks.values()
                            if t.module_id == sink.id and t.status == TaskStatus.READY)
                if ready >= sink.max_pending:
                    return True
        return False

    def _deal(
        self, picked: list[_Task], slots: Sequence[SlotWant], host: str, lease_seconds: float,
    ) -> dict[int, list[Task]]:
        """Seats round-robin over the slots (every slot's first task before any second); a task
        addressed to a slot's seq goes to the first such slot."""
        seats = [s.slot_id for k in range(max(s.want for s in slots)) for s in slots if k < s.want]
        free_seats = iter(seats)
        now = self._now()
        out: dict[int, list[Task]] = {}
        for t in picked:
            if t.to_slot is None:
                slot_id = next(free_seats)
            else:
                slot_id = next(s.slot_id for s in slots if s.slot_seq == t.to_slot)
            t.status, t.slot_id, t.host = TaskStatus.RUNNING, slot_id, host
            t.attempts += 1
            t.started_at = t.heartbeat_at = now
            t.finished_at = None
            t.lease_expires_at = now + timedelta(seconds=lease_seconds)
            out.setdefault(slot_id, []).append(t.as_task())
        return out

    def app_cancelled(self, app_id: int) -> bool:
        """True once the app was cancelled (False for an app that does not exist)."""
        with self._call("app_cancelled"):
            app = self._s.apps.get(app_id)
            return bool(app and app.cancelled)


"""The cron task's sink: each tick straight into the queue, at the tick, through the launcher.

A run.sh's messages normally wait in the emit buffer until the task ends, and the cron task
never ends, so it hands its ticks to the launcher that runs it (its task-services socket, see
:mod:`scalebox_hpc.taskapi`: a task holds no database credentials), each delivery written at
once under CONFLICT_ACTION IGNORE whatever the module's own setting, so a tick whose body (its
time) is already in the module is not written again (a restarted cron task, two cron tasks at
once) and never resets one already done (as OVERWRITE would). The launcher answers only while
this task runs in one of its slots: an orphan (its launcher gone, the task recovered elsewhere,
cancelled) is told so, and stops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from scalebox_hpc import taskapi
from scalebox_hpc.errors import DatabaseError
from scalebox_hpc.models import ConflictAction, ModuleRef
from scalebox_hpc.modules.cron.loop import AppState, Delivered, Tick

logger = logging.getLogger(__name__)

CALL_TIMEOUT_SECONDS = 30.0
"""A delivery is a few short statements; one that hangs longer is taken for an outage."""


@dataclass(frozen=True)
class TaskIdentity:
    """Which task this cron process is (the launcher's TASK_ID): the launcher answers only while
    it runs that task."""

    task_id: int


_STATES = {"FINISHED": AppState.ENDED, "RUNNING": AppState.RUNNING}


class LauncherSink:
    """:class:`~scalebox_hpc.modules.cron.loop.TickSink` through the launcher's task services at
    ``path`` (``$SCALEBOX_SERVICES``)."""

    def __init__(self, path: str, me: TaskIdentity) -> None:
        self.path = path
        self.me = me

    def close(self) -> None:
        """Nothing to close: one connection per call."""

    def _call(self, request: taskapi.Request) -> object:
        try:
            return taskapi.call(self.path, request, timeout=CALL_TIMEOUT_SECONDS)
        except taskapi.ServiceError as exc:
            if exc.kind == "outage":
                raise DatabaseError(str(exc)) from None  # the loop retries with backoff
            raise

    def _ended(self, exc: taskapi.ServiceError) -> bool:
        if exc.kind in ("not-running", "unreachable"):
            logger.warning("task %d is no longer run by its launcher (%s): stopping", self.me.task_id, exc)
            return True
        return False

    def modules(self) -> dict[str, ModuleRef]:
        """The app's modules (DatabaseError during an outage)."""
        got = self._call(taskapi.Request("app.state", self.me.task_id))
        modules = got.get("modules", {}) if isinstance(got, dict) else {}
        return {name: ModuleRef(0, name, tuple(sinks), ConflictAction.IGNORE) for name, sinks in modules.items()}

    def deliver(self, ticks: Sequence[Tick]) -> Delivered:
        """The app's state and, when RUNNING, ``ticks`` written (one call per module and schedule)."""
        try:
            if not ticks:
                got = self._call(taskapi.Request("app.state", self.me.task_id))
                return Delivered(self._state(got), 0)
            written, state = 0, AppState.RUNNING
            for (module, schedule), bodies in _grouped(ticks).items():
                got = self._call(taskapi.Request("tasks.deliver", self.me.task_id, module=module,
                                                 headers={"cron": schedule}, bodies=tuple(bodies)))
                state = self._state(got)
                if state is not AppState.RUNNING:
                    break
                written += int(got.get("written", 0)) if isinstance(got, dict) else 0
            return Delivered(state, written)
        except taskapi.ServiceError as exc:
            if self._ended(exc):
                return Delivered(AppState.ENDED, 0)
            raise

    @staticmethod
    def _state(got: object) -> AppState:
        status = str(got.get("status", "")) if isinstance(got, dict) else ""
        return _STATES.get(status, AppState.PAUSED)


def _grouped(ticks: Sequence[Tick]) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = {}
    for tick in ticks:
        groups.setdefault((tick.entry.module, tick.entry.schedule.text), []).append(tick.body)
    return groups

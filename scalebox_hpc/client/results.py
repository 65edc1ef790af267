"""What the Python client answers with: a :class:`Task` as stored, an app's :class:`Outcome`.
Re-exported by :mod:`scalebox_hpc.client`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from scalebox_hpc.models import AppStatus, TaskStatus


@dataclass(frozen=True)
class Task:
    """One task as stored: its message (body, headers), where it stands, and when."""

    id: int
    app_id: int
    module: str
    body: str
    headers: Mapping[str, Any]
    """Read-only view of the task's JSON headers."""
    status: int
    """A task status code (:class:`~scalebox_hpc.models.TaskStatus`; 1..255 are run.sh exit codes)."""
    attempts: int
    host: str | None
    """The host of its last run (None before one)."""
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def status_name(self) -> str:
        """``OK``, ``READY``, ``TIMEOUT``, ``EXIT_3``..."""
        return TaskStatus.describe(self.status)

    @property
    def failed(self) -> bool:
        """The task ended in failure (an exit code, a timeout, a system error)."""
        return TaskStatus.is_failure(self.status)

    @property
    def done(self) -> bool:
        """The task is in a terminal status (OK or failed)."""
        return self.status == TaskStatus.OK or self.failed


@dataclass(frozen=True)
class Outcome:
    """Where an app stands: its status, result text and task counts (per module, by status)."""

    app_id: int
    name: str
    status: str
    """The stored status: INITIAL, RUNNING, PAUSED or FINISHED."""
    state: str
    """As ``scalebox status`` says it: the status, or IDLE / WAITING for a RUNNING app with no live slot."""
    result: str | None
    """The text a task set with ``scalebox app set-finished`` (``cancelled`` after a cancel)."""
    counts: Mapping[str, Mapping[int, int]]
    """Per module (pipeline order), task counts by status code."""
    stuck: tuple[str, ...] = ()
    """After :meth:`Client.run`: why work was left that no slot here could take (one line per module)."""

    def count(self, status: int, module: str | None = None) -> int:
        """Tasks in one status (of one module, or of all)."""
        chosen = [self.counts[module]] if module is not None else list(self.counts.values())
        return sum(by.get(status, 0) for by in chosen)

    @property
    def total(self) -> int:
        """Every task of the app."""
        return sum(sum(by.values()) for by in self.counts.values())

    @property
    def ok(self) -> int:
        """Tasks that ended OK."""
        return self.count(TaskStatus.OK)

    @property
    def failed(self) -> int:
        """Tasks that ended in failure."""
        return sum(n for by in self.counts.values() for s, n in by.items() if TaskStatus.is_failure(s))

    @property
    def pending(self) -> int:
        """Tasks READY or RUNNING: work not done yet."""
        return self.count(TaskStatus.READY) + self.count(TaskStatus.RUNNING)

    @property
    def succeeded(self) -> bool:
        """No task failed and none is left (what exit code 0 of ``scalebox run`` means)."""
        return not self.failed and not self.pending and not self.stuck

    @property
    def ended(self) -> bool:
        """FINISHED, or nothing READY or RUNNING any more."""
        return self.status == AppStatus.FINISHED or self.pending == 0

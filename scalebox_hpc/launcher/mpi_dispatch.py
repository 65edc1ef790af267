"""The MPI farm's scheduling, free of MPI and of the database (unit-tested on its own).

Rank 0 keeps the claimed-but-not-yet-handed-out tasks (``pending``), the ranks waiting for work
(``idle``, longest-waiting first) and what every busy rank runs. A task goes to whichever rank
is idle when it is there to give (dynamic, not round-robin: a rank with short tasks gets more);
finished results wait in ``done`` until a batch is full or the oldest has waited
``flush_seconds``, then they are recorded in one transaction.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from scalebox_hpc.models import Task, TaskResult


@dataclass
class Assignment:
    """A task handed to a rank, and when that rank was last heard of."""

    rank: int
    task: Task
    since: float
    last_seen: float


@dataclass(frozen=True)
class Finished:
    """A task back from its rank: its result, or None when the rank aborted it (to release)."""

    rank: int
    task: Task
    result: TaskResult | None
    host: str


class Dispatcher:
    """Who runs what, for rank 0 of a farm stage."""

    def __init__(self, *, batch: int, flush_seconds: float = 0.2, hang_seconds: float | None = None) -> None:
        self.batch = max(1, batch)
        self.flush_seconds = flush_seconds
        self.hang_seconds = hang_seconds
        self.idle: deque[int] = deque()
        self.pending: deque[Task] = deque()
        self.running: dict[int, Assignment] = {}
        self.done: list[Finished] = []
        self._first_done: float | None = None
        self.lost: set[int] = set()

    # -- ranks ----------------------------------------------------------------------------------
    def ready(self, rank: int) -> None:
        """``rank`` finished its set-up (or a task) and waits for work."""
        if rank not in self.idle and rank not in self.running and rank not in self.lost:
            self.idle.append(rank)

    def seen(self, rank: int, now: float) -> None:
        """A sign of life (ping) from ``rank``."""
        job = self.running.get(rank)
        if job is not None:
            job.last_seen = now

    def hung(self, now: float) -> list[int]:
        """Busy ranks not heard of for ``hang_seconds`` (dead, stopped or stuck)."""
        if self.hang_seconds is None:
            return []
        return sorted(r for r, a in self.running.items() if now - a.last_seen > self.hang_seconds)

    # -- tasks ----------------------------------------------------------------------------------
    def claim_size(self) -> int:
        """How many tasks to claim now: a batch when some idle rank has nothing to take, else 0."""
        return self.batch if len(self.pending) < len(self.idle) else 0

    def add(self, tasks: Iterable[Task]) -> None:
        """Claimed tasks, to hand out in claim order. A task that some rank still runs (its
        lease expired during an outage, was recovered and this stage claimed it again) is not
        run a second time: the running rank's result is recorded against the newer claim."""
        by_id = {job.task.id: job for job in self.running.values()}
        for task in tasks:
            job = by_id.get(task.id)
            if job is not None:
                job.task = task
            else:
                self.pending.append(task)

    def assign(self, now: float) -> list[Assignment]:
        """Hand pending tasks to idle ranks, longest-idle rank first."""
        out = []
        while self.pending and self.idle:
            rank = self.idle.popleft()
            job = Assignment(rank=rank, task=self.pending.popleft(), since=now, last_seen=now)
            self.running[rank] = job
            out.append(job)
        return out

    def finish(self, rank: int, task_id: int, result: TaskResult | None, host: str, now: float) -> bool:
        """``rank`` is done with ``task_id``; False for a stale or unknown report (ignored)."""
        job = self.running.get(rank)
        if job is None or job.task.id != task_id:
            return False
        del self.running[rank]
        if self._first_done is None:
            self._first_done = now
        self.done.append(Finished(rank=rank, task=job.task, result=result, host=host))
        self.ready(rank)
        return True

    def lose(self, rank: int) -> Task | None:
        """Forget a dead rank; its task (if any) is left to lease expiry and returned."""
        self.lost.add(rank)
        if rank in self.idle:
            self.idle.remove(rank)
        job = self.running.pop(rank, None)
        return None if job is None else job.task

    def flush_due(self, now: float) -> bool:
        """A batch of results is full, or the oldest waited long enough, or nothing else runs."""
        if not self.done:
            return False
        if len(self.done) >= self.batch or not self.running:
            return True
        return self._first_done is not None and now - self._first_done >= self.flush_seconds

    def take_done(self) -> list[Finished]:
        """The results to record now (and forget)."""
        done, self.done, self._first_done = self.done, [], None
        return done

    def take_pending(self) -> list[Task]:
        """The tasks not handed out (to release on a drain)."""
        tasks = list(self.pending)
        self.pending.clear()
        return tasks

    def quiet(self) -> bool:
        """Nothing pending and nothing running."""
        return not self.pending and not self.running

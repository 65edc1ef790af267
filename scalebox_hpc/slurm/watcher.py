"""``StatusWatcher``: one batched, rate-limited status query for every job an orchestrator follows.

Callers ``register`` job ids and call ``poll()`` as often as they like; at most once per
interval the watcher asks ``SlurmClient.status`` about every registered, unfinished job in a
single call. Terminal states are cached and never queried again. When the query fails the
interval doubles (up to ``max_interval``) until a query succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.slurm.parse import JobInfo, SlurmState

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Monotonic seconds (``time.monotonic`` or a fake in tests)."""


class StatusSource(Protocol):
    """What the watcher needs from ``SlurmClient``."""

    def status(self, job_ids: Iterable[str]) -> Mapping[str, JobInfo]:
        """Current info for each id it knows."""
        ...


class StatusWatcher:
    """Batched job-status polling with a minimum interval, error backoff and cached terminal states.

    ``lost_after``: a registered job absent from both squeue and sacct in this many
    consecutive successful polls is reported by ``is_lost`` (e.g. no accounting and older
    than MinJobAge).
    """

    def __init__(
        self,
        client: StatusSource,
        clock: Clock = time.monotonic,
        *,
        interval: float = 10.0,
        max_interval: float = 300.0,
        lost_after: int = 3,
    ) -> None:
        self._client = client
        self._clock = clock
        self._interval = interval
        self._max_interval = max(max_interval, interval)
        self._lost_after = lost_after
        self._lock = threading.Lock()
        self._jobs: dict[str, JobInfo | None] = {}
        self._misses: dict[str, int] = {}
        self._failures = 0
        self._next_poll = float("-inf")

    # ------------------------------------------------------------ registration

    def register(self, *job_ids: str) -> None:
        """Follow these jobs from the next poll on (already followed ids are kept as they are)."""
        with self._lock:
            for job_id in job_ids:
                self._jobs.setdefault(job_id, None)
                self._misses.setdefault(job_id, 0)

    def forget(self, *job_ids: str) -> None:
        """Stop following these jobs and drop what is known about them."""
        with self._lock:
            for job_id in job_ids:
                self._jobs.pop(job_id, None)
                self._misses.pop(job_id, None)

    # ------------------------------------------------------------ polling

    @property
    def current_interval(self) -> float:
        """Seconds between queries now: ``interval``, doubled per consecutive failure up to ``max_interval``."""
        return min(self._interval * 2.0 ** min(self._failures, 30), self._max_interval)

    def pending_ids(self) -> list[str]:
        """Registered ids not yet known to be in a terminal state (what the next query asks about)."""
        with self._lock:
            return [i for i, info in self._jobs.items() if info is None or not info.state.is_terminal]

    def poll(self, *, force: bool = False) -> bool:
        """Query Slurm once for every unfinished job if the interval has passed (or ``force``).

        Returns True when a query was made and succeeded; False when it was not due, there was
        nothing to ask, or it failed (failures are logged and back off; they never raise).
        """
        with self._lock:
            now = self._clock()
            if not force and now < self._next_poll:
                return False
            ids = [i for i, info in self._jobs.items() if info is None or not info.state.is_terminal]
            if not ids:
                return False
            try:
                found = self._client.status(ids)
            except ScaleboxError as exc:
                self._failures += 1
                self._next_poll = now + self.current_interval
                logger.warning("slurm status query failed (retry in %s s): %s", self.current_interval, exc, extra={
                    "action": "slurm_status_failed", "error": str(exc), "retry_in": self.current_interval})
                return False
            self._failures = 0
            self._next_poll = now + self._interval
            self._record(ids, found)
            return True

    def _record(self, ids: list[str], found: Mapping[str, JobInfo]) -> None:
        for job_id in ids:
            info = found.get(job_id)
            if info is None:
                self._misses[job_id] = self._misses.get(job_id, 0) + 1
                continue
            self._misses[job_id] = 0
            old = self._jobs.get(job_id)
            if old is None or old.state is not info.state:
                logger.info("slurm job %s is %s", job_id, info.state.value, extra={
                    "action": "slurm_job_state", "job_id": job_id, "state": info.state.value})
            self._jobs[job_id] = info

    # ------------------------------------------------------------ results

    def info(self, job_id: str) -> JobInfo | None:
        """The last info seen for ``job_id``; None before the first successful sighting."""
        with self._lock:
            return self._jobs.get(job_id)

    def state(self, job_id: str) -> SlurmState:
        """The last state seen for ``job_id`` (``UNKNOWN`` before the first sighting)."""
        info = self.info(job_id)
        return SlurmState.UNKNOWN if info is None else info.state

    def is_lost(self, job_id: str) -> bool:
        """True when the job was missing from ``lost_after`` consecutive successful polls."""
        with self._lock:
            return self._misses.get(job_id, 0) >= self._lost_after

    def snapshot(self) -> dict[str, JobInfo | None]:
        """Every followed id with its last info (None if never seen)."""
        with self._lock:
            return dict(self._jobs)

    def wait(self, job_id: str, *, timeout: float, sleep: Callable[[float], None] = time.sleep,
             step: float = 0.2) -> JobInfo:
        """Poll until ``job_id`` is terminal and return its info; ``TimeoutError`` after ``timeout`` seconds."""
        self.register(job_id)
        deadline = self._clock() + timeout
        while True:
            self.poll()
            info = self.info(job_id)
            if info is not None and info.state.is_terminal:
                return info
            if self._clock() >= deadline:
                state = self.state(job_id).value
                raise TimeoutError(f"slurm job {job_id} not finished after {timeout:g} s (state {state})")
            sleep(step)

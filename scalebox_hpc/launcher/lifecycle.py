"""What makes a launcher, or an MPI stage's rank 0, a Slurm stage job: the stage-job policy
(:class:`StageLifecycle`, the launcher's ``StageHooks``), behind small ports.

It needs three things from outside, each a Protocol here so tests inject fakes: the stage job's
row (:class:`StageJobStore`: the composition root implements it over the database), the app's
autoscale pass (``scale``: a callable returning a :class:`ScaleOutcome`), and time
(:class:`LifecycleClock`: monotonic for the autoscale interval, UTC for the walltime, sleep for
the last job's wait for the Slurm budget). Nothing here talks to PostgreSQL or Slurm itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from scalebox_hpc.errors import PrivilegeError, ScaleboxError
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.slurm import JobEnvironment

logger = logging.getLogger(__name__)

DEFAULT_AUTOSCALE_SECONDS = 10.0
"""How often the first node asks for the app's autoscale pass (SCALEBOX_AUTOSCALE_SECONDS)."""
LEAVING_BUDGET_WAIT = 5.0
"""Seconds between tries of the last leaving job's pass while the Slurm budget is spent."""
LEAVING_BUDGET_TRIES = 13
"""Tries before the last leaving job gives up waiting for the budget (a minute and then some)."""
LEAVING_LOCK_WAIT = 1.0
"""Seconds before a leaving job asks again when another pass held the app's lock (that pass may
have read the jobs before this one began draining: then this job's own pass must still run)."""
WALLTIME_MARGIN_SECONDS = 5.0
"""A task is claimed only if its task_max_seconds plus this fits the job's remaining walltime."""


class StageJobStore(Protocol):
    """The stage job's row, as the lifecycle reads and writes it (every call may raise a
    ScaleboxError: the lifecycle logs it and carries on)."""

    def job_started(self, job_id: str, cluster: str, alloc_cpus: int | None) -> None:
        """Record the job's allocated CPUs and its start."""

    def may_leave_idle(self, job_id: str, cluster: str) -> bool:
        """Whether the idle job may end (its module keeps ``min_jobs`` without it)."""

    def mark_leaving(self, job_id: str, cluster: str, *, finished: bool) -> None:
        """Mark the job draining; ``finished``: also record the end of its core-hours."""

    def job_flags(self, job_id: str, cluster: str) -> tuple[bool, datetime | None]:
        """(asked to drain by `scalebox stage stop`, the job's end time as the autoscaler saw it)."""


class ScaleOutcome(Protocol):
    """What the lifecycle reads of an autoscale pass's report."""

    @property
    def budget_spent(self) -> bool:
        """Skipped: the cluster's Slurm budget of the last minute is spent."""

    @property
    def urgent(self) -> bool:
        """The pass was due whatever the interval (the app's last live job leaving)."""

    @property
    def locked(self) -> bool:
        """False: another pass of the app held its lock; this one did nothing."""


class LifecycleClock(Protocol):
    """Time, injectable (``scalebox_hpc.testing.FakeClock`` fits)."""

    def monotonic(self) -> float: ...
    def now(self) -> datetime: ...
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Real time (``sleep`` may be replaced)."""

    def __init__(self, sleep: Callable[[float], None] = time.sleep) -> None:
        self.sleep = sleep

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def now(self) -> datetime:
        """The current UTC time."""
        return datetime.now(UTC)


Scale = Callable[..., ScaleOutcome | None]
"""``scale(app_id, leaving=None)``: one autoscale pass of the app (None: no report);
``leaving``: the (job id, cluster) of the stage job that drains or ends."""


class StageLifecycle:
    """What makes a launcher, or an MPI stage's rank 0, a Slurm stage job (the StageHooks):

    - ``tick``: drain when a task no longer fits the remaining walltime (``task_max_seconds``)
      or when `scalebox stage stop` marked the job; the job's first node runs the app's
      autoscaler every ``interval`` seconds;
    - ``may_idle_exit``: an idle job ends only above its module's ``min_jobs``;
    - ``leaving``: mark the job draining and (first node) ask for a pass, which runs at once
      when no job of the app runs any more and no pass has yet seen this one drain (or a module
      still wants a job), so a replacement is submitted if work remains (while the Slurm budget
      is spent it waits for it, about a minute at most; while another pass holds the app's lock
      it asks again a second later: that pass may not have seen this job drain).

    The app gets one pass per interval whichever of its jobs asks first (the autoscaler's rule).
    """

    def __init__(
        self, job: JobEnvironment, spec: ModuleSpec, app_id: int, store: StageJobStore, scale: Scale, *,
        end: datetime | None, interval: float = DEFAULT_AUTOSCALE_SECONDS, clock: LifecycleClock | None = None,
        wait_for_budget: bool = True,
    ) -> None:
        self.job, self.app_id, self.store, self.scale, self.end = job, app_id, store, scale, end
        self.module = spec.name
        self.cluster = spec.slurm.cluster or ""  # with the job id, the key of the job's row
        self.budget = (spec.arguments.task_max_seconds or 0) + WALLTIME_MARGIN_SECONDS
        self.first_node = job.nodeid == 0
        self.interval = interval
        self.clock: LifecycleClock = clock or SystemClock()
        self.next_scale = self.clock.monotonic() + interval
        # an MPI stage's hooks hold its one connection's lock, which its heartbeats need too
        self.budget_tries = LEAVING_BUDGET_TRIES if wait_for_budget else 1
        self.scale_refused = False  # the role may not autoscale (PrivilegeError): no more passes

    def _facts(self, action: str, **more: object) -> dict[str, object]:
        """The ``extra=`` of this job's log lines: which job, app and module, and what happened."""
        return {"action": action, "slurm_job_id": self.job.job_id, "cluster": self.cluster,
                "app_id": self.app_id, "module_name": self.module, **more}

    def tick(self) -> bool:
        """True: drain now (walltime, or `scalebox stage stop`); the first node's autoscale asks."""
        now = self.clock.now()
        if self.end is not None and now + timedelta(seconds=self.budget) >= self.end:
            left = self.end - now
            logger.warning("walltime: stage job %s (module %s) has %s left, less than a task needs; draining "
                           "(a task needs %g s)", self.job.job_id, self.module, left, self.budget,
                           extra=self._facts("stage_walltime_drain", left_seconds=left.total_seconds()))
            return True
        if self.clock.monotonic() < self.next_scale:
            return False
        self.next_scale = self.clock.monotonic() + self.interval
        asked, end = self._job_flags()
        if asked:
            logger.warning("stage job %s (module %s) asked to drain (`scalebox stage stop`); draining",
                           self.job.job_id, self.module, extra=self._facts("stage_stop_drain"))
            return True
        if self.end is None and end is not None:
            # the end time as the app's autoscale pass stored it from its one squeue: every job's
            # launchers asking scontrol themselves made Slurm RPCs grow with the jobs
            self.end = end
            logger.info("stage job %s ends %s (from the app's autoscale pass)", self.job.job_id, end,
                        extra=self._facts("stage_end_known", end=end.isoformat()))
        if self.first_node:
            self._autoscale()
        return False

    def started(self) -> None:
        """The first node records the job's allocated CPUs and its start (for its core-hours in
        sbx_usage); from the environment, no Slurm call."""
        if not self.first_node:
            return
        try:
            self.store.job_started(self.job.job_id, self.cluster, self.job.cpus)
        except ScaleboxError as exc:
            logger.warning("cannot record the start of stage job %s: %s", self.job.job_id, exc,
                           extra=self._facts("stage_start_unrecorded", error=str(exc)))

    def may_idle_exit(self) -> bool:
        """Whether the idle job may end: only above its module's ``min_jobs`` (unknown: stay)."""
        try:
            leave = self.store.may_leave_idle(self.job.job_id, self.cluster)
        except ScaleboxError as exc:
            logger.warning("stage job %s idle: cannot check its module's min_jobs (%s); staying up",
                           self.job.job_id, exc, extra=self._facts("stage_idle_check_failed", error=str(exc)))
            return False
        if not leave:
            logger.info("stage job %s idle, staying up: module %s keeps min_jobs", self.job.job_id, self.module,
                        extra=self._facts("stage_idle_stay"))
        return leave

    def leaving(self) -> None:
        """Mark the job draining; the first node then asks for the app's pass (see the class)."""
        try:
            self.store.mark_leaving(self.job.job_id, self.cluster, finished=self.first_node)
        except ScaleboxError as exc:
            logger.warning("cannot mark stage job %s draining: %s", self.job.job_id, exc,
                           extra=self._facts("stage_drain_unrecorded", error=str(exc)))
        if not self.first_node:
            return
        for attempt in range(self.budget_tries):
            report = self._autoscale(leaving=(self.job.job_id, self.cluster))
            if report is None:
                return
            if report.budget_spent and report.urgent:
                wait = LEAVING_BUDGET_WAIT  # the last job: its pass must not be skipped
            elif not report.locked:
                wait = LEAVING_LOCK_WAIT  # the pass holding the lock may have missed this job's drain
            else:
                return
            if attempt + 1 < self.budget_tries:
                self.clock.sleep(wait)
        logger.warning("stage job %s leaves without an autoscale pass of app %s: the Slurm budget stayed "
                       "spent, or another pass held the app's lock, for %d tries", self.job.job_id, self.app_id,
                       self.budget_tries, extra=self._facts("stage_leave_unscaled", tries=self.budget_tries))

    def _autoscale(self, *, leaving: tuple[str, str] | None = None) -> ScaleOutcome | None:
        if self.scale_refused:
            return None
        try:
            return self.scale(self.app_id, leaving=leaving)
        except PrivilegeError as exc:
            # a launcher role (migration 0018) may run the queue functions only, not the
            # autoscaler's reads and writes: say so once, and stop asking every interval
            self.scale_refused = True
            logger.warning("stage job %s does not autoscale app %s: its database role may not (%s); run "
                           "`scalebox autoscale --app %s` as the app's owner (scrontab, or a login node)",
                           self.job.job_id, self.app_id, exc, self.app_id,
                           extra=self._facts("autoscale_refused", error=str(exc)))
            return None
        except ScaleboxError as exc:
            logger.warning("autoscale failed for app %s (asked by stage job %s): %s", self.app_id,
                           self.job.job_id, exc, extra=self._facts("autoscale_failed", error=str(exc)))
            return None

    def _job_flags(self) -> tuple[bool, datetime | None]:
        """(asked to drain, end time) from the job's row, in one read. `scalebox stage stop` marks
        the job in the database (a signal could reach a launcher still starting up, before its
        handlers exist, and kill it)."""
        try:
            return self.store.job_flags(self.job.job_id, self.cluster)
        except ScaleboxError as exc:
            logger.warning("cannot read stage job %s's row (drain request, end time): %s", self.job.job_id, exc,
                           extra=self._facts("stage_row_unread", error=str(exc)))
            return False, None

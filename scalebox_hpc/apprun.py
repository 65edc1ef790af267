"""Run an app's modules on this host until it is done: what ``scalebox run`` and
:meth:`scalebox_hpc.client.Client.run` share (one implementation of "done").

A run ends when the app is FINISHED, when nothing is READY or RUNNING for three ticks in a row,
when every task left waits in modules no live slot can take (:func:`apps.stuck_modules`), at the
timeout, or on a signal (the launcher drains). How it is shown is the caller's business: the CLI
draws progress bars, the Python client shows nothing (or a live view).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the launcher stack is imported when a run starts, not with this module
    from scalebox_hpc.db.apps import ModuleCounts, StuckModule
    from scalebox_hpc.db.connection import Connection
    from scalebox_hpc.launcher.launcher import LauncherConfig
    from scalebox_hpc.node import SignalPolicy
    from scalebox_hpc.settings import Settings

logger = logging.getLogger(__name__)

UNSTARTED_GRACE_SECONDS = 5.0
"""After this long, a module with READY tasks and no slot at all in a run here is stuck."""
QUIET_TICKS = 3
"""Ticks in a row with nothing READY or RUNNING after which a run here ends (idle)."""


def work_root(given: str | Path | None = None, settings: Settings | None = None) -> Path:
    """``given``, else SCALEBOX_WORK_ROOT (``settings.work_root``; default settings: read from the
    environment now), else ``$TMPDIR/scalebox-<euid>/work`` (made 0700 and checked when a launcher
    claims its app dir: :func:`scalebox_hpc.runtime.paths.ensure_root`)."""
    from scalebox_hpc.runtime.paths import default_work_root
    from scalebox_hpc.settings import Settings

    site = settings or Settings.from_environ()
    return Path(given or site.work_root or default_work_root()).absolute()


def launcher_config(app_id: int, *, root: Path, modules: tuple[str, ...] = (), slots: int | None = None,
                    host: str | None = None, local: bool = False, local_scratch: str | None = None,
                    settings: Settings | None = None) -> LauncherConfig:
    """This host's launcher configuration for an app (``local``: every module's slots run here,
    whatever their host patterns, as ``scalebox run`` does); host and local scratch default to
    the ``settings``' (read from the environment now when not given)."""
    from scalebox_hpc.launcher.launcher import LauncherConfig, host_name
    from scalebox_hpc.settings import Settings

    site = settings or Settings.from_environ()
    name = host or host_name(site)
    scratch = local_scratch or site.local_scratch
    return LauncherConfig(app_id=app_id, host=name, work_root=root, modules=modules, slots=slots, local=local,
                          local_scratch=Path(scratch.replace("${HOST}", name)).absolute() if scratch else None)


class RunJudge:
    """Decides, tick by tick, when a run here is over, and remembers why. Each :meth:`tick`
    reads the module counts once (``counts``, for a progress display)."""

    def __init__(self, conn: Connection, app_id: int, timeout: float | None) -> None:
        self.conn, self.app_id = conn, app_id
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.started = time.monotonic()
        self.counts: list[ModuleCounts] = []
        self.quiet_ticks = 0
        self.timed_out = False
        self.ending = False
        """The judge itself ended the run (not a signal)."""
        self.interrupted = False
        """A signal drains the run."""
        self.stuck: list[StuckModule] = []
        self._split: bool | None = None
        # Slots that had ended before this run began belong to an earlier run (an interrupted
        # `scalebox run`, a stage job gone): they say nothing about this one. Counted, a resumed
        # run whose first tick came before its own slots registered (a loaded host) ended at
        # once, "no live slot (all 1 ended)", its tasks READY. Read by :meth:`begin`.
        self._ended_before: set[int] | None = None

    def tick(self) -> bool:
        """Read the counts and decide; True when the run should end (and from then on)."""
        self.ending = self.ending or self._decide()
        return self.ending

    def _decide(self) -> bool:
        from scalebox_hpc.db import apps
        from scalebox_hpc.models import TaskStatus

        self.counts = self.read_counts()
        if self.interrupted:  # draining on a signal: the slots end because we asked them to
            return True
        if self.app_status() == "FINISHED":
            return True
        # a module this run started no slot for (an MPI collective one) strands its tasks too,
        # once the slots had time to register
        started = time.monotonic() - self.started > UNSTARTED_GRACE_SECONDS
        stuck = apps.stuck_modules(self.counts, self.read_slots(), without_slots=started)
        if apps.all_work_stuck(self.counts, stuck):
            self.stuck = stuck
            return True
        pending = sum(mc.count(TaskStatus.READY) + mc.count(TaskStatus.RUNNING) for mc in self.counts)
        # an app split over databases (remote sinks) waits for its other parts' messages: no idle end
        self.quiet_ticks = self.quiet_ticks + 1 if pending == 0 and not self.split() else 0
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
            return True
        return self.quiet_ticks >= QUIET_TICKS

    def split(self) -> bool:
        """The app has remote sinks (parts in other databases)."""
        if self._split is None:
            from scalebox_hpc.db.sql import query

            with self.conn.transaction():
                self._split = bool(self.conn.execute(query("list_remote_sinks"), {"app_id": self.app_id}).fetchall())
        return self._split

    def draining(self) -> None:
        """Called once when the run drains: on a signal, unless the judge itself ended the run."""
        if not self.ending:
            self.interrupted = True

    def read_counts(self) -> list[ModuleCounts]:
        """The app's task counts per module, now."""
        from scalebox_hpc.db import apps

        with self.conn.transaction():
            return apps.module_counts(self.conn, self.app_id)

    def begin(self) -> None:
        """Note the slots that have ended already (an earlier run's): called before the run's
        launcher starts (else at the first read of the slots)."""
        if self._ended_before is None:
            self._earlier(self._all_slots())

    def read_slots(self) -> list[dict[str, Any]]:
        """The app's slots now: this run's, and those live elsewhere (not those of earlier runs)."""
        slots = self._all_slots()
        earlier = self._earlier(slots)
        return [s for s in slots if int(s["id"]) not in earlier]

    def _earlier(self, slots: list[dict[str, Any]]) -> set[int]:
        """The ids of the slots that had ended when the run began (from ``slots`` the first time)."""
        if self._ended_before is None:
            self._ended_before = {int(s["id"]) for s in slots if not s["live"]}
        return self._ended_before

    def _all_slots(self) -> list[dict[str, Any]]:
        from scalebox_hpc.db import apps

        with self.conn.transaction():
            return apps.list_slots(self.conn, self.app_id)

    def app_status(self) -> str:
        """The app's stored status (``?`` when it is gone)."""
        from scalebox_hpc.db.sql import query

        with self.conn.transaction():
            row = self.conn.execute(query("app_status"), {"app_id": self.app_id}).fetchone()
        return str(row["status"]) if row else "?"


def run_here(
    dsn: str, config: LauncherConfig, judge: RunJudge, *, grace: float = 30.0,
    on_tick: Callable[[], None] | None = None, signals: SignalPolicy | None = None, settings: Settings | None = None,
) -> int:
    """Run this host's slots of ``config.app_id`` until ``judge`` says the run is over (or a
    signal drains it); returns the launcher's exit code. ``on_tick`` runs after each decision
    (a progress display). An exception in a tick (the database gone, a display failing) ends
    the run like a decision would: the slots are drained and joined first, then it is
    raised again, so no slot thread outlives the call."""
    from scalebox_hpc.node import run_launcher

    failure: list[BaseException] = []

    def tick() -> bool:
        try:
            done = judge.tick()
            if on_tick is not None:
                on_tick()
            return done
        except Exception as exc:  # re-raised below, once the slots are stopped
            logger.error("app %d: the run here stops: %s", judge.app_id, exc)
            failure.append(exc)
            judge.ending = True
            return True

    judge.begin()
    code = run_launcher(dsn, config, grace=grace, on_tick=tick, on_drain=judge.draining, signals=signals,
                        settings=settings)
    if not failure and judge.split():  # what the last hand-offs sent to other databases, before we leave
        from scalebox_hpc.db import outbox

        outbox.relay_quietly(dsn, app_id=judge.app_id)
    if failure:
        raise failure[0]
    return code

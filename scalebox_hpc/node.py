"""Composition root of the per-node launcher: builds the concrete queue, runtime, listener
and launcher, installs the signal handlers, runs until the slots end or a signal drains them.
``scalebox launcher`` (and ``scalebox run``) call into here."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from scalebox_hpc import embedded
from scalebox_hpc.db import schema
from scalebox_hpc.db.connection import configured_dsn, connect, translate_errors
from scalebox_hpc.db.notify import Listener
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.errors import NotFoundError
from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
from scalebox_hpc.launcher.mpi_stage import StageConfig
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.runtime.local import LocalRuntime

logger = logging.getLogger(__name__)


def configure_logging(verbose: int = 0) -> None:
    """Entry points only: one stderr handler, INFO with -v, DEBUG with -vv."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
    )


def resolve_dsn(*, create_schema: bool = True, start_embedded: bool = True) -> str:
    """The database to use: SCALEBOX_DSN / PG* variables, else the embedded server (started
    on demand). The schema is checked (and created in an empty database when asked)."""
    dsn = configured_dsn()
    if dsn is None:
        if not start_embedded:
            running = embedded.running_dsn()
            if running is None:
                from scalebox_hpc.errors import EmbeddedDatabaseError

                raise EmbeddedDatabaseError(
                    "no database configured and the embedded PostgreSQL is not running",
                    hint="set SCALEBOX_DSN, or run `scalebox db init` to start the embedded one",
                )
            dsn = running
        else:
            dsn = embedded.ensure_running()
    with connect(dsn) as conn, translate_errors(dsn):
        schema.ensure(conn, create=create_schema)
        conn.commit()
    return dsn


def build(dsn: str, config: LauncherConfig) -> tuple[Launcher, Listener]:
    """Wire the launcher for one host from concrete parts."""
    wakeups = Wakeups()
    listener = Listener(dsn, wakeups.notify)
    launcher = Launcher(config, lambda: PgQueue(dsn), LocalRuntime(), wakeups)
    return launcher, listener


def run_launcher(
    dsn: str, config: LauncherConfig, *, grace: float = 30.0, on_tick: Callable[[], bool] | None = None,
    tick_seconds: float = 0.5,
) -> int:
    """Run this host's slots until they end. SIGTERM/SIGINT drain (no new claims; running tasks
    get ``grace`` seconds). ``on_tick`` is called periodically; returning True drains too."""
    if "SCALEBOX_DSN" not in config.script_env:
        config = dataclasses.replace(config, script_env={**config.script_env, "SCALEBOX_DSN": dsn})
    launcher, listener = build(dsn, config)
    listener.start()
    listener.ready.wait(5.0)
    stop = threading.Event()
    previous = _install_signals(stop)
    try:
        if launcher.start() == 0:
            logger.warning("no slots for host %s", config.host)
        while launcher.alive() and not stop.is_set():
            if on_tick is not None and on_tick():
                break
            stop.wait(tick_seconds)
        launcher.stop(grace)
    finally:
        _restore_signals(previous)
        listener.stop()
    return 0


def _install_signals(stop: threading.Event) -> dict[int, object]:
    def handler(signum: int, _frame: FrameType | None) -> None:
        logger.warning("signal %s: draining", signal.Signals(signum).name)
        stop.set()

    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_signals(previous: dict[int, object]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)  # type: ignore[arg-type]


def run_mpi_stage(config: StageConfig) -> int:
    """One rank of an MPI stage job (``srun --mpi=pmi2 scalebox launcher --mpi -m MODULE``).
    The communicator is checked before anything else (the singleton guard); only rank 0
    resolves the database and opens the stage's one connection."""
    from scalebox_hpc import mpi
    from scalebox_hpc.launcher import mpi_stage

    # MPICH's default UCX netmod publishes an address so long that it goes through PMI in
    # segments, which Slurm 22.05's pmi2 plug-in intermittently misparses (hangs at MPI_Init);
    # the OFI netmod's short address does not (measured: 2 of 5 starts hung vs 0 of 12)
    os.environ.setdefault("MPIR_CVAR_CH4_NETMOD", "ofi")
    comm = mpi.load_mpi().COMM_WORLD

    def open_queue() -> tuple[PgQueue, int, dict[str, str]]:
        # the stage's one connection: the schema check and the app lookup go through it too
        dsn = configured_dsn() or resolve_dsn(create_schema=False, start_embedded=False)
        queue = PgQueue(dsn)
        app_id = config.app_id
        with translate_errors(dsn):
            schema.ensure(queue.conn, create=False)
            if app_id is None:
                row = queue.conn.execute("SELECT max(id) AS id FROM sbx_apps").fetchone()
                if not row or row["id"] is None:
                    raise NotFoundError("app", "(any)")
                app_id = int(row["id"])
        return queue, app_id, {"SCALEBOX_DSN": dsn}

    return mpi_stage.run_stage(comm, config, open_queue, LocalRuntime())

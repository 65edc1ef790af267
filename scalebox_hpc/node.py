"""Composition root of the per-node launcher: builds the concrete queue, runtime, listener
and launcher, installs the signal handlers, runs until the slots end or a signal drains them.
``scalebox launcher`` (and ``scalebox run``) call into here."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType

from scalebox_hpc import embedded
from scalebox_hpc.db import schema
from scalebox_hpc.db.connection import configured_dsn, connect, translate_errors
from scalebox_hpc.db.notify import Listener
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.runtime.base import ContainerRuntime
from scalebox_hpc.runtime.choose import RuntimeChooser
from scalebox_hpc.runtime.container import HostDirs

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


def make_runtime(environ: Mapping[str, str] | None = None) -> ContainerRuntime:
    """This host's runtimes: ``SCALEBOX_RUNTIME`` is the default for modules with a base_image
    and no ``runtime:`` (``auto``: Apptainer, else Podman, else Docker); ``SCALEBOX_LOCAL_DIR`` is
    mounted at /local (default: <tmp>/scalebox-local), ``SCALEBOX_DATA_ROOT`` at /data,
    ``SCALEBOX_SIF_CACHE`` holds converted images."""
    env = os.environ if environ is None else environ
    local = env.get("SCALEBOX_LOCAL_DIR") or os.path.join(tempfile.gettempdir(), "scalebox-local")
    data = env.get("SCALEBOX_DATA_ROOT")
    cache = env.get("SCALEBOX_SIF_CACHE")
    return RuntimeChooser(
        env.get("SCALEBOX_RUNTIME", "auto"), host=HostDirs(Path(local), Path(data) if data else None),
        sif_cache=Path(cache) if cache else None, host_env=env,
    )


def build(dsn: str, config: LauncherConfig) -> tuple[Launcher, Listener]:
    """Wire the launcher for one host from concrete parts."""
    wakeups = Wakeups()
    listener = Listener(dsn, wakeups.notify)
    launcher = Launcher(config, lambda: PgQueue(dsn), make_runtime(), wakeups)
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

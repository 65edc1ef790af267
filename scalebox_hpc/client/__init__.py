"""The Python client: drive apps from Python as the ``scalebox`` command does from a shell.

::

    from scalebox_hpc import Client

    with Client() as sbx:                       # SCALEBOX_DSN / PG*, else the embedded database
        outcome = sbx.run("examples/app-primes/app.yaml")
        print(outcome.result)                   # Result is 1229

A composition root like the CLI (the top layer): it opens one database connection, uses the
same library functions as the commands (the pipeline loader, :mod:`scalebox_hpc.db.apps`,
:func:`scalebox_hpc.apprun.run_here` for :meth:`Client.run`) and raises the
:class:`~scalebox_hpc.errors.ScaleboxError` tree.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

from scalebox_hpc.client.results import Outcome as Outcome  # re-exported: the client's answers
from scalebox_hpc.client.results import Task as Task
from scalebox_hpc.errors import AppTimeoutError, NotFoundError, ScaleboxError
from scalebox_hpc.models import AppStatus, TaskStatus
from scalebox_hpc.settings import Settings

if TYPE_CHECKING:
    from scalebox_hpc.db.connection import Connection
    from scalebox_hpc.pipeline import AppSpec

logger = logging.getLogger(__name__)

Pipeline = str | os.PathLike[str] | Mapping[str, Any]
"""A pipeline file (or the directory holding its ``app.yaml``), or a pipeline as data: what
``yaml.safe_load`` of a pipeline file gives."""
StatusFilter = int | str | None
"""A task status: a code (``-1``, ``0``, ``124``...), a name (``ready``, ``running``, ``ok``,
``timeout``, ``stalled``, ``system_error``...), or ``failed`` (every failure)."""

POLL_SECONDS = 0.5
"""How often :meth:`Client.wait` looks."""
FAILED = "failed"


def _status_code(status: int | str) -> int | str:
    """A status filter as a code, or ``failed``; unknown names are a ScaleboxError."""
    if isinstance(status, int):
        return int(status)
    text = status.strip().lower().replace("-", "_")
    if text == FAILED:
        return FAILED
    if text.lstrip("-").isdigit():
        return int(text)
    names = {s.name.lower(): int(s) for s in TaskStatus}
    if text not in names:
        raise ScaleboxError(f"unknown task status {status!r}",
                            hint=f"a code, or one of: {', '.join([FAILED, *names])}")
    return names[text]


class Client:
    """A connection to a scalebox database and the operations on its apps.

    ``dsn``: a PostgreSQL connection string; None resolves it as the ``scalebox`` command
    does (SCALEBOX_DSN, else the PG* variables, else the private embedded PostgreSQL, started
    on demand). The schema is created in an empty database. ``work_root``: where :meth:`run`
    puts the slots' work dirs (default: SCALEBOX_WORK_ROOT, else a per-user temp dir).
    ``settings``: the site's (default: read from the environment once, here).
    Use it as a context manager (or call :meth:`close`): it holds one connection.
    """

    def __init__(self, dsn: str | None = None, *, work_root: str | os.PathLike[str] | None = None,
                 settings: Settings | None = None) -> None:
        from scalebox_hpc import embedded
        from scalebox_hpc.apprun import work_root as resolve_root
        from scalebox_hpc.db import schema
        from scalebox_hpc.db.connection import configured_dsn, connect, translate_errors

        self.settings: Settings = settings or Settings.from_environ()
        """What this client read from the environment (SCALEBOX_*), passed to what it runs."""
        resolved = dsn or configured_dsn(self.settings)
        self.dsn: str = resolved if resolved is not None else embedded.ensure_running(
            embedded.data_home(self.settings))
        """The database in use."""
        self.work_root: Path = resolve_root(os.fspath(work_root) if work_root is not None else None, self.settings)
        self._conn: Connection | None = connect(self.dsn, pooler=self.settings.db_pooler)
        try:
            with translate_errors(self.dsn):
                schema.ensure(self._conn, create=True)
                self._conn.commit()
        except BaseException:
            self.close()
            raise

    # -- the connection -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (a second call does nothing)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def conn(self) -> Connection:
        """The open connection (ScaleboxError after :meth:`close`)."""
        if self._conn is None:
            raise ScaleboxError("the client is closed", hint="make a new Client")
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One transaction, psycopg errors as the ScaleboxError tree."""
        from scalebox_hpc.db.connection import translate_errors

        conn = self.conn
        with translate_errors(self.dsn), conn.transaction():
            yield conn

    # -- apps ----------------------------------------------------------------------------------
    def load(self, pipeline: Pipeline, *, env: Mapping[str, str] | None = None,
             env_files: Sequence[str | os.PathLike[str]] = (), app_dir: str | os.PathLike[str] | None = None,
             ) -> AppSpec:
        """Load and validate a pipeline without creating anything (``scalebox app create --check``).

        ``env``: variables for ``${VAR}`` over the environment's; ``env_files``: as ``-e``
        (a NAME next to the pipeline file, or a path); ``app_dir``: for a pipeline given as
        data, where its module dirs are (default: the current directory). A problem is a
        :class:`~scalebox_hpc.errors.PipelineError` naming the file, line and key."""
        from scalebox_hpc.pipeline import load_pipeline, load_pipeline_data

        environ = {**os.environ, **(env or {})}
        files = [os.fspath(f) for f in env_files]
        if isinstance(pipeline, Mapping):
            return load_pipeline_data(pipeline, app_dir=None if app_dir is None else os.fspath(app_dir),
                                      env_files=files, environ=environ)
        return load_pipeline(os.fspath(pipeline), env_files=files, environ=environ)

    def create_app(self, pipeline: Pipeline, *, env: Mapping[str, str] | None = None,
                   env_files: Sequence[str | os.PathLike[str]] = (),
                   app_dir: str | os.PathLike[str] | None = None) -> int:
        """Create an app with its start tasks (one transaction: a bad pipeline creates
        nothing); returns its id. The arguments are :meth:`load`'s."""
        from scalebox_hpc.db import apps

        spec = self.load(pipeline, env=env, env_files=env_files, app_dir=app_dir)
        with self._tx() as conn:
            app_id = apps.create_app(conn, spec)
        logger.info("created app %d (%s)", app_id, spec.name)
        return app_id

    def outcome(self, app: int) -> Outcome:
        """Where the app stands now."""
        from scalebox_hpc.db import apps

        with self._tx() as conn:
            row = apps.get_app(conn, app)
            counts = apps.module_counts(conn, app)
            slots = apps.list_slots(conn, app)
        return Outcome(
            app_id=app, name=str(row["name"]), status=str(row["status"]),
            state=apps.app_state(row["status"], counts, slots), result=row["result"],
            counts=MappingProxyType({mc.name: MappingProxyType(dict(mc.by_status)) for mc in counts}),
        )

    def result(self, app: int) -> str | None:
        """The app's result text (None while no task set one)."""
        return self.outcome(app).result

    def cancel(self, app: int) -> None:
        """Finish the app now with the result ``cancelled``: nothing more is claimed, and
        launchers kill its running tasks (within half a heartbeat) and give them back."""
        from scalebox_hpc.db import apps

        with self._tx() as conn:
            apps.cancel_app(conn, app)

    # -- tasks ---------------------------------------------------------------------------------
    def add_tasks(self, app: int, module: str | None, bodies: Iterable[str], *,
                  headers: Mapping[str, Any] | None = None, initial: bool = False) -> int:
        """Add one task per body to ``module`` (None: the app's first module), all with
        ``headers``, by the module's CONFLICT_ACTION, in one transaction; returns the rows
        written. A body or headers that cannot be stored is an InvalidMessageError and adds
        nothing. ``initial``: as INITIAL (-9), not claimable until activated."""
        from scalebox_hpc.db import apps
        from scalebox_hpc.models import validate_body, validate_headers

        texts = [validate_body(b) for b in ([bodies] if isinstance(bodies, str) else bodies)]
        hdrs = validate_headers(dict(headers or {}))
        with self._tx() as conn:
            self._check_module(conn, app, module)
            done = apps.submit(conn, app, [apps.Batch(module, hdrs, texts)], module=module, initial=initial)
        return done.written

    def tasks(self, app: int, *, status: StatusFilter = None, module: str | None = None,
              limit: int | None = None) -> list[Task]:
        """The app's tasks, oldest first: all, or those of one ``status`` (a code, a name, or
        ``failed``) and/or ``module``; at most ``limit``."""
        from scalebox_hpc.db import apps

        code = None if status is None else _status_code(status)
        most = limit if limit is not None else 2**62
        with self._tx() as conn:
            self._check_module(conn, app, module)
            if code == FAILED:
                rows = apps.list_failed_tasks(conn, app, module=module, limit=most)
            else:
                rows = apps.list_tasks(conn, app, module=module, status=code if isinstance(code, int) else None,
                                       limit=most)
        return [self._task(app, r) for r in rows]

    def task(self, task_id: int) -> Task:
        """One task by id (NotFoundError when there is none)."""
        from scalebox_hpc.db import apps

        with self._tx() as conn:
            row = apps.get_task(conn, task_id)
        return self._task(int(row["app_id"]), row)

    def retry(self, app: int, task_ids: Iterable[int] | None = None, *, status: int | str = FAILED,
              module: str | None = None) -> list[int]:
        """Make finished tasks READY again with a fresh attempt budget (``scalebox task retry``):
        the given ``task_ids`` of the app, else every task of ``status`` (default: every failed
        one), of ``module`` if given. Returns the ids requeued."""
        from scalebox_hpc.db import apps

        if task_ids is not None:
            ids = [int(i) for i in task_ids]
            for task_id in ids:  # another app's task is not this app's to retry
                if self.task(task_id).app_id != app:
                    raise NotFoundError("task", task_id)
        else:
            ids = [t.id for t in self.tasks(app, status=status, module=module)]
        with self._tx() as conn:
            return apps.retry_tasks(conn, ids)

    # -- waiting and running -------------------------------------------------------------------
    def wait(self, app: int, timeout: float | None = None, progress: bool = False) -> Outcome:
        """Wait until the app ends: FINISHED (a task called ``scalebox app set-finished``, or a
        cancel), or nothing READY or RUNNING any more (INITIAL tasks wait for an activation and
        do not count). Someone must run the slots (a launcher, a stage job, :meth:`run`).
        ``timeout`` (seconds): then AppTimeoutError. ``progress``: the live view of
        ``scalebox status --watch`` on stderr meanwhile (on a terminal)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._progress(app, progress) as show:
            while True:
                outcome = self.outcome(app)
                show()
                if outcome.ended:
                    return outcome
                if deadline is not None and time.monotonic() >= deadline:
                    raise AppTimeoutError(app, float(timeout or 0), outcome.pending)
                time.sleep(POLL_SECONDS if deadline is None else max(0.0, min(POLL_SECONDS,
                                                                               deadline - time.monotonic())))

    def run(self, pipeline: Pipeline | int, *, env: Mapping[str, str] | None = None,
            env_files: Sequence[str | os.PathLike[str]] = (), app_dir: str | os.PathLike[str] | None = None,
            timeout: float | None = None, grace: float = 30.0) -> Outcome:
        """What ``scalebox run`` does: create the app from ``pipeline`` (or continue app
        ``pipeline`` when given an id), run every module's slots here, in this process, until
        the app is FINISHED, idle, or left with work no slot here can take (``Outcome.stuck``);
        returns its outcome. The slots are stopped and joined before it returns or raises.

        ``timeout`` (seconds): then the running tasks get ``grace`` seconds, go back READY, and
        AppTimeoutError is raised. In the main thread, Ctrl-C drains the same way (a second one
        stops the running tasks at once) and KeyboardInterrupt is raised afterwards."""
        from scalebox_hpc.apprun import RunJudge, launcher_config, run_here
        from scalebox_hpc.db import apps
        from scalebox_hpc.db.connection import translate_errors
        from scalebox_hpc.node import SignalPolicy

        if isinstance(pipeline, int):
            app_id = pipeline
            before = self.outcome(app_id)
            if before.status == AppStatus.FINISHED:
                return before
        else:
            app_id = self.create_app(pipeline, env=env, env_files=env_files, app_dir=app_dir)
        judge = RunJudge(self.conn, app_id, timeout)
        config = launcher_config(app_id, root=self.work_root, local=True, settings=self.settings)
        with translate_errors(self.dsn):
            run_here(self.dsn, config, judge, grace=grace, signals=SignalPolicy(), settings=self.settings)
        if judge.interrupted:
            raise KeyboardInterrupt
        outcome = self.outcome(app_id)
        if judge.timed_out:
            raise AppTimeoutError(app_id, float(timeout or 0), outcome.pending)
        with self._tx() as conn:
            stuck = judge.stuck or (apps.stuck_modules(apps.module_counts(conn, app_id), apps.list_slots(conn, app_id))
                                    if outcome.pending else [])
        return dataclasses.replace(outcome, stuck=tuple(s.describe() for s in stuck))

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _task(app: int, row: Mapping[str, Any]) -> Task:
        return Task(id=int(row["id"]), app_id=app, module=str(row["module"]), body=str(row["body"]),
                    headers=MappingProxyType(dict(row["headers"] or {})), status=int(row["status"]),
                    attempts=int(row["attempts"]), host=row.get("host"), created_at=row["created_at"],
                    started_at=row.get("started_at"), finished_at=row.get("finished_at"))

    @staticmethod
    def _check_module(conn: Connection, app: int, module: str | None) -> None:
        """The app exists, and so does ``module`` when given (NotFoundError naming the modules)."""
        from scalebox_hpc.db import apps

        names = apps.module_names(conn, app)
        if not names:
            apps.get_app(conn, app)  # NotFoundError for a missing app
        if module is not None and module not in names:
            err = NotFoundError("module", module)
            err.hint = f"the modules of app {app}: {', '.join(names) or '(none)'}"
            raise err

    @contextmanager
    def _progress(self, app: int, enabled: bool) -> Iterator[Any]:
        """A function refreshing the live view on stderr (a no-op when not enabled or not a terminal)."""
        if not enabled:
            yield lambda: None
            return
        from rich.console import Console
        from rich.live import Live

        from scalebox_hpc.db.connection import translate_errors
        from scalebox_hpc.liveview import bar_width, read_snapshot, render

        console = Console(stderr=True)
        if not console.is_terminal:
            yield lambda: None
            return
        with Live(console=console, auto_refresh=False, transient=False) as live:
            def show() -> None:
                with translate_errors(self.dsn):
                    view = render(read_snapshot(self.conn, app), hint="", width=bar_width(console.width))
                    live.update(view, refresh=True)
            yield show

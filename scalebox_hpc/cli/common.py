"""What the ``scalebox`` commands share: the database connection, the app and module
look-ups, parameter types, the emit buffer and terminal-safe text."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from scalebox_hpc.errors import NotFoundError, ScaleboxError
from scalebox_hpc.settings import Settings
from scalebox_hpc.text import terminal_safe as terminal_safe  # re-exported: the commands import it from here

if TYPE_CHECKING:
    from scalebox_hpc.db.connection import Connection


EMIT_BUFFER_ENV = "SCALEBOX_EMIT_FILE"  # same name as launcher.taskexec.EMIT_BUFFER_ENV


def settings() -> Settings:
    """The settings the ``scalebox`` group read once at start (outside a command, e.g. a test
    calling a helper directly: read from the environment now)."""
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(dict) if ctx is not None else None
    site = found.get("settings") if found is not None else None
    return site if isinstance(site, Settings) else Settings.from_environ()


def _dump(data: Any) -> None:
    click.echo(json.dumps(data, default=str, ensure_ascii=False, indent=2))


def _one_line(text: str) -> str:
    """:func:`terminal_safe` text for one line of a listing (newlines and tabs become spaces)."""
    return terminal_safe(text).replace("\n", " ").replace("\t", " ")


def _squeezed(text: str) -> str:
    """:func:`_one_line` with runs of white space as one space: a multi-line message on one line."""
    return " ".join(_one_line(text).split())


@contextmanager
def _db(create_schema: bool = False) -> Iterator[Connection]:
    """A connection to the configured database (else the embedded one, started on demand)
    whose schema is current. What node.resolve_dsn does, on one connection and without
    importing scalebox_hpc.node: that pulls in the launcher, the container runtimes and Slurm,
    a third of the start-up time of a command that only talks to the database."""
    from scalebox_hpc.db import schema
    from scalebox_hpc.db.connection import configured_dsn, connect, translate_errors

    if os.environ.get(EMIT_BUFFER_ENV):
        from scalebox_hpc.taskapi import ServiceError

        # a task has no database credentials (audit F5): without this, a call would start an
        # embedded database of its own, or use a DSN the task found, and act outside its app
        raise ServiceError("this command needs the database, and a running task has no access to it")
    site = settings()
    dsn = configured_dsn(site)
    # the private embedded database gets its schema on first use: a new user's first
    # `scalebox app list` says "no apps yet", not "run db init"
    create = create_schema or dsn is None
    if dsn is None:
        from scalebox_hpc import embedded

        dsn = embedded.ensure_running(embedded.data_home(site))
    with connect(dsn, pooler=site.db_pooler) as conn, translate_errors(dsn):
        schema.ensure(conn, create=create)
        conn.commit()
        yield conn


def _app_id(conn: Connection, app: int | None) -> int:
    """The app named by --app / SCALEBOX_APP_ID, else the newest app."""
    from scalebox_hpc.db.sql import query

    if app is not None:
        if conn.execute(query("app_exists"), {"app_id": app}).fetchone() is None:
            raise NotFoundError("app", app)
        return app
    from_env = settings().app_id
    if from_env is not None:
        return from_env
    row = conn.execute(query("newest_app")).fetchone()
    if not row or row["id"] is None:
        raise ScaleboxError(NO_APPS)
    return int(row["id"])


NO_APPS = "no apps yet — `scalebox run app.yaml` (or `scalebox app create app.yaml`) makes one"
"""What every command that needs an app says on an empty database."""


def _check_module(conn: Connection, app_id: int, module: str | None) -> None:
    """An unknown ``-m MODULE`` is an error naming the app's modules, with a did-you-mean."""
    if module is None:
        return
    from scalebox_hpc.db import apps

    names = apps.module_names(conn, app_id)
    if module in names:
        return
    import difflib

    err = NotFoundError("module", module)
    close = difflib.get_close_matches(module, names, n=1)
    err.hint = (f"did you mean {close[0]!r}? " if close else "") + \
        f"the modules of app {app_id}: {', '.join(names) or '(none)'}"
    raise err


def _check_dsn(site: Settings) -> None:
    """A SCALEBOX_DSN that is not a connection string is one line with a hint, not a traceback
    (the password, if any, is not repeated)."""
    dsn = site.dsn
    if not dsn:
        return
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from scalebox_hpc.errors import DatabaseError

    try:
        if conninfo_to_dict(dsn).get("password") and not site.dsn_password_ok:
            click.echo("warning: SCALEBOX_DSN holds a password; put it in ~/.pgpass (0600), PGPASSFILE or a "
                       "service file instead: a DSN travels in stage jobs' environment (the password is not "
                       "shown here; SCALEBOX_DSN_PASSWORD_OK=1 silences this)", err=True)
    except psycopg.ProgrammingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unparsable"
        for secret in re.findall(r"://[^@/]*:([^@/]+)@|password\s*=\s*(\S+)", dsn):
            for part in secret:
                if part:
                    reason = reason.replace(part, "***")
        raise DatabaseError(
            f"SCALEBOX_DSN is not a PostgreSQL connection string: {reason}",
            hint="use postgresql://USER@HOST:5432/DBNAME or 'host=HOST dbname=DBNAME' "
                 "(password in ~/.pgpass), or unset it for the embedded database",
        ) from None


class StatusType(click.ParamType[int | str, Any]):
    """A task status: a number, or a name (ready, running, initial, ok, timeout, stalled,
    system_error, emit_failed, output_invalid; ``failed`` = every failure)."""

    name = "STATUS"
    NAMES = {"initial": -9, "ready": -1, "running": -3, "ok": 0, "stalled": 123, "timeout": 124,
             "system_error": -101, "emit_failed": -102, "output_invalid": -103}
    FAILED = "failed"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        text = text if text.lstrip("-").isdigit() else text.replace("-", "_")
        if text == self.FAILED:
            return self.FAILED
        if text in self.NAMES:
            return self.NAMES[text]
        try:
            code = int(text)
        except ValueError:
            import difflib

            close = difflib.get_close_matches(text, [*self.NAMES, self.FAILED], n=1)
            self.fail(f"{value!r} is not a status code or name" + (f" (did you mean {close[0]!r}?)" if close else "")
                      + f"; names: {', '.join([self.FAILED, *self.NAMES])}", param, ctx)
        if not -(2**31) <= code < 2**31:
            self.fail(f"{code} is out of range", param, ctx)
        return code


STATUS = StatusType()


class _DatabaseInt(click.types.IntParamType):
    """An integer bounded by its database column: the bounds are checked (a usage error, not a
    database error), but not printed in ``--help`` (``1<=x<=9223372036854775807`` is noise)."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = int(super().convert(value, param, ctx))
        if not self.low <= number <= self.high:
            self.fail(f"{number} is not in the range {self.low}<=x<={self.high}.", param, ctx)
        return number


ID = _DatabaseInt(1, 2**63 - 1)
"""A database id (bigint): out-of-range values are a usage error, not a database error."""
INT32 = _DatabaseInt(-(2**31), 2**31 - 1)
"""A status code, count or semaphore value (PostgreSQL integer)."""
APP_OPTION = click.option("--app", "app", type=ID, default=None, help="App id (default: the newest app).")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def app_or_id(app: int | None, app_id: int | None) -> int | None:
    """The app named by ``--app N`` (every command's way) or by the positional ID the older
    commands (`status 3`, `app show 3`) also take; both given must agree."""
    if app is not None and app_id is not None and app != app_id:
        raise click.UsageError(f"--app {app} and the ID {app_id} name different apps: give one")
    return app if app is not None else app_id


def _load(file: str, env_files: tuple[str, ...]) -> Any:
    from scalebox_hpc.pipeline import load_pipeline

    return load_pipeline(file, env_files=list(env_files))



def _buffer(item: dict[str, Any]) -> None:
    line = json.dumps(item, ensure_ascii=False) + "\n"
    with open(os.environ[EMIT_BUFFER_ENV], "a", encoding="utf-8") as fh:
        fh.write(line)



def _work_root(work_root: str | None) -> Path:
    """--work-root, else SCALEBOX_WORK_ROOT, else a per-user directory under the temp dir."""
    from scalebox_hpc.apprun import work_root as resolve

    return resolve(work_root, settings())


_DIR_COMMANDS = {"semaphore.create": "semaphore create", "semaphore.get": "semaphore get",
                 "semaphore.add": "semaphore increment", "semaphore.list": "semaphore list",
                 "variable.set": "variable set", "variable.get": "variable get", "variable.list": "variable list"}


def in_task_via_dir(op: str, app: int | None, name: str = "", value: int | str | None = None) -> Any:
    """A task's semaphore or variable call (socket op ``op``, arguments as click converted them)
    through its request directory ``$SCALEBOX_SERVICES_DIR``, for a task that has one and no
    socket (the run.sh of an MPI farm's worker rank): the value the launcher rendered, read
    back (a listing as JSON), for the caller to print as it prints the socket's answer. A
    refusal is the launcher's rendering of the CLI's error, printed here, and the exit status."""
    import sys

    from scalebox_hpc import taskapi

    cmd = _DIR_COMMANDS[op]
    nameless = op.endswith(".list")
    call = taskapi.FileCall(int(os.environ.get("TASK_ID") or 0), cmd, "" if nameless else name,
                            None if value is None else str(value), None if app is None else str(app), nameless)
    reply = taskapi.call_dir(os.environ.get(taskapi.SERVICES_DIR_ENV, ""), call)
    if reply.status != 0:
        sys.stderr.write(reply.stderr)
        raise SystemExit(reply.status)
    if nameless:
        return json.loads(reply.stdout)
    return reply.stdout.removesuffix("\n") if op != "variable.set" else None

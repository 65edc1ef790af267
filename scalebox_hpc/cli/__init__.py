"""The ``scalebox`` command (click): the login-node composition root.

Heavy imports (psycopg, pydantic, rich) happen inside the commands: ``scalebox task add``
runs once per emitted message inside run.sh, so its start-up time matters.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from scalebox_hpc.errors import InvalidMessageError, NotFoundError, ScaleboxError

if TYPE_CHECKING:
    from scalebox_hpc.db.apps import ModuleCounts
    from scalebox_hpc.db.connection import Connection

EMIT_BUFFER_ENV = "SCALEBOX_EMIT_FILE"  # same name as launcher.taskexec.EMIT_BUFFER_ENV


def _dump(data: Any) -> None:
    click.echo(json.dumps(data, default=str, ensure_ascii=False, indent=2))


_TERMINAL_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, screen clears
    r"|\x1b[\]PX^_][^\x07\x1b\n]*(?:\x07|\x1b\\)"  # OSC, DCS, SOS, PM, APC strings: titles, links, clipboard
    r"|\x1b[ -/]*[0-~]"  # the other escape sequences (charsets, resets), and an unterminated string's opener
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1 (8-bit CSI, OSC)


def terminal_safe(text: str) -> str:
    """``text`` without terminal escape sequences or control characters (tab and newline kept):
    what tasks print, or set as results, must not retitle, recolour or rewrite the viewer's terminal."""
    return _CONTROL.sub("", _TERMINAL_ESCAPE.sub("", text))


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

    dsn = configured_dsn()
    # the private embedded database gets its schema on first use: a new user's first
    # `scalebox app list` says "no apps yet", not "run db init"
    create = create_schema or dsn is None
    if dsn is None:
        from scalebox_hpc import embedded

        dsn = embedded.ensure_running()
    with connect(dsn) as conn, translate_errors(dsn):
        schema.ensure(conn, create=create)
        conn.commit()
        yield conn


def _app_id(conn: Connection, app: int | None) -> int:
    """The app named by --app / SCALEBOX_APP_ID, else the newest app."""
    if app is not None:
        if conn.execute("SELECT 1 FROM sbx_apps WHERE id = %s", (app,)).fetchone() is None:
            raise NotFoundError("app", app)
        return app
    if os.environ.get("SCALEBOX_APP_ID"):
        return int(os.environ["SCALEBOX_APP_ID"])
    row = conn.execute("SELECT max(id) AS id FROM sbx_apps").fetchone()
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


def _check_dsn() -> None:
    """A SCALEBOX_DSN that is not a connection string is one line with a hint, not a traceback
    (the password, if any, is not repeated)."""
    dsn = os.environ.get("SCALEBOX_DSN")
    if not dsn:
        return
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from scalebox_hpc.errors import DatabaseError

    try:
        conninfo_to_dict(dsn)
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--traceback", is_flag=True, envvar="SCALEBOX_TRACEBACK", help="Show tracebacks on errors.")
@click.version_option(package_name="scalebox_hpc")
@click.pass_context
def cli(ctx: click.Context, verbose: int, traceback: bool) -> None:
    """scalebox: streaming batch pipelines on PostgreSQL, with per-node launchers.

    The database is SCALEBOX_DSN (or the PG* variables); without either, a private embedded
    PostgreSQL is started in ~/.local/share/scalebox_hpc and reused by later commands.
    """
    ctx.ensure_object(dict)
    ctx.obj["traceback"] = traceback
    ctx.obj["verbose"] = verbose
    if not os.environ.get(EMIT_BUFFER_ENV) and ctx.invoked_subcommand is not None:
        _check_dsn()  # not inside run.sh: `task add` there only buffers, and must start fast
    if verbose:
        from scalebox_hpc.node import configure_logging

        configure_logging(verbose)


# -- db ---------------------------------------------------------------------------------------
@cli.group()
def db() -> None:
    """Create, upgrade, inspect or stop the database."""


@db.command("init")
def db_init() -> None:
    """Create the schema (starts the embedded server when no DSN is configured)."""
    from scalebox_hpc.db import schema
    from scalebox_hpc.db.connection import connect, redact, translate_errors

    dsn = _dsn_without_schema()
    with connect(dsn) as conn, translate_errors(dsn):
        created = schema.init(conn)
    click.echo(f"{'created' if created else 'already initialised'}: {redact(dsn)}")


def _dsn_without_schema() -> str:
    from scalebox_hpc import embedded
    from scalebox_hpc.db.connection import configured_dsn

    dsn = configured_dsn()
    return embedded.ensure_running() if dsn is None else dsn


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations."""
    from scalebox_hpc.db import schema
    from scalebox_hpc.db.connection import connect, translate_errors

    dsn = _dsn_without_schema()
    with connect(dsn) as conn, translate_errors(dsn):
        applied = schema.upgrade(conn)
    click.echo("applied: " + ", ".join(applied) if applied else "up to date")


@db.command("status")
@JSON_OPTION
def db_status(as_json: bool) -> None:
    """Where the database is and which schema version it has."""
    from scalebox_hpc import embedded
    from scalebox_hpc.db import schema, sql
    from scalebox_hpc.db.connection import configured_dsn, connect, redact, translate_errors

    dsn = configured_dsn()
    kind = "configured"
    if dsn is None:
        kind, dsn = "embedded", embedded.running_dsn()
    info: dict[str, Any] = {"kind": kind, "running": dsn is not None, "expected_version": sql.schema_version()}
    if dsn is not None:
        info["dsn"] = redact(dsn)
        with connect(dsn) as conn, translate_errors(dsn):
            info["version"] = schema.current_version(conn)
    if as_json:
        _dump(info)
        return
    for key, value in info.items():
        click.echo(f"{key}: {value}")


@db.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL (a configured server is left alone)."""
    from scalebox_hpc import embedded

    click.echo("stopped" if embedded.stop() else "the embedded PostgreSQL was not running")


# -- app --------------------------------------------------------------------------------------
@cli.group()
def app() -> None:
    """Create and steer apps (pipelines)."""


def _load(file: str, env_files: tuple[str, ...]) -> Any:
    from scalebox_hpc.pipeline import load_pipeline

    return load_pipeline(file, env_files=list(env_files))


@app.command("create")
@click.option("-e", "--env-file", "env_files", multiple=True, help="Env file (NAME or NAME.env path).")
@click.option("--check", is_flag=True, help="Validate only; create nothing.")
@JSON_OPTION
@click.argument("file", type=click.Path(dir_okay=False))
def app_create(env_files: tuple[str, ...], check: bool, as_json: bool, file: str) -> None:
    """Create an app from a pipeline file (one transaction: a bad file creates nothing)."""
    spec = _load(file, env_files)
    if check:
        click.echo(f"ok: {spec.name} ({len(spec.modules)} modules)")
        return
    from scalebox_hpc.db import apps

    with _db(create_schema=True) as conn:
        app_id = apps.create_app(conn, spec)
    if as_json:
        _dump({"app_id": app_id, "name": spec.name})
    else:
        click.echo(app_id)


@app.command("list")
@JSON_OPTION
def app_list(as_json: bool) -> None:
    """List apps."""
    from scalebox_hpc.db import apps

    with _db() as conn:
        rows = apps.list_apps(conn)
    if as_json:
        _dump(rows)
        return
    if not rows:
        click.echo(NO_APPS, err=True)
        return
    click.echo(f"{'id':>5}  {'name':<20} {'status':<9} {'tasks':>7}        result")
    for r in rows:
        click.echo(f"{r['id']:>5}  {_one_line(r['name']):<20} {r['status']:<9} {r['tasks']:>7} tasks  "
                   f"{_one_line(r['result'] or '')}")


@app.command("show")
@JSON_OPTION
@click.argument("app_id", type=ID, required=False)
def app_show(as_json: bool, app_id: int | None) -> None:
    """Show one app (default: the newest): its status, its state (IDLE: nothing READY or
    RUNNING and no live slot; WAITING: READY tasks but no live slot) and its failed tasks.

    \b
    Examples:
      scalebox app show
      scalebox app show 3 --json
    """
    with _db() as conn:
        app_id = _app_id(conn, app_id)
        row, state, slots = _app_state(conn, app_id)
        rows = _status_rows(conn, app_id, slots)
        if as_json:
            _dump({**row, "state": state})
            return
        for key in ("id", "name", "label", "status", "result", "created_at", "finished_at"):
            click.echo(f"{key}: {terminal_safe(str(row[key])) if row[key] is not None else ''}")
        click.echo(f"state: {_one_line(_state_line(row, state, rows))}")
        failed = sum(r["failed"] for r in rows)
        if failed:
            _print_failures(conn, app_id, failed, err=False)


@app.command("set-finished")
@APP_OPTION
@click.option("--job-id", default=None, help="Accepted for Scalebox compatibility; ignored.")
@click.argument("text")
def app_set_finished(app: int | None, job_id: str | None, text: str) -> None:
    """Set the app's result and FINISHED. Inside run.sh it is committed with the task's result."""
    if os.environ.get(EMIT_BUFFER_ENV):
        _buffer({"kind": "finish", "text": text})
        return
    from scalebox_hpc.db import apps

    with _db() as conn:
        apps.finish_app(conn, _app_id(conn, app), text)


def _set_status(app_id: int | None, status: str) -> None:
    from scalebox_hpc.db import apps
    from scalebox_hpc.models import AppStatus

    with _db() as conn:
        apps.set_status(conn, _app_id(conn, app_id), AppStatus(status))


@app.command("pause")
@click.argument("app_id", type=ID, required=False)
def app_pause(app_id: int | None) -> None:
    """Stop claiming new tasks (running ones finish)."""
    _set_status(app_id, "PAUSED")


@app.command("resume")
@click.argument("app_id", type=ID, required=False)
def app_resume(app_id: int | None) -> None:
    """Claim again (also starts an app created with initial_status INITIAL)."""
    _set_status(app_id, "RUNNING")


@app.command("cancel")
@click.argument("app_id", type=ID, required=False)
def app_cancel(app_id: int | None) -> None:
    """Finish the app now with the result ``cancelled``: nothing more is claimed, and launchers
    kill the running tasks (within half a heartbeat) and give them back."""
    from scalebox_hpc.db import apps

    with _db() as conn:
        apps.cancel_app(conn, _app_id(conn, app_id))


# -- semaphores and variables -------------------------------------------------------------------
def _print_mapping(values: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _dump(values)
        return
    for name, value in values.items():  # values may come from run.sh (`variable set`)
        click.echo(f"{_one_line(str(name))}\t{_one_line(str(value))}")


@cli.group()
def semaphore() -> None:
    """Counters shared by every slot of an app (atomic in PostgreSQL); usable from run.sh.

    A module with ``arguments: {semaphore: NAME}`` claims only while NAME is positive, and each
    claim takes one unit; scripts give units back with ``scalebox semaphore increment NAME``."""


@semaphore.command("create")
@APP_OPTION
@click.argument("name")
@click.argument("value", type=INT32, default=0)
def semaphore_create(app: int | None, name: str, value: int) -> None:
    """Create (or reset) NAME with VALUE."""
    from scalebox_hpc.db import apps

    with _db() as conn:
        click.echo(apps.semaphore_create(conn, _app_id(conn, app), name, value))


@semaphore.command("get")
@APP_OPTION
@click.argument("name")
def semaphore_get(app: int | None, name: str) -> None:
    """Print NAME's value."""
    from scalebox_hpc.db import apps

    with _db() as conn:
        click.echo(apps.semaphore_get(conn, _app_id(conn, app), name))


@semaphore.command("increment")
@APP_OPTION
@click.argument("name")
@click.argument("delta", type=INT32, default=1)
def semaphore_increment(app: int | None, name: str, delta: int) -> None:
    """Add DELTA (default 1); prints the new value."""
    from scalebox_hpc.db import apps

    with _db() as conn:
        click.echo(apps.semaphore_add(conn, _app_id(conn, app), name, delta))


@semaphore.command("decrement")
@APP_OPTION
@click.argument("name")
@click.argument("delta", type=INT32, default=1)
def semaphore_decrement(app: int | None, name: str, delta: int) -> None:
    """Subtract DELTA (default 1); prints the new value."""
    from scalebox_hpc.db import apps

    with _db() as conn:
        click.echo(apps.semaphore_add(conn, _app_id(conn, app), name, -delta))


@semaphore.command("list")
@APP_OPTION
@JSON_OPTION
def semaphore_list(app: int | None, as_json: bool) -> None:
    """Every semaphore of the app."""
    from scalebox_hpc.db import apps

    with _db() as conn:
        _print_mapping(apps.semaphore_list(conn, _app_id(conn, app)), as_json)


@cli.group()
def variable() -> None:
    """Named text values shared by an app's scripts."""


@variable.command("set")
@APP_OPTION
@click.argument("name")
@click.argument("value")
def variable_set(app: int | None, name: str, value: str) -> None:
    """Set NAME to VALUE."""
    from scalebox_hpc.db import apps

    with _db() as conn:
        apps.variable_set(conn, _app_id(conn, app), name, value)


@variable.command("get")
@APP_OPTION
@click.argument("name")
def variable_get(app: int | None, name: str) -> None:
    """Print NAME's value."""
    from scalebox_hpc.db import apps

    with _db() as conn:
        click.echo(apps.variable_get(conn, _app_id(conn, app), name))


@variable.command("list")
@APP_OPTION
@JSON_OPTION
def variable_list(app: int | None, as_json: bool) -> None:
    """Every variable of the app."""
    from scalebox_hpc.db import apps

    with _db() as conn:
        _print_mapping(apps.variable_list(conn, _app_id(conn, app)), as_json)


# -- task -------------------------------------------------------------------------------------
@cli.group()
def task() -> None:
    """Add, inspect and retry tasks."""


def _parse_headers(pairs: tuple[str, ...], headers_json: str | None) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    if headers_json:
        try:
            loaded = json.loads(headers_json)
        except ValueError as exc:
            raise InvalidMessageError(f"--headers-json is not JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise InvalidMessageError("--headers-json must be a JSON object")
        headers.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidMessageError(f"header {pair!r} is not k=v")
        headers[key] = value
    return headers


def _body_arg(body: str) -> str:
    """Undo Python's surrogateescape so non-UTF-8 argv bytes give a clear error."""
    from scalebox_hpc.models import validate_body

    try:
        body.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessageError("task body is not valid UTF-8") from exc
    return validate_body(body)


@task.command("add")
@APP_OPTION
@click.option("-m", "--module", "--sink-module", "module", default=None,
              help="Target module (inside run.sh default: the first sink; else the first module).")
@click.option("-H", "--header", "headers", multiple=True, help="Header k=v (repeatable).")
@click.option("--headers-json", default=None, help="Headers as one JSON object.")
@click.option("--file", "from_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="One task per line of this file.")
@click.option("--initial", is_flag=True, help="Create as INITIAL (-9): not claimable until activated.")
@click.argument("bodies", nargs=-1)
def task_add(
    app: int | None, module: str | None, headers: tuple[str, ...], headers_json: str | None,
    from_file: str | None, initial: bool, bodies: tuple[str, ...],
) -> None:
    """Add tasks. Inside run.sh they are buffered and committed with the task's result.

    \b
    --file FILE: one task per line that is not blank (the line as it stands is the body),
    read as a stream and sent by COPY, so a file of any length fits. A line that cannot be a
    body (NUL, over 128 KiB, not UTF-8), or under CONFLICT_ACTION=FAIL a body that exists or
    repeats, fails the whole command with its line number, and nothing is added.
    """
    from scalebox_hpc.models import validate_headers

    texts = [_body_arg(b) for b in bodies]
    if not texts and not from_file:
        raise click.UsageError("give at least one BODY (or --file)")
    hdrs = validate_headers(_parse_headers(headers, headers_json))
    if os.environ.get(EMIT_BUFFER_ENV):
        if not _buffer_tasks(texts, from_file, hdrs, module):
            raise click.UsageError(f"{from_file} has no task body: every line is blank")
        return
    from scalebox_hpc.db import apps

    source = apps.BodyFile(Path(from_file)) if from_file else None
    with _db() as conn:
        app_id = _app_id(conn, app)
        _check_module(conn, app_id, module)
        done = apps.submit(conn, app_id, [apps.Batch(module, hdrs, texts, source)], module=module, initial=initial)
    if not done.given:
        raise click.UsageError(f"{from_file} has no task body: every line is blank")
    click.echo(f"added {done.written} task(s)")


def _buffer(item: dict[str, Any]) -> None:
    line = json.dumps(item, ensure_ascii=False) + "\n"
    with open(os.environ[EMIT_BUFFER_ENV], "a", encoding="utf-8") as fh:
        fh.write(line)


def _buffer_tasks(texts: list[str], from_file: str | None, headers: dict[str, Any], module: str | None) -> int:
    """Inside run.sh: append the tasks to the emit buffer, all or none (a bad line of a file
    adds nothing); returns how many. A file's lines are checked into a scratch file first,
    which then goes to the buffer in appends of whole lines: memory stays small, and the
    launcher never reads half a line."""
    from scalebox_hpc.db.bodyfile import BodyFile, read_bodies

    def line(body: str) -> bytes:
        item = {"kind": "task", "body": body, "headers": headers, "module": module}
        return (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")

    import tempfile

    buffer = os.environ[EMIT_BUFFER_ENV]
    count = len(texts)
    with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(buffer))) as scratch:
        scratch.writelines(line(t) for t in texts)
        if from_file:
            for _, body in read_bodies(BodyFile(Path(from_file))):
                scratch.write(line(body))
                count += 1
        scratch.seek(0)
        with open(buffer, "ab", buffering=0) as fh:
            while chunk := b"".join(scratch.readlines(1 << 20)):
                while chunk:  # one write(2) per chunk of whole lines; a short write goes on
                    chunk = chunk[fh.write(chunk) or 0:]
    return count


@task.command("list")
@APP_OPTION
@click.option("-m", "--module", default=None, help="Only this module.")
@click.option("-s", "--status", type=STATUS, default=None,
              help="Only this status: a code (-1, 0, 124, ...) or a name: failed, ready, running, initial, ok, "
                   "timeout, stalled, system_error, emit_failed, output_invalid.")
@click.option("--failed", is_flag=True, help="Only failed tasks (exit codes, timeouts, system errors); = -s failed.")
@click.option("-n", "--limit", type=ID, default=100, show_default=True,
              help="At most this many tasks.")
@JSON_OPTION
def task_list(app: int | None, module: str | None, status: int | str | None, failed: bool, limit: int,
              as_json: bool) -> None:
    """List tasks, oldest first.

    \b
    Examples:
      scalebox task list --failed          # what went wrong (then: scalebox task show ID)
      scalebox task list -m calc -s ready  # what calc has still to do
      scalebox task list -s 124 --json     # timed-out tasks, as JSON
    """
    from scalebox_hpc.db import apps
    from scalebox_hpc.models import TaskStatus

    failed = failed or status == StatusType.FAILED
    with _db() as conn:
        app_id = _app_id(conn, app)
        _check_module(conn, app_id, module)
        if failed:
            rows = apps.list_failed_tasks(conn, app_id, module=module, limit=limit + 1)
        else:
            code = status if isinstance(status, int) else None
            rows = apps.list_tasks(conn, app_id, module=module, status=code, limit=limit + 1)
    truncated = len(rows) > limit
    rows = rows[:limit]
    if as_json:
        _dump(rows)
        return
    if rows:
        click.echo(f"{'id':>7}  {'module':<14} {'status':<14} {'tries':>5}  body")
    for r in rows:
        body = _one_line(r["body"])
        body = body if len(body) <= 60 else body[:57] + "..."
        click.echo(f"{r['id']:>7}  {_one_line(r['module']):<14} {TaskStatus.describe(r['status']):<14} "
                   f"{r['attempts']:>5}  {body}")
    if truncated:
        click.echo(f"(the first {limit} shown; -n N shows more)", err=True)
    elif not rows:
        click.echo("no tasks" + (" failed" if failed else "") + " match", err=True)


@task.command("show")
@JSON_OPTION
@click.argument("task_id", type=ID)
def task_show(as_json: bool, task_id: int) -> None:
    """Show a task and its executions."""
    from scalebox_hpc.db import apps
    from scalebox_hpc.models import TaskStatus

    with _db() as conn:
        row = apps.get_task(conn, task_id)
        running = apps.running_task(conn, task_id) if row["status"] == TaskStatus.RUNNING else None
    if as_json:
        _dump(row)
        return
    # everything but the numbers is the task's (or another user's) text: shown without escapes
    click.echo(f"task {row['id']} ({row['module']}): {TaskStatus.describe(row['status'])}, "
               f"{row['attempts']} attempt(s)\nbody: {terminal_safe(row['body'])}\n"
               f"headers: {json.dumps(row['headers'])}")  # ASCII JSON: control characters as \u escapes
    if running is not None:
        from scalebox_hpc.cli.slots import elapsed

        where = _one_line(str(running["host"])) + (f" slot {running['seq']}" if running["seq"] is not None else "")
        ended = running["slot_status"] in ("ERROR", "EXITED", "LOST")  # back in the queue once its lease ends
        click.echo(f"running on {where} for {elapsed(running['seconds'])}"
                   + (f" (its slot is {running['slot_status']})" if ended else ""))
    for ex in row["execs"]:
        click.echo(f"- attempt {ex['attempt']} on {_one_line(str(ex['host']))}: status {ex['status']}, "
                   f"{(ex['finished_at'] - ex['started_at']).total_seconds():.3f}s")
        for name in ("stdout", "stderr", "user_text"):
            if ex[name]:
                click.echo(f"  {name}: " + terminal_safe(ex[name]).rstrip().replace("\n", "\n    "))


@task.command("retry")
@APP_OPTION
@click.option("--failed", is_flag=True, help="Every failed task of the app (exit codes, timeouts, errors).")
@click.option("-s", "--status", "status", type=STATUS, default=None,
              help="Every task of the app with this status: a code or a name (timeout, stalled, ...).")
@click.option("-m", "--module", default=None, help="With --failed/--status: only this module.")
@click.argument("task_ids", type=ID, nargs=-1)
def task_retry(app: int | None, failed: bool, status: int | str | None, module: str | None,
               task_ids: tuple[int, ...]) -> None:
    """Make finished tasks READY again: by id, or all --failed, or all with --status CODE.

    \b
    Examples:
      scalebox task retry 17 18
      scalebox task retry --failed -m calc
      scalebox task retry --status timeout
    """
    from scalebox_hpc.db import apps
    from scalebox_hpc.models import TaskStatus

    if status == StatusType.FAILED:
        failed, status = True, None
    if not task_ids and not failed and status is None:
        raise click.UsageError("give TASK_IDS, --failed or --status CODE")
    with _db() as conn:
        ids = list(task_ids)
        if failed or status is not None:
            app_id = _app_id(conn, app)
            _check_module(conn, app_id, module)
            code = status if isinstance(status, int) else None
            rows = apps.list_tasks(conn, app_id, module=module, status=code, limit=10_000_000)
            ids += [r["id"] for r in rows if not failed or TaskStatus.is_failure(r["status"])]
        done = apps.retry_tasks(conn, ids)
    click.echo(f"requeued {len(done)} task(s)")


# -- launcher / run / status ------------------------------------------------------------------
def _config(app_id: int, *, modules: tuple[str, ...] = (), slots: int | None = None, host: str | None = None,
            work_root: str | None = None, local: bool = False, local_scratch: str | None = None) -> Any:
    from scalebox_hpc.launcher.launcher import LauncherConfig, host_name

    name = host or host_name()
    scratch = local_scratch or os.environ.get("SCALEBOX_LOCAL_SCRATCH")
    return LauncherConfig(app_id=app_id, host=name, work_root=_work_root(work_root),
                          modules=modules, slots=slots, local=local,
                          local_scratch=Path(scratch.replace("${HOST}", name)).absolute() if scratch else None)


def _work_root(work_root: str | None) -> Path:
    """--work-root, else SCALEBOX_WORK_ROOT, else a per-user directory under the temp dir."""
    import tempfile

    default = Path(tempfile.gettempdir()) / f"scalebox-{os.getuid()}" / "work"
    return Path(work_root or os.environ.get("SCALEBOX_WORK_ROOT") or default).absolute()


@cli.command("launcher")
@APP_OPTION
@click.option("-m", "--module", "modules", multiple=True, help="Only these modules (repeatable).")
@click.option("--slots", type=click.IntRange(0, 4096), default=None,
              help="Slots per module here (default: from the pipeline).")
@click.option("--host", default=None, help="Host name (default: SLURMD_NODENAME, else the hostname).")
@click.option("--work-root", default=None, help="Root of the slots' work dirs (env SCALEBOX_WORK_ROOT).")
@click.option("--grace", type=float, default=30.0, show_default=True, help="Drain grace on SIGTERM.")
@click.option("--local-scratch", default=None,
              help="This node's local scratch root, '${HOST}' allowed (env SCALEBOX_LOCAL_SCRATCH): "
                   "indexed for location-aware dispatch.")
@click.option("--stage-job", is_flag=True,
              help="Run as one node of a Slurm stage job (what the job script's srun starts).")
@click.option("--mpi", "mpi_stage", is_flag=True,
              help="Run ONE module (-m) as an MPI stage: every rank of `srun --mpi=pmi2` runs this.")
@click.option("--ranks", type=int, default=None,
              help="With --mpi: the expected communicator size (default: SCALEBOX_MPI_RANKS / SLURM_NTASKS).")
def launcher_cmd(app: int | None, modules: tuple[str, ...], slots: int | None, host: str | None,
                 work_root: str | None, grace: float, local_scratch: str | None, stage_job: bool,
                 mpi_stage: bool, ranks: int | None) -> None:
    """Run this host's slots of an app until they go idle or a signal drains them."""
    from scalebox_hpc.node import configure_logging, resolve_dsn, run_launcher, run_stage_launcher

    # a no-op after -v; otherwise warnings (and, in a stage job's log, INFO) still show
    configure_logging(1 if stage_job else 0)
    if mpi_stage:
        from scalebox_hpc.launcher.mpi_stage import StageConfig
        from scalebox_hpc.node import run_mpi_stage

        if len(modules) != 1:
            raise click.UsageError("--mpi runs exactly one module: give -m MODULE")
        env_app = os.environ.get("SCALEBOX_APP_ID")
        config = StageConfig(module=modules[0], work_root=_config(0, work_root=work_root).work_root,
                             app_id=app if app is not None else (int(env_app) if env_app else None),
                             grace=grace, expected_ranks=ranks, stage_job=stage_job)
        sys.exit(run_mpi_stage(config))
    dsn = resolve_dsn(create_schema=False)
    with _db() as conn:
        app_id = _app_id(conn, app)
    config = _config(app_id, modules=modules, slots=slots, host=host, work_root=work_root,
                     local_scratch=local_scratch)
    if stage_job:
        sys.exit(run_stage_launcher(dsn, config))
    sys.exit(run_launcher(dsn, config, grace=grace))


@cli.command("run")
@click.option("-e", "--env-file", "env_files", multiple=True, help="Env file (NAME or NAME.env path).")
@APP_OPTION
@click.option("--work-root", default=None, help="Root of the slots' work dirs.")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.option("--grace", type=float, default=30.0, show_default=True,
              help="On Ctrl-C (or when the run cannot go on): seconds running tasks get to finish.")
@click.option("--quiet", is_flag=True, help="No progress bars or progress lines.")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@click.pass_context
def run_cmd(ctx: click.Context, env_files: tuple[str, ...], app: int | None, work_root: str | None,
            timeout: float | None, grace: float, quiet: bool, file: str | None) -> None:
    """Create the app from FILE (or take --app N) and run every module here until it is
    finished or idle.

    Exit code 0 when no task failed, 1 otherwise (or when work was left undone). It ends, with
    the reason, when a module's READY tasks can no longer be taken (all its slots failed).
    Progress bars on a terminal; elsewhere a progress line every few seconds.

    \b
    Examples:
      scalebox run examples/app-primes/app.yaml
      scalebox run -e containers examples/app-copy/app.yaml
      scalebox run --app 3          # continue app 3 here (after fixing what stopped it)
    """
    from scalebox_hpc.db import apps
    from scalebox_hpc.db.connection import connect, translate_errors
    from scalebox_hpc.node import resolve_dsn, run_launcher

    if (file is None) == (app is None):
        raise click.UsageError("give a pipeline FILE to create an app, or --app N to continue one")
    spec = _load(file, env_files) if file is not None else None
    dsn = resolve_dsn(create_schema=True)
    with connect(dsn) as conn, translate_errors(dsn):
        if spec is not None:
            app_id = apps.create_app(conn, spec)
            click.echo(f"app {app_id} ({spec.name}) created", err=True)
        else:
            app_id = _app_id(conn, app)
            with conn.transaction():
                row = apps.get_app(conn, app_id)
            if row["status"] == "FINISHED":
                click.echo(f"app {app_id} ({_one_line(row['name'])}) is FINISHED: nothing to run", err=True)
                sys.exit(0)
            click.echo(f"app {app_id} ({_one_line(row['name'])}) continued here", err=True)
        watcher = _RunWatcher(conn, app_id, timeout, quiet, grace)
        with watcher:
            watcher.configure_logging(int(ctx.obj.get("verbose", 0)) if ctx.obj else 0)
            run_launcher(dsn, _config(app_id, work_root=work_root, local=True), grace=grace,
                         on_tick=watcher.tick, on_drain=watcher.draining)
        final = watcher.summary()
    sys.exit(final)


PROGRESS_SECONDS = 5.0
"""Off a terminal, ``scalebox run`` prints a progress line this often (when something changed)."""
UNSTARTED_GRACE_SECONDS = 5.0
"""After this long, a module with READY tasks and no slot at all in ``scalebox run`` is stuck."""
FAILURES_SHOWN = 5
"""Failed tasks listed in a failure summary."""


class _RunWatcher:
    """Progress for ``scalebox run``, and the decision that the app is done (or cannot go on)."""

    def __init__(self, conn: Connection, app_id: int, timeout: float | None, quiet: bool, grace: float) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.conn, self.app_id, self.grace, self.quiet = conn, app_id, grace, quiet
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.quiet_ticks = 0
        self.timed_out = False
        self.ending = False  # the watcher itself ended the run (not a signal)
        self.interrupted = False
        self.stuck: list[Any] = []
        self.console = Console(stderr=True)
        self.tty = self.console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description:<14}", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}", markup=False), TimeElapsedColumn(), console=self.console,
            disable=quiet or not self.tty,
        )
        self.bars: dict[str, Any] = {}
        self.next_line = time.monotonic() + PROGRESS_SECONDS
        self.last_line = ""
        self.started = time.monotonic()

    def __enter__(self) -> _RunWatcher:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.tick()
        finally:
            self.progress.stop()

    def configure_logging(self, verbose: int) -> None:
        """The launcher's log (slot errors first of all) on stderr, as ``scalebox launcher``
        shows it; on a terminal printed above the progress bars instead of through them."""
        import logging

        from scalebox_hpc.node import configure_logging

        if not self.tty:
            configure_logging(verbose)
            return
        console = self.console  # the progress bars' console: printing through it keeps the bars below

        class _AboveBars(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                from rich.text import Text

                try:
                    console.print(Text(terminal_safe(self.format(record)), style="red"
                                       if record.levelno >= logging.ERROR else ""))
                except Exception:  # a log line must never break the run
                    self.handleError(record)

        handler = _AboveBars()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), handlers=[handler], force=True)

    def _counts(self) -> list[ModuleCounts]:
        from scalebox_hpc.db import apps

        with self.conn.transaction():
            return apps.module_counts(self.conn, self.app_id)

    def _slots(self) -> list[dict[str, Any]]:
        from scalebox_hpc.db import apps

        with self.conn.transaction():
            return apps.list_slots(self.conn, self.app_id)

    def tick(self) -> bool:
        """Update the progress; True when the run should end."""
        self.ending = self.ending or self._tick()
        return self.ending

    def _tick(self) -> bool:
        from scalebox_hpc.db import apps

        counts = self._counts()
        for mc in counts:
            if mc.name not in self.bars:
                self.bars[mc.name] = self.progress.add_task(_one_line(mc.name), total=0, extra="")
            extra = f"running {mc.count(-3)}" + (f", failed {mc.failed}" if mc.failed else "")
            self.progress.update(self.bars[mc.name], total=mc.total, completed=mc.done, extra=extra)
        self._progress_line(counts)
        if self.interrupted:  # draining on a signal: the slots end because we asked them to
            return True
        if self._status() == "FINISHED":
            return True
        # a module this run started no slot for (an MPI collective one) strands its tasks too,
        # once the slots had time to register
        started = time.monotonic() - self.started > UNSTARTED_GRACE_SECONDS
        stuck = apps.stuck_modules(counts, self._slots(), without_slots=started)
        if apps.all_work_stuck(counts, stuck):
            self.stuck = stuck
            return True
        pending = sum(mc.count(-1) + mc.count(-3) for mc in counts)
        self.quiet_ticks = self.quiet_ticks + 1 if pending == 0 else 0
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
            return True
        return self.quiet_ticks >= 3

    def _progress_line(self, counts: list[ModuleCounts]) -> None:
        """Off a terminal (a batch log): one line every PROGRESS_SECONDS, when something changed."""
        if self.quiet or self.tty or time.monotonic() < self.next_line:
            return
        self.next_line = time.monotonic() + PROGRESS_SECONDS
        line = ", ".join(f"{_one_line(mc.name)} {mc.done}/{mc.total}" + (f" ({mc.count(-3)} running)"
                         if mc.count(-3) else "") + (f" {mc.failed} failed" if mc.failed else "") for mc in counts)
        if line != self.last_line:
            self.last_line = line
            click.echo(f"[{time.monotonic() - self.started:6.0f}s] {line}", err=True)

    def draining(self) -> None:
        """Called once when the run drains: on a signal (Ctrl-C), say so and for how long."""
        if self.ending:
            return
        self.interrupted = True
        running = sum(mc.count(-3) for mc in self._counts())
        click.echo(f"scalebox: stopping: no new tasks; {running} running task(s) get up to {self.grace:g} s "
                   "to finish, then are stopped and put back READY", err=True)

    def _status(self) -> str:
        with self.conn.transaction():
            row = self.conn.execute("SELECT status FROM sbx_apps WHERE id = %s", (self.app_id,)).fetchone()
        return str(row["status"]) if row else "?"

    def summary(self) -> int:
        """Print the outcome; the exit code of ``scalebox run``."""
        from scalebox_hpc.db import apps

        with self.conn.transaction():
            row = apps.get_app(self.conn, self.app_id)
        counts = self._counts()
        slots = self._slots()
        failed = sum(mc.failed for mc in counts)
        pending = sum(mc.count(-1) + mc.count(-3) for mc in counts)
        for mc in counts:
            click.echo(f"{_one_line(mc.name)}: {mc.done}/{mc.total} done, {mc.failed} failed", err=True)
        if failed:
            _print_failures(self.conn, self.app_id, failed)
        sys.stderr.flush()
        if row["result"]:
            click.echo(terminal_safe(row["result"]))
            sys.stdout.flush()
        again = f"scalebox run --app {self.app_id}"
        stuck = self.stuck or (apps.stuck_modules(counts, slots) if pending and not self.interrupted else [])
        if stuck:
            for s in stuck:
                stage = f"srun --mpi=pmi2 ... scalebox launcher --mpi -m {s.module} --app {self.app_id}"
                todo = f"fix it, then `{again}`" if s.slots else f"start it with `{stage}`"
                click.echo(f"scalebox: {_squeezed(s.describe())}; {_one_line(todo)}", err=True)
        elif self.timed_out:
            click.echo(f"scalebox: gave up after the timeout; {pending} task(s) unfinished; "
                       f"continue with `{again}`", err=True)
        elif pending and self.interrupted:
            click.echo(f"scalebox: stopped; {pending} task(s) left unfinished; continue with `{again}` "
                       f"(or `scalebox launcher --app {self.app_id}`)", err=True)
        elif pending:
            click.echo(f"scalebox: {pending} task(s) left unfinished; continue with `{again}` "
                       f"(`scalebox slot list --app {self.app_id}` shows the slots)", err=True)
        elif row["status"] != "FINISHED" and not failed and not row["result"]:
            click.echo(f"scalebox: app {self.app_id} ended idle without a result "
                       "(no task called `scalebox app set-finished`)", err=True)
        return 1 if failed or pending or self.timed_out or stuck else 0


def _print_failures(conn: Connection, app_id: int, failed: int, *, err: bool = True) -> None:
    """Up to FAILURES_SHOWN failed tasks as ``id module status body → last stderr line``, and
    the commands to dig further."""
    from scalebox_hpc.db import apps
    from scalebox_hpc.models import TaskStatus

    with conn.transaction():
        rows = apps.failed_tasks(conn, app_id, FAILURES_SHOWN)
    click.echo(f"failed tasks ({failed}" + (f", the first {len(rows)}" if failed > len(rows) else "") + "):", err=err)
    for r in rows:
        body = _one_line(r["body"])
        body = body if len(body) <= 40 else body[:37] + "..."
        why = apps.last_line(r["stderr"]) or apps.last_line(r["stdout"]) or "(no output)"
        why = _one_line(why)
        why = why if len(why) <= 100 else why[:97] + "..."
        click.echo(f"  {r['id']:>6} {_one_line(r['module'])} {TaskStatus.describe(r['status'])} {body} → {why}",
                   err=err)
    first = rows[0]["id"] if rows else "ID"
    click.echo(f"  more: `scalebox task show {first}`, `scalebox task list --failed --app {app_id}`, "
               f"`scalebox task retry --failed --app {app_id}`", err=err)


def _status_rows(conn: Connection, app_id: int, slots: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    from scalebox_hpc.db import apps

    with conn.transaction():
        counts = apps.module_counts(conn, app_id)
    return [{
        "module": mc.name, "total": mc.total, "ready": mc.count(-1), "running": mc.count(-3),
        "initial": mc.count(-9), "ok": mc.count(0), "failed": mc.failed,
        "per_minute": mc.last_minute,
        "slots": sum(1 for s in slots or [] if s["module"] == mc.name and s["live"]),
        "by_status": {str(k): v for k, v in sorted(mc.by_status.items())},
    } for mc in counts]


def _app_state(conn: Connection, app_id: int) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """The app row, its honest state (:func:`apps.app_state`) and its slots."""
    from scalebox_hpc.db import apps

    with conn.transaction():
        row = apps.get_app(conn, app_id)
        counts = apps.module_counts(conn, app_id)
        slots = apps.list_slots(conn, app_id)
    return row, apps.app_state(row["status"], counts, slots), slots


def _state_line(row: dict[str, Any], state: str, rows: list[dict[str, Any]]) -> str:
    """``IDLE: nothing READY or RUNNING, no live slot; 10 ok, 2 failed`` and the like."""
    ok = sum(r["ok"] for r in rows)
    failed = sum(r["failed"] for r in rows)
    ready = sum(r["ready"] for r in rows)
    tally = f"{ok} ok, {failed} failed"
    if state == "IDLE":
        return f"IDLE: nothing READY or RUNNING and no live slot; {tally}"
    if state == "WAITING":
        return (f"WAITING: {ready} task(s) READY but no live slot — start one with "
                f"`scalebox run --app {row['id']}` or `scalebox launcher --app {row['id']}`; {tally}")
    return f"{state}: {tally}"


@cli.command("status")
@click.argument("app_id", type=ID, required=False)
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C, or until the app is FINISHED or IDLE.")
@JSON_OPTION
def status_cmd(app_id: int | None, watch: bool, as_json: bool) -> None:
    """Per-module task counts by status, live slots, rates, each stage's Slurm jobs (scaled
    first), the app's state and its failed tasks.

    The state is the app's status, except that a RUNNING app with nothing READY or RUNNING and
    no live slot is IDLE, and one with READY tasks but no live slot is WAITING.

    \b
    Examples:
      scalebox status               # the newest app
      scalebox status 3 --watch     # refresh until app 3 is FINISHED or IDLE
      scalebox status --json
    """
    from scalebox_hpc.db import apps

    with _db() as conn:
        app_id = _app_id(conn, app_id)
        while True:
            jobs = _stage_jobs(conn, app_id)
            row, state, slots = _app_state(conn, app_id)
            rows = _status_rows(conn, app_id, slots)
            for r in rows:
                r["jobs"] = [f"{j['slurm_job_id']}:{j['state']}" for j in jobs if j["module"] == r["module"]]
                _pending_reasons(r, jobs)
            calls = _slurm_calls(conn, app_id)
            failed = sum(r["failed"] for r in rows)
            if as_json:
                with conn.transaction():
                    failures = apps.failed_tasks(conn, app_id, FAILURES_SHOWN) if failed else []
                _dump({"app": {**{k: row[k] for k in ("id", "name", "status", "result")}, "state": state},
                       "modules": rows,
                       "failures": [{**{k: f[k] for k in ("id", "module", "body", "status", "attempts")},
                                     "last_line": apps.last_line(f["stderr"]) or apps.last_line(f["stdout"])}
                                    for f in failures],
                       **({"slurm_calls_last_minute": calls} if calls is not None else {})})
            else:
                _print_status(row, rows, clear=watch, state=state)
                click.echo(_one_line(_state_line(row, state, rows)))
                with conn.transaction():
                    counts = apps.module_counts(conn, app_id)
                for stuck in apps.stuck_modules(counts, slots):
                    click.echo(f"  {_squeezed(stuck.describe())} (`scalebox slot list --app {app_id}`)")
                if failed:
                    _print_failures(conn, app_id, failed, err=False)
                if calls is not None:
                    click.echo(f"slurm: {calls} calls in the last minute")
            if not watch or state in ("FINISHED", "IDLE"):
                return
            time.sleep(1.0)


def _stage_jobs(conn: Connection, app_id: int) -> list[dict[str, Any]]:
    """The app's live stage jobs, after an autoscale pass (none, quietly, for apps never submitted)."""
    from scalebox_hpc.cli.stage import stage_rows

    if not stage_rows(conn, app_id, include_ended=True):
        return []
    from scalebox_hpc.node import resolve_dsn, stage_autoscaler

    try:
        stage_autoscaler(resolve_dsn(create_schema=False), _work_root(None))(app_id)
    except ScaleboxError as exc:
        click.echo(f"scalebox: warning: stage jobs not refreshed: {exc}", err=True)
    return stage_rows(conn, app_id, include_ended=False)


def _pending_reasons(row: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
    """Slurm's reason for each PENDING job of the row's module (Resources, QOSMaxJobsPerUserLimit...)."""
    reasons = {j["slurm_job_id"]: j["reason"] for j in jobs
               if j["module"] == row["module"] and j["state"] == "PENDING" and j["reason"]}
    if reasons:
        row["pending_reasons"] = reasons


def _slurm_calls(conn: Connection, app_id: int) -> int | None:
    from scalebox_hpc.cli.stage import slurm_calls

    return slurm_calls(conn, app_id)


def _print_status(app_row: dict[str, Any], rows: list[dict[str, Any]], *, clear: bool,
                  state: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text, not markup: a task's result such as "[/] done" is shown as written, never parsed
    title = f"app {app_row['id']} {app_row['name']}: {state or app_row['status']} {app_row['result'] or ''}"
    table = Table(title=Text(_one_line(title)))
    columns: tuple[str, ...] = ("module", "total", "ready", "running", "ok", "failed", "per_minute")
    if rows and "slots" in rows[0]:  # live slots per module
        columns = (*columns[:-1], "slots", columns[-1])
    for col in columns:
        table.add_column(col, justify="left" if col == "module" else "right")
    with_jobs = any(r.get("jobs") for r in rows)
    if with_jobs:
        table.add_column("slurm jobs")
    for r in rows:
        reasons = r.get("pending_reasons", {})
        jobs = [f"{j}({reasons[j.split(':')[0]]})" if j.split(":")[0] in reasons else j for j in r.get("jobs", [])]
        cells = [str(r.get(c, "")) for c in columns] + ([" ".join(jobs)] if with_jobs else [])
        table.add_row(*(Text(_one_line(cell)) for cell in cells))
    console = Console()
    if clear:
        console.clear()
    console.print(table)


# the Slurm commands (submit, stage, autoscale) live in their own module and register on `cli`
from scalebox_hpc.cli import slots as _slots  # noqa: E402, F401
from scalebox_hpc.cli import stage as _stage  # noqa: E402, F401


# -- entry point ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """Entry point: errors become one line with a hint (traceback with --traceback)."""
    traceback = "--traceback" in (argv or sys.argv) or os.environ.get("SCALEBOX_TRACEBACK", "").lower() in (
        "1", "true", "yes", "on")
    try:
        cli.main(args=argv, prog_name="scalebox", standalone_mode=False)
    except ScaleboxError as exc:
        _fail(exc, traceback, 1, getattr(exc, "hint", ""))
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def _fail(exc: BaseException, traceback: bool, code: int, hint: str) -> None:
    if traceback:
        import traceback as tb

        tb.print_exception(exc)
    click.echo(f"scalebox: error: {exc}" + (f" (hint: {hint})" if hint else ""), err=True)
    sys.exit(code)


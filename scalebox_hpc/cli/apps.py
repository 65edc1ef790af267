"""``scalebox app``: create, list, show, finish, pause, resume and cancel apps."""

from __future__ import annotations

import dataclasses
import os

import click

from scalebox_hpc.cli.common import (
    APP_OPTION,
    EMIT_BUFFER_ENV,
    ID,
    JSON_OPTION,
    NO_APPS,
    _app_id,
    _buffer,
    _db,
    _dump,
    _load,
    _one_line,
    app_or_id,
    terminal_safe,
)
from scalebox_hpc.cli.status import _app_state, _print_failures, _print_why, _state_line, _status_rows


@click.group()
def app() -> None:
    """Create and steer apps (pipelines)."""


@app.command("create")
@click.option("-e", "--env-file", "env_files", multiple=True, help="Env file (NAME or NAME.env path).")
@click.option("--check", is_flag=True, help="Validate only; create nothing.")
@JSON_OPTION
@click.argument("file", type=click.Path(dir_okay=False))
def app_create(env_files: tuple[str, ...], check: bool, as_json: bool, file: str) -> None:
    """Create an app from a pipeline file (one transaction: a bad file creates nothing).

    \b
    Examples:
      scalebox app create examples/app-primes/app.yaml
      scalebox app create --check app.yaml   # validate only
      scalebox app create -e containers app.yaml
    """
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
    """List apps.

    \b
    Examples:
      scalebox app list
      scalebox app list --json
    """
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
@APP_OPTION
@JSON_OPTION
@click.argument("app_id", type=ID, required=False)
def app_show(app: int | None, as_json: bool, app_id: int | None) -> None:
    """Show one app (default: the newest): its status, its state (IDLE: nothing READY or
    RUNNING and no live slot; WAITING: READY tasks but no live slot), why tasks wait (as in
    `scalebox status`), the resources per module (CPU core-hours the tasks used, the core-hours
    its stage jobs were allocated, the efficiency, the largest peak RSS) and its failed tasks.

    \b
    Examples:
      scalebox app show
      scalebox app show --app 3 --json
    """
    from scalebox_hpc.cli.usage import usage_lines
    from scalebox_hpc.db.usage import app_usage

    with _db() as conn:
        app_id = _app_id(conn, app_or_id(app, app_id))
        row, state, slots = _app_state(conn, app_id)
        rows = _status_rows(conn, app_id, slots)
        usage = app_usage(conn, app_id)
        if as_json:
            _dump({**row, "state": state, "why": {r["module"]: r["why"] for r in rows if r["why"]},
                   "usage": [dataclasses.asdict(u) for u in usage]})
            return
        for key in ("id", "name", "label", "status", "result", "created_at", "finished_at"):
            click.echo(f"{key}: {terminal_safe(str(row[key])) if row[key] is not None else ''}")
        click.echo(f"state: {_one_line(_state_line(row, state, rows))}")
        _print_why(rows, app_id)
        table = usage_lines(usage)
        if table:
            click.echo("resources:")
            for line in table:
                click.echo(line)
        failed = sum(r["failed"] for r in rows)
        if failed:
            _print_failures(conn, app_id, failed, err=False)


@app.command("set-finished")
@APP_OPTION
@click.option("--job-id", default=None, help="Accepted for Scalebox compatibility; ignored.")
@click.argument("text")
def app_set_finished(app: int | None, job_id: str | None, text: str) -> None:
    """Set the app's result and FINISHED. Inside run.sh it is committed with the task's result.

    \b
    Examples:
      scalebox app set-finished 'Result is 1229'   # inside run.sh: with the task
      scalebox app set-finished --app 3 done
    """
    if os.environ.get(EMIT_BUFFER_ENV):
        _buffer({"kind": "finish", "text": text})
        return
    from scalebox_hpc.cli import relay
    from scalebox_hpc.db import apps

    with _db() as conn:
        app_id = _app_id(conn, app)
        apps.finish_app(conn, app_id, text)
    relay.relay_now(app_id)  # the finish records for the app's parts in other databases, if any


def _set_status(app_id: int | None, status: str) -> None:
    from scalebox_hpc.db import apps
    from scalebox_hpc.models import AppStatus

    with _db() as conn:
        apps.set_status(conn, _app_id(conn, app_id), AppStatus(status))


@app.command("pause")
@APP_OPTION
@click.argument("app_id", type=ID, required=False)
def app_pause(app: int | None, app_id: int | None) -> None:
    """Stop claiming new tasks (running ones finish).

    \b
    Examples:
      scalebox app pause --app 3
      scalebox app resume --app 3
    """
    _set_status(app_or_id(app, app_id), "PAUSED")


@app.command("resume")
@APP_OPTION
@click.argument("app_id", type=ID, required=False)
def app_resume(app: int | None, app_id: int | None) -> None:
    """Claim again (also starts an app created with initial_status INITIAL).

    \b
    Examples:
      scalebox app resume            # the newest app
      scalebox app resume --app 3
    """
    _set_status(app_or_id(app, app_id), "RUNNING")


@app.command("cancel")
@APP_OPTION
@click.argument("app_id", type=ID, required=False)
def app_cancel(app: int | None, app_id: int | None) -> None:
    """Finish the app now with the result `cancelled`: nothing more is claimed, and launchers
    kill the running tasks (within half a heartbeat) and give them back.

    \b
    Examples:
      scalebox app cancel --app 3
    """
    from scalebox_hpc.db import apps

    with _db() as conn:
        apps.cancel_app(conn, _app_id(conn, app_or_id(app, app_id)))


@app.command("get-next-id")
@JSON_OPTION
def app_get_next_id(as_json: bool) -> None:
    """Print the id the next app created in this database will get (Scalebox's get-next-id).

    A peek that takes nothing: an app another user creates before yours takes that id (and a
    failed create uses one up). For the two files of a cross-cluster app, create right after
    peeking and compare: `app create` prints the id it got; if it differs, fix APP_ID in the
    other file before creating that one (a delivery to a wrong app id waits in the outbox,
    shown by `scalebox status`).

    \b
    Examples:
      APP1=$(scalebox app get-next-id)      # on cluster 1
      APP2=$(SCALEBOX_DSN=$DB2 scalebox app get-next-id)
    """
    from scalebox_hpc.db.sql import query

    with _db(create_schema=True) as conn:
        row = conn.execute(query("next_app_id")).fetchone()
    next_id = int(row["next_id"]) if row else 1
    if as_json:
        _dump({"next_id": next_id})
    else:
        click.echo(next_id)

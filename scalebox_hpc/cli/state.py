"""``scalebox semaphore`` and ``scalebox variable``: an app's shared counters and values."""

from __future__ import annotations

import os
from typing import Any

import click

from scalebox_hpc.cli.common import (
    APP_OPTION,
    EMIT_BUFFER_ENV,
    INT32,
    JSON_OPTION,
    _app_id,
    _db,
    _dump,
    _one_line,
    in_task_via_dir,
)


def _in_task(op: str, app: int | None, name: str = "", value: int | str | None = None) -> tuple[bool, Any]:
    """Inside a running task (no database credentials there): (True, the value) from the
    launcher's task services; else (False, None) and the caller uses the database."""
    if not os.environ.get(EMIT_BUFFER_ENV):
        return False, None
    from scalebox_hpc import taskapi

    path = os.environ.get(taskapi.SERVICES_ENV)
    if not path and os.environ.get(taskapi.SERVICES_DIR_ENV):  # an MPI farm's worker rank: rank 0 serves
        return True, in_task_via_dir(op, app, name, value)
    if not path:
        raise taskapi.ServiceError("semaphores and variables are not available to this task (no launcher "
                                   "task services: an MPI collective stage or a container)")
    own = os.environ.get("APP_ID", "")
    if app is not None and str(app) != own:
        raise taskapi.ServiceError(f"a task may only use its own app's semaphores and variables (app {own})")
    task_id = int(os.environ.get("TASK_ID") or 0)
    request = taskapi.Request(op, task_id, name, value)  # type: ignore[arg-type]
    return True, taskapi.call(path, request)


def _answered(op: str, app: int | None, name: str = "", value: int | str | None = None,
              show: Any = click.echo) -> bool:
    """Inside a running task: ask the launcher, ``show`` its answer, True; else False."""
    done, got = _in_task(op, app, name, value)
    if done:
        show(got)
    return done


def _print_mapping(values: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _dump(values)
        return
    for name, value in values.items():  # values may come from run.sh (`variable set`)
        click.echo(f"{_one_line(str(name))}\t{_one_line(str(value))}")


@click.group()
def semaphore() -> None:
    """Counters shared by every slot of an app (atomic in PostgreSQL); usable from run.sh.

    A module with ``arguments: {semaphore: NAME}`` claims only while NAME is positive, and each
    claim takes one unit; scripts give units back with ``scalebox semaphore increment NAME``."""


@semaphore.command("create")
@APP_OPTION
@click.argument("name")
@click.argument("value", type=INT32, default=0)
def semaphore_create(app: int | None, name: str, value: int) -> None:
    """Create (or reset) NAME with VALUE.

    \b
    Examples:
      scalebox semaphore create tokens 4
    """
    from scalebox_hpc.db import apps

    if _answered("semaphore.create", app, name, value):
        return
    with _db() as conn:
        click.echo(apps.semaphore_create(conn, _app_id(conn, app), name, value))


@semaphore.command("get")
@APP_OPTION
@click.argument("name")
def semaphore_get(app: int | None, name: str) -> None:
    """Print NAME's value.

    \b
    Examples:
      scalebox semaphore get tokens
    """
    from scalebox_hpc.db import apps

    if _answered("semaphore.get", app, name):
        return
    with _db() as conn:
        click.echo(apps.semaphore_get(conn, _app_id(conn, app), name))


@semaphore.command("increment")
@APP_OPTION
@click.argument("name")
@click.argument("delta", type=INT32, default=1)
def semaphore_increment(app: int | None, name: str, delta: int) -> None:
    """Add DELTA (default 1); prints the new value.

    \b
    Examples:
      scalebox semaphore increment tokens
      scalebox semaphore increment --app 3 tokens 10
    """
    from scalebox_hpc.db import apps

    if _answered("semaphore.add", app, name, delta):
        return
    with _db() as conn:
        click.echo(apps.semaphore_add(conn, _app_id(conn, app), name, delta))


@semaphore.command("decrement")
@APP_OPTION
@click.argument("name")
@click.argument("delta", type=INT32, default=1)
def semaphore_decrement(app: int | None, name: str, delta: int) -> None:
    """Subtract DELTA (default 1); prints the new value.

    \b
    Examples:
      scalebox semaphore decrement tokens
    """
    from scalebox_hpc.db import apps

    if _answered("semaphore.add", app, name, -delta):
        return
    with _db() as conn:
        click.echo(apps.semaphore_add(conn, _app_id(conn, app), name, -delta))


@semaphore.command("list")
@APP_OPTION
@JSON_OPTION
def semaphore_list(app: int | None, as_json: bool) -> None:
    """Every semaphore of the app.

    \b
    Examples:
      scalebox semaphore list --json
    """
    from scalebox_hpc.db import apps

    if _answered("semaphore.list", app, show=lambda got: _print_mapping(got, as_json)):
        return
    with _db() as conn:
        _print_mapping(apps.semaphore_list(conn, _app_id(conn, app)), as_json)


@click.group()
def variable() -> None:
    """Named text values shared by an app's scripts."""


@variable.command("set")
@APP_OPTION
@click.argument("name")
@click.argument("value")
def variable_set(app: int | None, name: str, value: str) -> None:
    """Set NAME to VALUE.

    \b
    Examples:
      scalebox variable set threshold 0.5
    """
    from scalebox_hpc.db import apps
    from scalebox_hpc.taskapi import check_variable_name

    check_variable_name(name)  # `_stage.*` decide what stage jobs run: nobody sets them by hand (F6)
    if _in_task("variable.set", app, name, value)[0]:
        return
    with _db() as conn:
        apps.variable_set(conn, _app_id(conn, app), name, value)


@variable.command("get")
@APP_OPTION
@click.argument("name")
def variable_get(app: int | None, name: str) -> None:
    """Print NAME's value.

    \b
    Examples:
      scalebox variable get threshold
    """
    from scalebox_hpc.db import apps

    if _answered("variable.get", app, name):
        return
    with _db() as conn:
        click.echo(apps.variable_get(conn, _app_id(conn, app), name))


@variable.command("list")
@APP_OPTION
@JSON_OPTION
def variable_list(app: int | None, as_json: bool) -> None:
    """Every variable of the app.

    \b
    Examples:
      scalebox variable list
    """
    from scalebox_hpc.db import apps

    if _answered("variable.list", app, show=lambda got: _print_mapping(got, as_json)):
        return
    with _db() as conn:
        _print_mapping(apps.variable_list(conn, _app_id(conn, app)), as_json)

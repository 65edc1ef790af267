"""``scalebox db``: create, upgrade, inspect and stop the database."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    pass

from scalebox_hpc.cli.common import JSON_OPTION, _dump, settings


@click.group()
def db() -> None:
    """Create, upgrade, inspect or stop the database."""


@db.command("init")
def db_init() -> None:
    """Create the schema (starts the embedded server when no DSN is configured).

    \b
    Examples:
      scalebox db init
      SCALEBOX_DSN=postgresql://me@dbhost/sbx scalebox db init
    """
    from scalebox_hpc.db import schema
    from scalebox_hpc.db.connection import connect, redact, translate_errors

    dsn = _dsn_without_schema()
    with connect(dsn) as conn, translate_errors(dsn):
        created = schema.init(conn)
    click.echo(f"{'created' if created else 'already initialised'}: {redact(dsn)}")


def _dsn_without_schema() -> str:
    from scalebox_hpc import embedded
    from scalebox_hpc.db.connection import configured_dsn

    dsn = configured_dsn(settings().environ)
    return embedded.ensure_running() if dsn is None else dsn


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations.

    \b
    Examples:
      scalebox db upgrade
    """
    from scalebox_hpc.db import schema
    from scalebox_hpc.db.connection import connect, translate_errors

    dsn = _dsn_without_schema()
    with connect(dsn) as conn, translate_errors(dsn):
        applied = schema.upgrade(conn)
    click.echo("applied: " + ", ".join(applied) if applied else "up to date")


@db.command("grant")
@click.argument("role")
@click.option("--viewer", is_flag=True, help="Read every app (site monitoring) instead of acting on one's own.")
@click.option("--launcher", is_flag=True,
              help="Make (or bind) the login role that launches ROLE's apps: queue functions only, no table access.")
@click.option("--launcher-role", default=None, metavar="NAME",
              help="With --launcher: the launcher role's name (default ROLE_launcher).")
def db_grant(role: str, viewer: bool, launcher: bool, launcher_role: str | None) -> None:
    """Let the database ROLE use scalebox: create, see and change its own apps only (row-level
    security on the apps' owner), or with --viewer read every app. With --launcher, make the
    login role ROLE_launcher (NOLOGIN group role sbx_launcher, bound to ROLE): it may only run
    the queue functions for ROLE's apps (claim, heartbeat, hand-off, scratch index, the task
    services), no table access, so a stage job holding its password can do nothing else. Set
    its password yourself and give ROLE a ~/.pgpass line for it. Run as the database admin.

    \b
    Examples:
      scalebox db grant alice
      scalebox db grant monitoring --viewer
      scalebox db grant alice --launcher     # alice_launcher; then in psql: \\password alice_launcher
    """
    from scalebox_hpc.db import schema
    from scalebox_hpc.db.connection import connect, translate_errors
    from scalebox_hpc.db.sql import query
    from scalebox_hpc.errors import SchemaError

    if viewer and launcher:
        raise click.UsageError("--viewer and --launcher grant different things: give one")
    if launcher_role is not None and not launcher:
        raise click.UsageError("--launcher-role goes with --launcher")
    dsn = _dsn_without_schema()
    with connect(dsn) as conn, translate_errors(dsn):
        schema.ensure(conn, create=False)
        if not launcher:
            schema.grant(conn, role, viewer=viewer)
            click.echo(f"{role}: {'reads every app (sbx_viewer)' if viewer else 'uses its own apps (sbx_user)'}")
            return
        name = launcher_role or f"{role}_launcher"
        with conn.transaction():
            row = conn.execute(query("grant_launcher"), {"owner": role, "role": name}).fetchone()
        if row and row["missing"]:
            raise SchemaError(str(row["missing"]), hint="run `scalebox db grant` as the database admin (CREATEROLE)")
    click.echo(f"{name}: launches the apps of {role} (sbx_launcher: queue functions only); set its password "
               f"(psql: \\password {name}) and add a ~/.pgpass line for it, then run launchers and stage jobs with "
               f"SCALEBOX_DSN naming user {name}")


@db.command("status")
@JSON_OPTION
def db_status(as_json: bool) -> None:
    """Where the database is and which schema version it has.

    \b
    Examples:
      scalebox db status
      scalebox db status --json
    """
    from scalebox_hpc import embedded
    from scalebox_hpc.db import schema, sql
    from scalebox_hpc.db.connection import configured_dsn, connect, redact, translate_errors

    dsn = configured_dsn(settings().environ)
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
    """Stop the embedded PostgreSQL (a configured server is left alone).

    \b
    Examples:
      scalebox db stop            # the embedded server only
    """
    from scalebox_hpc import embedded

    click.echo("stopped" if embedded.stop() else "the embedded PostgreSQL was not running")

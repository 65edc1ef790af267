"""``scalebox db``: create, upgrade, inspect and stop the database."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from scalebox_hpc.cli.common import JSON_OPTION, _dump, settings

if TYPE_CHECKING:
    from scalebox_hpc.settings import Settings


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
    with connect(dsn, pooler=settings().db_pooler) as conn, translate_errors(dsn):
        created = schema.init(conn)
    click.echo(f"{'created' if created else 'already initialised'}: {redact(dsn)}")


def _dsn_without_schema() -> str:
    from scalebox_hpc import embedded
    from scalebox_hpc.db.connection import configured_dsn

    site = settings()
    dsn = configured_dsn(site)
    return embedded.ensure_running(embedded.data_home(site)) if dsn is None else dsn


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
    with connect(dsn, pooler=settings().db_pooler) as conn, translate_errors(dsn):
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
    with connect(dsn, pooler=settings().db_pooler) as conn, translate_errors(dsn):
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
    """Where the database is and which schema version it has; for a served database (`db
    serve`) also its host, port, job id, generation and since when it is up.

    \b
    Examples:
      scalebox db status
      scalebox db status --json
    """
    info = _db_info(settings())
    if as_json:
        _dump(info)
        return
    for key, value in info.items():
        if key == "served":
            where = f"{value['host']}:{value['port']}" + (f" (job {value['job_id']}, node {value['node']})"
                                                          if value["job_id"] else "")
            click.echo(f"served: {value['state']} at {where}, generation {value['generation']}, "
                       f"up since {value['up_since'] or '-'}")
            continue
        click.echo(f"{key}: {value}")


def _db_info(site: Settings) -> dict[str, Any]:
    """What ``db status`` shows: the kind of database, its DSN (redacted), the schema versions,
    the served database's service file."""
    from scalebox_hpc import embedded, servicefile
    from scalebox_hpc.db import sql
    from scalebox_hpc.db.connection import configured_dsn, redact

    dsn = configured_dsn(site)
    served = servicefile.load(servicefile.service_dir(site) / servicefile.SERVICE_FILE)
    kind = "configured"
    if dsn is None:
        kind, dsn = "embedded", embedded.running_dsn(embedded.data_home(site))
    elif served is not None and served.state != "stopped" and dsn == servicefile.dsn(served):
        kind = "served"
    info: dict[str, Any] = {"kind": kind, "running": dsn is not None, "expected_version": sql.schema_version()}
    if served is not None:
        info["served"] = {k: getattr(served, k) for k in (
            "state", "host", "port", "database", "user", "job_id", "node", "generation", "up_since", "data")}
    if dsn is not None:
        info["dsn"] = redact(dsn)
        info.update(_schema_version(dsn, site, served=kind == "served"))
    return info


def _schema_version(dsn: str, site: Settings, *, served: bool) -> dict[str, Any]:
    """``{"version": N}``; for a served database that does not answer, ``running`` False and the error."""
    from scalebox_hpc.db import schema
    from scalebox_hpc.db.connection import connect, translate_errors
    from scalebox_hpc.errors import DatabaseError

    try:
        with connect(dsn, pooler=site.db_pooler) as conn, translate_errors(dsn):
            return {"version": schema.current_version(conn)}
    except DatabaseError as exc:
        if not served:
            raise
        # a hand-over in progress, or a job that died: where it is served is the answer
        return {"running": False, "error": str(exc)}


@db.command("stop")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for it to stop.")
def db_stop(timeout: float) -> None:
    """Stop the served database (`db serve`: here, or its Slurm job), else the embedded one.
    A configured server (SCALEBOX_DSN) is left alone. Shutdown is clean (fast: sessions end,
    a checkpoint is written).

    \b
    Examples:
      scalebox db stop
    """
    from scalebox_hpc import embedded
    from scalebox_hpc.dbserve import commands as served

    message = served.stop(timeout)
    if message is not None:
        click.echo(message)
        return
    stopped = embedded.stop(embedded.data_home(settings()))
    click.echo("stopped" if stopped else "the embedded PostgreSQL was not running")


@db.command("serve")
@click.option("--here", "where", flag_value="here", help="Serve on this host (a service node or VM).")
@click.option("--slurm", "where", flag_value="slurm", help="Serve from a long-lived Slurm job.")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The data directory (default $SCALEBOX_HOME/served; shared for --slurm).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="TCP port (0: a free one at each start).")
@click.option("--foreground", is_flag=True, help="--here: stay in the foreground until Ctrl-C / SIGTERM.")
@click.option("--partition", default=None, help="--slurm: the partition.")
@click.option("--time", "time_limit", default=None, help="--slurm: the walltime of each job (sbatch --time).")
@click.option("--account", default=None, help="--slurm: the account.")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, help="--slurm: one more sbatch option (repeatable).")
@click.option("--handover-before", default="10m", show_default=True,
              help="--slurm: hand over to the next job this long before the walltime ends.")
@click.option("--wait", "wait_seconds", type=float, default=300.0, show_default=True,
              help="--slurm: seconds to wait for the job to serve (0: do not wait).")
@click.option("--handover-now", is_flag=True, help="Ask the serving job to hand over to a new job now.")
@click.option("--in-job", is_flag=True, hidden=True)
def db_serve(
    where: str | None, data: Path | None, port: int, foreground: bool, partition: str | None,
    time_limit: str | None, account: str | None, sbatch_args: tuple[str, ...], handover_before: str,
    wait_seconds: float, handover_now: bool, in_job: bool,
) -> None:
    """Serve the embedded PostgreSQL on TCP (TLS, scram-sha-256, one generated role and
    password) for stage jobs on other nodes, and write the service file that every client
    uses when SCALEBOX_DSN and PG* are unset.

    \b
    Examples:
      scalebox db serve --here                      # on a service node
      scalebox db serve --slurm --time 1-00:00:00   # as a Slurm job, handed over before its end
      scalebox db serve --handover-now              # move the job's server to a new job now
    """
    from scalebox_hpc.dbserve import commands as served
    from scalebox_hpc.dbserve.job import parse_duration

    before = parse_duration(handover_before)
    if handover_now:
        click.echo(served.handover_now(data, wait_seconds))
        return
    if in_job:
        raise SystemExit(served.in_job(data, port, before))
    if where == "here":
        click.echo(served.here(data, port, foreground))
    elif where == "slurm":
        click.echo(served.slurm(data, port, before, partition=partition, time_limit=time_limit, account=account,
                                extra=sbatch_args, wait_seconds=wait_seconds))
    else:
        raise click.UsageError("say where: --here or --slurm (or --handover-now)")

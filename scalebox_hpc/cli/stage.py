"""Slurm stage jobs on the command line: ``submit``, ``stage list|scale|stop|script``, ``autoscale``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from scalebox_hpc.cli.common import APP_OPTION, JSON_OPTION, _app_id, _db, _dump, _load, _work_root, settings
from scalebox_hpc.errors import NotFoundError, ScaleboxError

if TYPE_CHECKING:  # psycopg stays out of `scalebox --help` and the commands that need no database
    from scalebox_hpc.db.connection import Connection
    from scalebox_hpc.db.stages import StageJobRow

WORK_ROOT_OPTION = click.option(
    "--work-root", default=None,
    help="Root of the slots' work dirs and the jobs' logs; on a cluster a shared file system "
         "(env SCALEBOX_WORK_ROOT).")


class StageSubmitError(ScaleboxError):
    """Some stage jobs could not be submitted."""

    hint = "the app and its tasks are kept: fix the cause and run `scalebox autoscale --app N`"


def _scaler(work_root: str | None) -> Any:
    from scalebox_hpc.node import resolve_dsn, stage_autoscaler

    site = settings()
    return stage_autoscaler(resolve_dsn(create_schema=False, settings=site), _work_root(work_root), settings=site)


def _report_line(report: Any) -> str:
    def job(job_id: str) -> str:
        nodes = report.placed.get(job_id)
        return f"{job_id} (on {','.join(nodes)})" if nodes else job_id

    if report.budget_spent:
        return "skipped: the Slurm budget of the last minute is spent (SCALEBOX_SLURM_RPC_PER_MINUTE)"
    if not report.elected:
        return "no change (scaled moments ago: the whole app; try again in a few seconds)"
    parts = [f"{module}: submitted {', '.join(map(job, ids))}" for module, ids in report.submitted.items()]
    if report.cancelled:
        parts.append(f"cancelled {', '.join(report.cancelled)}")
    if report.rate_limited and not parts:
        return f"no change (scaled moments ago: {', '.join(report.rate_limited)}; try again in a few seconds)"
    return "; ".join(parts) or "no change"


def _raise_errors(report: Any, app_id: int) -> None:
    if report.errors:
        raise StageSubmitError(f"app {app_id}: " + "; ".join(report.errors))


@click.command("submit")
@click.option("-e", "--env-file", "env_files", multiple=True, help="Env file (NAME or NAME.env path).")
@WORK_ROOT_OPTION
@JSON_OPTION
@click.argument("file", type=click.Path(dir_okay=False))
def submit_cmd(env_files: tuple[str, ...], work_root: str | None, as_json: bool, file: str) -> None:
    """Create the app and submit its stage jobs to Slurm (then they scale with the queue).

    \b
    Examples:
      scalebox submit examples/app-primes/app.yaml
      scalebox submit --work-root /shared/$USER/sbx app.yaml
    """
    from scalebox_hpc.db import apps

    spec = _load(file, env_files)
    with _db(create_schema=True) as conn:
        app_id = apps.create_app(conn, spec)
    report = _scaler(work_root)(app_id, force=True)
    if as_json:
        _dump({"app_id": app_id, "submitted": report.submitted, "placed": report.placed, "errors": report.errors})
    else:
        click.echo(f"app {app_id}: {_report_line(report)}")
    _raise_errors(report, app_id)


@click.command("autoscale")
@APP_OPTION
@WORK_ROOT_OPTION
def autoscale_cmd(app: int | None, work_root: str | None) -> None:
    """One scaling pass: the app's stage jobs follow its queues (without --app: each of your RUNNING apps).
    Cheap and idempotent, e.g. from scrontab every few minutes.

    \b
    Examples:
      scalebox autoscale                          # every submitted RUNNING app of yours
      scalebox autoscale --app 3
      */5 * * * * scalebox autoscale              # scrontab
    """
    from scalebox_hpc.db.sql import query

    with _db() as conn:
        ids = [_app_id(conn, app)] if app is not None else [  # only the caller's own apps (F6)
            int(r["id"]) for r in conn.execute(query("own_running_apps"))]
    scale = _scaler(work_root)
    for app_id in ids:
        report = scale(app_id)
        if not report.managed:
            continue  # not submitted to Slurm
        click.echo(f"app {app_id}: {_report_line(report) if report.locked else 'being scaled elsewhere'}")
        _raise_errors(report, app_id)


@click.group()
def stage() -> None:
    """Stage jobs: list, scale, stop, and the job script."""


def stage_rows(conn: Connection, app_id: int, *, include_ended: bool) -> list[dict[str, Any]]:
    """The app's stage jobs as plain rows (newest first)."""
    from scalebox_hpc.db import stages

    with conn.transaction():
        jobs = stages.jobs(conn, app_id, include_ended=include_ended)
    return [{k: getattr(j, k) for k in ("module", "cluster", "slurm_job_id", "state", "draining", "nodes", "exit_code",
                               "reason", "submitted_at", "ended_at", "end_time")} for j in jobs]


def slurm_calls(conn: Connection, app_id: int) -> int | None:
    """The Slurm commands autoscale passes ran on the app's cluster in the last minute; None for
    an app never submitted to Slurm."""
    from scalebox_hpc.db import stages

    with conn.transaction():
        if stages.launch_settings(conn, app_id) is None:
            return None
        return stages.slurm_calls_last_minute(conn, app_id)[0]


@stage.command("list")
@APP_OPTION
@click.option("--all", "include_ended", is_flag=True, help="Also the jobs that ended.")
@WORK_ROOT_OPTION
@JSON_OPTION
def stage_list(app: int | None, include_ended: bool, work_root: str | None, as_json: bool) -> None:
    """The app's stage jobs and their Slurm state (refreshed, and scaled, first).

    \b
    Examples:
      scalebox stage list
      scalebox stage list --app 3 --all --json
    """
    with _db() as conn:
        app_id = _app_id(conn, app)
    _scaler(work_root)(app_id)
    with _db() as conn:
        rows = stage_rows(conn, app_id, include_ended=include_ended)
    if as_json:
        _dump(rows)
        return
    clusters = any(r["cluster"] for r in rows)
    for r in rows:
        flag = " draining" if r["draining"] else ""
        where = f"{r['cluster'] or '-':<8} " if clusters else ""  # a column only for multi-cluster apps
        click.echo(f"{r['module']:<14} {where}{r['slurm_job_id']:>8} {r['state']:<11}{flag} {r['nodes']}")
    with _db() as conn, conn.transaction():
        for line in slurm_call_lines(conn, app_id):
            click.echo(line)


def slurm_call_lines(conn: Connection, app_id: int) -> list[str]:
    """``slurm calls on cluster C: N in the last minute (budget B/min), M in the last hour (this
    app K)``, one line per cluster with calls counted in the last hour."""
    from scalebox_hpc.db import stages

    budget = settings().slurm_rpc_per_minute
    return [f"slurm calls on cluster {r['cluster'] or '(default)'}: {r['last_minute']} in the last minute "
            f"(budget {budget}/min, SCALEBOX_SLURM_RPC_PER_MINUTE), {r['last_hour']} in the last hour "
            f"(this app {r['app_last_hour']})" for r in stages.slurm_call_summary(conn, app_id)]


@stage.command("scale")
@APP_OPTION
@click.option("--min", "min_jobs", type=click.IntRange(0, 10_000), default=None, help="At least this many jobs.")
@click.option("--max", "max_jobs", type=click.IntRange(0, 10_000), default=None, help="At most this many jobs.")
@click.option("--jobs", type=click.IntRange(0, 10_000), default=None, help="Exactly this many (= --min N --max N).")
@click.option("--reset", is_flag=True, help="Back to the pipeline file's min_jobs/max_jobs.")
@WORK_ROOT_OPTION
@click.argument("module")
def stage_scale(app: int | None, min_jobs: int | None, max_jobs: int | None, jobs: int | None, reset: bool,
                work_root: str | None, module: str) -> None:
    """Set a stage's job bounds and apply them now.

    \b
    Examples:
      scalebox stage scale calc --jobs 4
      scalebox stage scale calc --min 1 --max 8
      scalebox stage scale calc --reset
    """
    from scalebox_hpc.autoscaler import effective_bounds
    from scalebox_hpc.db import stages
    from scalebox_hpc.pipeline import ModuleSpec

    if jobs is not None:
        min_jobs = max_jobs = jobs
    if not reset and min_jobs is None and max_jobs is None:
        raise click.UsageError("give --jobs N, --min/--max, or --reset")
    with _db() as conn:
        app_id = _app_id(conn, app)
        specs = {r.name: r for r in stages.modules(conn, app_id)}
        if module not in specs:
            raise NotFoundError("module", module)
        if not reset:
            current = effective_bounds(specs[module], ModuleSpec.model_validate(specs[module].spec))
            lo = min_jobs if min_jobs is not None else current[0]
            hi = max_jobs if max_jobs is not None else current[1]
            if lo > hi:
                raise click.UsageError(f"--min {lo} is above --max {hi}")
            min_jobs, max_jobs = lo, hi
        stages.set_bounds(conn, app_id, module, None if reset else min_jobs, None if reset else max_jobs)
        conn.commit()
    report = _scaler(work_root)(app_id, force=True, only=(module,))
    click.echo(_report_line(report) if report.submitted or report.cancelled else f"{module}: no change")
    _raise_errors(report, app_id)


def _clusters_of(jobs: list[StageJobRow]) -> list[tuple[str, list[str]]]:
    """(cluster, its submit_via) of each cluster the jobs run on ('' = the local Slurm)."""
    out: dict[str, list[str]] = {}
    for job in jobs:
        out.setdefault(job.cluster, list(job.submit_via))
    return sorted(out.items())


@stage.command("stop")
@APP_OPTION
@click.option("--now", is_flag=True, help="Cancel the jobs (running tasks are recovered) instead of draining.")
@click.argument("module")
def stage_stop(app: int | None, now: bool, module: str) -> None:
    """Stop a stage: no new jobs; its jobs drain (running tasks finish) and exit.

    The drain request goes through the database (the launchers look every few seconds);
    --now cancels the jobs instead.

    \b
    Examples:
      scalebox stage stop calc
      scalebox stage stop calc --now        # cancel the jobs
    """
    from scalebox_hpc.db import stages
    from scalebox_hpc.slurm import SlurmClient, SubprocessRunner

    with _db() as conn:
        app_id = _app_id(conn, app)
        stages.set_bounds(conn, app_id, module, 0, 0)
        live = [j for j in stages.jobs(conn, app_id) if j.module == module]
        for job in live:
            stages.mark_draining(conn, job.slurm_job_id, job.cluster)
        conn.commit()
    ids = [j.slurm_job_id for j in live]
    if now:
        for cluster, via in _clusters_of(live):
            client = SlurmClient(SubprocessRunner(), cluster=cluster or None, prefix=via)
            try:
                client.cancel(j.slurm_job_id for j in live if j.cluster == cluster)
            finally:  # counted against the cluster's budget, as an autoscale pass's commands are
                if client.commands_run:
                    with _db() as conn:
                        stages.record_slurm_calls(conn, cluster, app_id, client.commands_run)
    click.echo(f"{module}: {'cancelled' if now else 'draining'} {', '.join(ids) or 'no jobs'}")


@stage.command("script")
@APP_OPTION
@click.option("-f", "--file", "file", type=click.Path(dir_okay=False), default=None,
              help="Render from this pipeline file instead of a created app (app id shown as 0).")
@click.option("-e", "--env-file", "env_files", multiple=True, help="With --file: env files.")
@WORK_ROOT_OPTION
@click.argument("module")
def stage_script(app: int | None, file: str | None, env_files: tuple[str, ...], work_root: str | None,
                 module: str) -> None:
    """Print the sbatch script of MODULE's stage jobs.

    \b
    Examples:
      scalebox stage script -f app.yaml calc   # before submitting
      scalebox stage script --app 3 calc
    """
    from scalebox_hpc.autoscaler import LaunchCommand, job_script
    from scalebox_hpc.db import stages as db_stages
    from scalebox_hpc.pipeline import ModuleSpec

    command = LaunchCommand(python=sys.executable, work_root=_work_root(work_root))
    if file is not None:
        spec = _load(file, env_files)
        try:
            module_spec, app_id = spec.module(module), 0
        except KeyError:
            raise NotFoundError("module", module) from None
    else:
        with _db() as conn:
            app_id = _app_id(conn, app)
            specs = {r.name: r.spec for r in db_stages.modules(conn, app_id)}
        if module not in specs:
            raise NotFoundError("module", module)
        module_spec = ModuleSpec.model_validate(specs[module])
    click.echo(job_script(app_id, module_spec, command), nl=False)



COMMANDS = (submit_cmd, autoscale_cmd, stage)
"""The top-level commands this module adds to ``scalebox``."""

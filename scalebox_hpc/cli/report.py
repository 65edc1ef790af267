"""``scalebox report`` (one HTML file about a run) and ``scalebox metrics`` (Prometheus text)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from scalebox_hpc.cli.common import APP_OPTION, ID, _app_id, _db, app_or_id
from scalebox_hpc.errors import ScaleboxError


@click.command("report")
@APP_OPTION
@click.argument("app_id", type=ID, required=False)
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="The HTML file to write (default: report-app-ID.html; '-' for standard output).")
def report_cmd(app: int | None, app_id: int | None, output: str | None) -> None:
    """Write a self-contained HTML report of an app (default: the newest): throughput and queue
    depth over time, a timeline of executions per host and slot, durations, failures with their
    most frequent stderr lines, retries and stalls, locality and bytes moved, stage jobs and
    core-hours. Everything is computed in the database; the file needs no server and no network
    (inline SVG, no script). An app still running gets a snapshot, marked as such.

    \b
    Examples:
      scalebox report -o report.html           # the newest app
      scalebox report 3 -o run3.html
      scalebox report --app 3 -o - | gzip > run3.html.gz
    """
    from scalebox_hpc.report import data, html

    with _db() as conn:
        app_id = _app_id(conn, app_or_id(app, app_id))
        conn.commit()  # the report reads in a snapshot of its own
        page = html.render(data.read(conn, app_id))
    if output == "-":
        sys.stdout.write(page)
        return
    path = Path(output or f"report-app-{app_id}.html")
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    click.echo(f"{path} ({len(page.encode()) / 1024:.0f} KiB)", err=True)


@click.command("metrics")
@APP_OPTION
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Write to FILE atomically (a temporary file, then a rename) instead of standard output.")
@click.option("--recent", "recent", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="Without --app: also the apps FINISHED within this many seconds.")
def metrics_cmd(app: int | None, output: str | None, recent: float) -> None:
    """Print the apps' metrics in the Prometheus text format: the app given, else every app not
    FINISHED (and those finished within --recent seconds). For node_exporter's textfile
    collector, from cron or scrontab:

    \b
      * * * * * scalebox metrics -o /var/lib/node_exporter/textfile/scalebox.prom

    \b
    Examples:
      scalebox metrics                 # every running app
      scalebox metrics --app 3
    """
    from scalebox_hpc.report import metrics

    with _db() as conn:
        app_id = _app_id(conn, app) if app is not None else None
        conn.commit()  # the metrics are read in a snapshot of their own
        text = metrics.render(metrics.collect(conn, app_id, recent))
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            metrics.write_atomically(Path(output), text)
        except OSError as exc:
            raise _cannot_write(Path(output), exc) from None


def _cannot_write(path: Path, exc: OSError) -> ScaleboxError:
    return ScaleboxError(f"cannot write {path}: {exc.strerror or exc}",
                         hint="give -o a file in a directory that exists and that you may write to")


COMMANDS = (report_cmd, metrics_cmd)

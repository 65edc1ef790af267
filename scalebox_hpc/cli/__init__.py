"""The ``scalebox`` command (click): the login-node composition root.

Heavy imports (psycopg, pydantic, rich) happen inside the commands: ``scalebox task add``
runs once per emitted message inside run.sh, so its start-up time matters.
"""

from __future__ import annotations

import os
import sys

import click

from scalebox_hpc import logs
from scalebox_hpc.cli.common import EMIT_BUFFER_ENV, _check_dsn
from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--traceback", is_flag=True, envvar="SCALEBOX_TRACEBACK", help="Show tracebacks on errors.")
@click.option("--log-format", type=click.Choice(logs.FORMATS, case_sensitive=False), envvar=logs.LOG_FORMAT_ENV,
              default=None, help="Log lines as text (default) or one JSON object per line (SCALEBOX_LOG_FORMAT).")
@click.version_option(package_name="scalebox_hpc")
@click.pass_context
def cli(ctx: click.Context, verbose: int, traceback: bool, log_format: str | None) -> None:
    """scalebox: streaming batch pipelines on PostgreSQL, with per-node launchers.

    The database is SCALEBOX_DSN (or the PG* variables); without either, a private embedded
    PostgreSQL is started in ~/.local/share/scalebox_hpc and reused by later commands.
    """
    ctx.ensure_object(dict)
    # read once here (or by main), passed down through ctx.obj: commands take cli.common.settings()
    site = ctx.obj.get("settings") or Settings.from_environ()
    ctx.obj["settings"] = site
    ctx.obj["verbose"] = verbose
    if not os.environ.get(EMIT_BUFFER_ENV) and ctx.invoked_subcommand is not None:
        _check_dsn(site)  # not inside run.sh: `task add` there only buffers, and must start fast
    # also for the commands that configure logging themselves (launcher); click reads
    # SCALEBOX_LOG_FORMAT for --log-format, the settings hold it too (a group called without main)
    logs.use_format(log_format or site.log_format)
    if verbose:
        logs.configure(verbose)



# one module per command group, registered here (click's docs/complex.md): the group code
# does not import this module, so there is no import cycle and no registration by side effect
from scalebox_hpc.cli import apps as _apps  # noqa: E402
from scalebox_hpc.cli import db as _db_cmds  # noqa: E402
from scalebox_hpc.cli import doctor as _doctor  # noqa: E402
from scalebox_hpc.cli import relay as _relay  # noqa: E402
from scalebox_hpc.cli import report as _report  # noqa: E402
from scalebox_hpc.cli import run as _run  # noqa: E402
from scalebox_hpc.cli import slots as _slots  # noqa: E402
from scalebox_hpc.cli import stage as _stage  # noqa: E402
from scalebox_hpc.cli import state as _state  # noqa: E402
from scalebox_hpc.cli import status as _status  # noqa: E402
from scalebox_hpc.cli import tasks as _tasks  # noqa: E402

for _command in (_db_cmds.db, _apps.app, _state.semaphore, _state.variable, _tasks.task, _run.launcher_cmd,
                 _run.run_cmd, _status.status_cmd, _slots.slot, *_stage.COMMANDS, *_doctor.COMMANDS,
                 *_report.COMMANDS, _relay.relay_cmd):
    cli.add_command(_command)

# the names tests and callers import from here
from scalebox_hpc.cli.common import STATUS, StatusType, _one_line, terminal_safe  # noqa: E402
from scalebox_hpc.cli.run import _RunWatcher  # noqa: E402
from scalebox_hpc.cli.status import _print_status  # noqa: E402

__all__ = ["STATUS", "StatusType", "_RunWatcher", "_one_line", "_print_status", "cli", "main", "terminal_safe"]


# -- entry point ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """Entry point: errors become one line with a hint (traceback with --traceback)."""
    traceback = "--traceback" in (argv or sys.argv)
    try:
        site = Settings.from_environ()  # an invalid SCALEBOX_* value: one line naming it, below
        traceback = traceback or site.traceback
        cli.main(args=argv, prog_name="scalebox", standalone_mode=False, obj={"settings": site})
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


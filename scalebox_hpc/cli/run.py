"""``scalebox launcher`` and ``scalebox run``: run an app's slots on this host, with progress."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from scalebox_hpc.db.apps import ModuleCounts, StuckModule
    from scalebox_hpc.db.connection import Connection
    from scalebox_hpc.pipeline import AppSpec

from scalebox_hpc.cli.common import (
    APP_OPTION,
    _app_id,
    _db,
    _load,
    _one_line,
    _squeezed,
    _work_root,
    settings,
    terminal_safe,
)
from scalebox_hpc.cli.status import _print_failures


def _config(app_id: int, *, modules: tuple[str, ...] = (), slots: int | None = None, host: str | None = None,
            work_root: str | None = None, local: bool = False, local_scratch: str | None = None) -> Any:
    from scalebox_hpc.apprun import launcher_config

    return launcher_config(app_id, root=_work_root(work_root), modules=modules, slots=slots, host=host,
                           local=local, local_scratch=local_scratch, settings=settings())


@click.command("launcher")
@APP_OPTION
@click.option("-m", "--module", "modules", multiple=True, help="Only these modules (repeatable).")
@click.option("--slots", type=click.IntRange(0, 4096), default=None,
              help="Slots per module here (default: from the pipeline).")
@click.option("--host", default=None, help="Host name (default: SLURMD_NODENAME, else the hostname).")
@click.option("--work-root", default=None, help="Root of the slots' work dirs (env SCALEBOX_WORK_ROOT).")
@click.option("--grace", type=float, default=30.0, show_default=True,
              help="Drain grace on SIGTERM/SIGINT/SIGUSR1 (a second Ctrl-C or SIGTERM stops the tasks now; "
                   "in a stage job only a second Ctrl-C).")
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
    """Run this host's slots of an app until they go idle or a signal drains them.

    \b
    Examples:
      scalebox launcher --app 3                   # this host's slots of app 3
      scalebox launcher --app 3 -m calc --slots 8
      scalebox launcher --app 3 --local-scratch '/local/${HOST}'
    """
    from scalebox_hpc.node import SignalPolicy, configure_logging, resolve_dsn, run_launcher, run_stage_launcher

    # a no-op after -v; otherwise warnings (and, in a stage job's log, INFO) still show
    configure_logging(1 if stage_job else 0)
    if mpi_stage:
        from scalebox_hpc.launcher.mpi_stage import StageConfig
        from scalebox_hpc.node import run_mpi_stage

        if len(modules) != 1:
            raise click.UsageError("--mpi runs exactly one module: give -m MODULE")
        config = StageConfig(module=modules[0], work_root=_config(0, work_root=work_root).work_root,
                             app_id=app if app is not None else settings().app_id,
                             grace=grace, expected_ranks=ranks, stage_job=stage_job)
        sys.exit(run_mpi_stage(config, settings()))
    dsn = resolve_dsn(create_schema=False, settings=settings())
    with _db() as conn:
        app_id = _app_id(conn, app)
    config = _config(app_id, modules=modules, slots=slots, host=host, work_root=work_root,
                     local_scratch=local_scratch)
    if stage_job:
        sys.exit(run_stage_launcher(dsn, config, settings=settings()))
    again = (f"stopped; continue with `scalebox launcher --app {app_id}` "
             f"(or `scalebox run --app {app_id}`)")
    sys.exit(run_launcher(dsn, config, grace=grace, signals=SignalPolicy(resume_hint=again, restore=False),
                          settings=settings()))


@click.command("run")
@click.option("-e", "--env-file", "env_files", multiple=True, help="Env file (NAME or NAME.env path).")
@APP_OPTION
@click.option("--work-root", default=None, help="Root of the slots' work dirs.")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.option("--grace", type=float, default=30.0, show_default=True,
              help="On Ctrl-C (or when the run cannot go on): seconds running tasks get to finish "
                   "(a second Ctrl-C stops them now, putting them back READY).")
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
    from scalebox_hpc.apprun import run_here
    from scalebox_hpc.db.connection import connect, translate_errors
    from scalebox_hpc.node import SignalPolicy, resolve_dsn
    from scalebox_hpc.runtime.paths import ensure_root

    if (file is None) == (app is None):
        raise click.UsageError("give a pipeline FILE to create an app, or --app N to continue one")
    spec = _load(file, env_files) if file is not None else None
    ensure_root(_work_root(work_root))  # refused (another user's, or anyone's) before any app is made
    dsn = resolve_dsn(create_schema=True, settings=settings())
    with connect(dsn, pooler=settings().db_pooler) as conn, translate_errors(dsn):
        app_id = _created_or_continued(conn, spec, app)
        watcher = _RunWatcher(conn, app_id, timeout, quiet, grace)
        with watcher:
            watcher.configure_logging(int(ctx.obj.get("verbose", 0)) if ctx.obj else 0)
            run_here(dsn, _config(app_id, work_root=work_root, local=True), watcher.judge, grace=grace,
                     on_tick=watcher.show, signals=SignalPolicy(say=watcher.say, restore=False),
                     settings=settings())
        final = watcher.summary()
    sys.exit(final)


def _created_or_continued(conn: Connection, spec: AppSpec | None, app: int | None) -> int:
    """The app ``scalebox run`` runs: created from ``spec``, else ``app`` (or the newest) when it
    is not FINISHED; a FINISHED one ends the command (exit 0, nothing to run)."""
    from scalebox_hpc.db import apps

    if spec is not None:
        app_id = apps.create_app(conn, spec)
        click.echo(f"app {app_id} ({spec.name}) created", err=True)
        return app_id
    app_id = _app_id(conn, app)
    with conn.transaction():
        row = apps.get_app(conn, app_id)
    if row["status"] == "FINISHED":
        click.echo(f"app {app_id} ({_one_line(row['name'])}) is FINISHED: nothing to run", err=True)
        sys.exit(0)
    click.echo(f"app {app_id} ({_one_line(row['name'])}) continued here", err=True)
    return app_id


PROGRESS_SECONDS = 5.0
"""Off a terminal, ``scalebox run`` prints a progress line this often (when something changed)."""


class _RunWatcher:
    """Progress for ``scalebox run``; the decision that the app is done (or cannot go on) is
    its :class:`~scalebox_hpc.apprun.RunJudge`'s, shared with the Python client."""

    def __init__(self, conn: Connection, app_id: int, timeout: float | None, quiet: bool, grace: float) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from scalebox_hpc.apprun import RunJudge

        self.conn, self.app_id, self.grace, self.quiet = conn, app_id, grace, quiet
        self.judge = RunJudge(conn, app_id, timeout)
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

    def tick(self) -> bool:
        """Decide and update the progress; True when the run should end."""
        ending = self.judge.tick()
        self.show()
        return ending

    def show(self) -> None:
        """Update the bars (or the progress line) from the judge's last counts."""
        counts = self.judge.counts
        for mc in counts:
            if mc.name not in self.bars:
                self.bars[mc.name] = self.progress.add_task(_one_line(mc.name), total=0, extra="")
            extra = f"running {mc.count(-3)}" + (f", failed {mc.failed}" if mc.failed else "")
            self.progress.update(self.bars[mc.name], total=mc.total, completed=mc.done, extra=extra)
        self._progress_line(counts)

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

    def say(self, text: str) -> None:
        """One line of the launcher's signal handling (draining, stopping now) for the user: on a
        terminal printed above the progress bars."""
        line = f"scalebox: {terminal_safe(text)}"
        if self.tty:
            from rich.text import Text

            self.console.print(Text(line))
        else:
            click.echo(line, err=True)

    def summary(self) -> int:
        """Print the outcome; the exit code of ``scalebox run``."""
        from scalebox_hpc.db import apps

        with self.conn.transaction():
            row = apps.get_app(self.conn, self.app_id)
        judge = self.judge
        counts = judge.read_counts()
        slots = judge.read_slots()
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
        stuck = judge.stuck or (apps.stuck_modules(counts, slots) if pending and not judge.interrupted else [])
        self._explain(row, failed, pending, stuck)
        return 1 if failed or pending or judge.timed_out or stuck else 0

    def _explain(self, row: dict[str, Any], failed: int, pending: int, stuck: list[StuckModule]) -> None:
        """Why the run ended with work left (stuck modules, the timeout, a stop, slots gone), or
        without a result; nothing for a run that finished."""
        judge = self.judge
        again = f"scalebox run --app {self.app_id}"
        if stuck:
            for s in stuck:
                stage = f"srun --mpi=pmi2 ... scalebox launcher --mpi -m {s.module} --app {self.app_id}"
                todo = f"fix it, then `{again}`" if s.slots else f"start it with `{stage}`"
                click.echo(f"scalebox: {_squeezed(s.describe())}; {_one_line(todo)}", err=True)
        elif judge.timed_out:
            click.echo(f"scalebox: gave up after the timeout; {pending} task(s) unfinished; "
                       f"continue with `{again}`", err=True)
        elif pending and judge.interrupted:
            click.echo(f"scalebox: stopped; {pending} task(s) left unfinished; continue with `{again}` "
                       f"(or `scalebox launcher --app {self.app_id}`)", err=True)
        elif pending:
            click.echo(f"scalebox: {pending} task(s) left unfinished; continue with `{again}` "
                       f"(`scalebox slot list --app {self.app_id}` shows the slots)", err=True)
        elif row["status"] != "FINISHED" and not failed and not row["result"]:
            click.echo(f"scalebox: app {self.app_id} ended idle without a result "
                       "(no task called `scalebox app set-finished`)", err=True)

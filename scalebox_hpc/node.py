"""Composition root of the per-node launcher: builds the concrete queue, runtime, listener
and launcher, installs the signal handlers, runs until the slots end or a signal drains them.
``scalebox launcher`` (and ``scalebox run``) call into here."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from types import FrameType

from scalebox_hpc import early_signals, embedded
from scalebox_hpc.autoscaler import (
    Autoscaler,
    ClusterClients,
    LaunchCommand,
    ScaleReport,
    may_leave_idle,
    submit_environment,
)
from scalebox_hpc.db import schema
from scalebox_hpc.db import stages as db_stages
from scalebox_hpc.db.connection import Connection, configured_dsn, connect, translate_errors
from scalebox_hpc.db.notify import Listener, listen_dsn
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.db.sql import query
from scalebox_hpc.errors import NotFoundError, ScaleboxError
from scalebox_hpc.launcher import lifecycle
from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
from scalebox_hpc.launcher.mpi_stage import Opened, StageConfig
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.base import ContainerRuntime
from scalebox_hpc.runtime.choose import RuntimeChooser
from scalebox_hpc.runtime.container import HostDirs
from scalebox_hpc.runtime.images import default_cache
from scalebox_hpc.runtime.local import LocalRuntime
from scalebox_hpc.runtime.paths import default_local_dir
from scalebox_hpc.settings import Settings
from scalebox_hpc.slurm import JobEnvironment, SlurmClient, SubprocessRunner

logger = logging.getLogger(__name__)


def configure_logging(verbose: int = 0) -> None:
    """Entry points only: one stderr handler, INFO with -v, DEBUG with -vv; text lines, or JSON
    with ``--log-format json`` / SCALEBOX_LOG_FORMAT=json (:mod:`scalebox_hpc.logs`)."""
    from scalebox_hpc import logs

    logs.configure(verbose)


def resolve_dsn(*, create_schema: bool = True, start_embedded: bool = True, settings: Settings | None = None) -> str:
    """The database to use: SCALEBOX_DSN / PG* variables, else the embedded server (started
    on demand). The schema is checked (and created in an empty database when asked)."""
    site = settings or Settings.from_environ()
    dsn = configured_dsn(site)
    if dsn is None:
        if not start_embedded:
            running = embedded.running_dsn(embedded.data_home(site))
            if running is None:
                from scalebox_hpc.errors import EmbeddedDatabaseError

                raise EmbeddedDatabaseError(
                    "no database configured and the embedded PostgreSQL is not running",
                    hint="set SCALEBOX_DSN, or run `scalebox db init` to start the embedded one",
                )
            dsn = running
        else:
            dsn = embedded.ensure_running(embedded.data_home(site))
    with connect(dsn, pooler=site.db_pooler) as conn, translate_errors(dsn):
        schema.ensure(conn, create=create_schema)
        conn.commit()
    return dsn


def make_runtime(settings: Settings, *, local_scratch: Path | None = None) -> ContainerRuntime:
    """This host's runtimes: ``settings.runtime`` is the default for modules with a base_image
    and no ``runtime:`` (``auto``: Apptainer, else Podman, else Docker); the launcher's
    ``local_scratch`` is mounted at /local (without one: ``settings.local_dir``, default
    $TMPDIR/scalebox-<euid>/local, private), ``settings.data_root`` at /data, ``settings.sif_cache``
    holds converted images."""
    local = local_scratch or settings.local_dir or default_local_dir()
    return RuntimeChooser(settings.runtime, host=HostDirs(Path(local), settings.data_root),
                          sif_cache=default_cache(settings.sif_cache), host_env=settings.environ,
                          containers=settings.containers)


def build(
    dsn: str, config: LauncherConfig, settings: Settings, *, may_idle_exit: Callable[[], bool] | None = None,
) -> tuple[Launcher, Listener]:
    """Wire the launcher for one host from concrete parts."""
    wakeups = Wakeups()
    # no listen DSN: no LISTEN, the slots poll
    listener = Listener(listen_dsn(dsn, settings), wakeups.notify, pooler=settings.db_pooler)
    launcher = Launcher(config, lambda: PgQueue(dsn), make_runtime(settings, local_scratch=config.local_scratch),
                        wakeups, may_idle_exit=may_idle_exit)
    return launcher, listener


def run_launcher(
    dsn: str, config: LauncherConfig, *, grace: float = 30.0, on_tick: Callable[[], bool] | None = None,
    tick_seconds: float = 0.5, on_drain: Callable[[], None] | None = None,
    may_idle_exit: Callable[[], bool] | None = None, signals: SignalPolicy | None = None,
    settings: Settings | None = None,
) -> int:
    """Run this host's slots until they end. SIGTERM/SIGINT/SIGUSR1 drain (no new claims; running
    tasks get ``grace`` seconds); a second signal of ``signals.stop_now_on`` stops the running
    tasks at once (see :class:`SignalPolicy`). ``on_tick`` is called periodically; returning True
    drains too. ``on_drain`` is called once when a drain begins (not when the slots end by
    themselves); ``may_idle_exit`` is asked before idle slots end (False keeps them up).
    ``settings``: the site's (default: read from the environment now)."""
    policy = signals or SignalPolicy()
    launcher, listener = build(dsn, config, settings or Settings.from_environ(), may_idle_exit=may_idle_exit)
    listener.start()
    listener.ready.wait(5.0)
    stop = threading.Event()
    interrupts = Interrupts(launcher, stop, grace, policy)
    previous = interrupts.install()
    try:
        _run_slots(launcher, config, stop, on_tick=on_tick, tick_seconds=tick_seconds, on_drain=on_drain)
        launcher.stop(grace)
    finally:
        interrupts.ended = True
        listener.stop()
        if policy.restore:
            _restore_signals(previous)
    code = launcher.exit_code()
    if code:
        logger.error("every slot of app %s on %s ended in error (see `scalebox slot` messages / the log above)",
                     config.app_id, config.host,
                     extra={"action": "launcher_failed", "host": config.host, "app_id": config.app_id, "exit": code})
    if interrupts.received and policy.resume_hint:
        policy.say(policy.resume_hint)
    return code


def _run_slots(
    launcher: Launcher, config: LauncherConfig, stop: threading.Event, *, on_tick: Callable[[], bool] | None,
    tick_seconds: float, on_drain: Callable[[], None] | None,
) -> None:
    """Start the slots and tick until they end, ``on_tick`` says so or a signal sets ``stop``;
    ``on_drain`` when slots are still up then (a drain, not their own end)."""
    if launcher.start() == 0:
        logger.warning("no slots for host %s in app %s (no module's slots match it, or --module/--slots "
                       "left none)", config.host, config.app_id,
                       extra={"action": "launcher_no_slots", "host": config.host, "app_id": config.app_id})
    while launcher.alive() and not stop.is_set():
        if on_tick is not None and on_tick():
            break
        stop.wait(tick_seconds)
    if launcher.alive() and on_drain is not None:
        on_drain()


def _warn(text: str) -> None:
    logger.warning("%s", text)  # the default SignalPolicy.say: `scalebox launcher` shows warnings


@dataclasses.dataclass(frozen=True)
class SignalPolicy:
    """How a launcher answers SIGINT, SIGTERM and SIGUSR1. The first of them drains. A second
    one of ``stop_now_on`` (while draining) stops now: running tasks are killed (their process
    groups, containers, handler workers) and given back READY, the attempt not counted. Others
    are only said. A stage job stops now only on a second SIGINT: Slurm sends TERM twice (to the
    step and, forwarded by the job script, through srun) and USR1 at the walltime warning, and
    none of those may turn its drain into a kill."""

    stop_now_on: frozenset[int] = frozenset({signal.SIGINT, signal.SIGTERM})
    say: Callable[[str], None] = _warn
    """Where the one-line messages go (default: the log, as warnings)."""
    resume_hint: str | None = None
    """Said last after a signal stopped the launcher (how to continue)."""
    restore: bool = True
    """Put the previous handlers back at the end. A command (False) keeps them: a signal after
    the slots ended (a third Ctrl-C during the summary) then ends it quietly with 130, not a
    KeyboardInterrupt traceback from wherever it lands."""


class Interrupts:
    """The launcher's signal handler (main thread only) and what it has seen."""

    def __init__(self, launcher: Launcher, stop: threading.Event, grace: float, policy: SignalPolicy) -> None:
        self.launcher, self.stop, self.grace, self.policy = launcher, stop, grace, policy
        self.received = 0
        self.stopped_now = False
        self.ended = False
        """The slots are gone: a signal now ends the process (exit 130)."""

    def install(self) -> dict[int, object]:
        """Handle SIGTERM, SIGINT and SIGUSR1; returns the previous handlers (none off the main thread)."""
        previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                previous[sig] = signal.signal(sig, self.handle)
            for early in early_signals.take():  # a walltime warning that came while we were starting
                logger.warning("signal %s arrived while the launcher started", signal.Signals(early).name)
                self.handle(early, None)
        return previous

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        """First signal: drain; a second one of ``stop_now_on``: stop now; later ones: said only."""
        if self.ended:
            raise SystemExit(130)
        name = signal.Signals(signum).name
        self.received += 1
        try:
            if self.received == 1:
                # at once: a run killed by the same signal (scancel) is then given back
                self.launcher.control.draining.set()
                self.stop.set()
                self.policy.say(self._drain_message(name))
            elif not self.stopped_now and signum in self.policy.stop_now_on:
                self.stopped_now = True
                killed = self.launcher.stop_now()
                self.policy.say(f"stopping now: {killed} running task(s) killed and given back ({name})")
            elif self.stopped_now:
                self.policy.say(f"already stopping now ({name} ignored)")
            else:
                self.policy.say(f"still draining ({name} ignored; {self._stop_now_hint()})")
        except Exception:  # a message must not turn the signal into a traceback
            logger.debug("signal %s: could not say so", name, exc_info=True)

    def _drain_message(self, name: str) -> str:
        running = self.launcher.running_tasks()
        return (f"stopping: no new tasks; {running} running task(s) get up to {self.grace:g} s to finish, "
                f"then are killed and put back READY ({name}; {self._stop_now_hint()})")

    def _stop_now_hint(self) -> str:
        if signal.SIGINT in self.policy.stop_now_on:
            return "Ctrl-C again stops them now"
        return "a signal does not stop them at once"


def _restore_signals(previous: dict[int, object]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)  # type: ignore[arg-type]


# -- stage jobs ---------------------------------------------------------------------------------
# the stage-job policy lives in the launcher layer; its names stay importable from here
LEAVING_BUDGET_WAIT = lifecycle.LEAVING_BUDGET_WAIT
LEAVING_BUDGET_TRIES = lifecycle.LEAVING_BUDGET_TRIES
WALLTIME_MARGIN_SECONDS = lifecycle.WALLTIME_MARGIN_SECONDS


Session = Callable[[], AbstractContextManager[Connection]]
"""Opens (or lends) a database connection for one piece of stage-job bookkeeping."""


def dsn_session(dsn: str) -> Session:
    """A short connection per use, committed at the end (the launchers' way)."""
    @contextlib.contextmanager
    def session() -> Iterator[Connection]:
        with connect(dsn) as conn, translate_errors(dsn):
            yield conn

    return session


def stage_autoscaler(
    dsn: str, work_root: Path, *, settings: Settings | None = None, environ: dict[str, str] | None = None,
    session: Session | None = None,
) -> Callable[..., ScaleReport]:
    """A function running one autoscale of an app: ``scale(app_id, force=False, only=(), leaving=None)``
    (see :meth:`Autoscaler.reconcile`), at ``settings``' interval and Slurm budget; sbatch sees
    ``environ`` (default: the settings' environment) without the caller's job's SLURM_* variables."""
    site = settings or Settings.from_environ(environ)
    runner = SubprocessRunner(base_env=submit_environment(dsn, dict(site.environ if environ is None else environ)))
    client = SlurmClient(runner)

    def cluster_client(cluster: str, submit_via: Sequence[str]) -> SlurmClient:
        return SlurmClient(runner, cluster=cluster, prefix=submit_via)

    command = LaunchCommand(python=sys.executable, work_root=work_root)
    open_session = session or dsn_session(dsn)

    def scale(
        app_id: int, *, force: bool = False, only: tuple[str, ...] = (), leaving: tuple[str, str] | None = None,
    ) -> ScaleReport:
        with open_session() as conn:
            report = Autoscaler(conn, ClusterClients(client, cluster_client), command, interval=site.autoscale_seconds,
                                rpc_per_minute=site.slurm_rpc_per_minute).reconcile(
                app_id, force=force, only=only, leaving=leaving)
            for error in report.errors:
                logger.error("autoscale: app %d: %s", app_id, error,
                             extra={"action": "autoscale_error", "app_id": app_id, "error": error})
            return report

    return scale


class SessionStageStore:
    """The lifecycle's :class:`~scalebox_hpc.launcher.lifecycle.StageJobStore` over the database:
    each call one :data:`Session` (a short connection, or the MPI stage's lent one)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def job_started(self, job_id: str, cluster: str, alloc_cpus: int | None) -> None:
        """Record the job's allocated CPUs and its start."""
        with self.session() as conn:
            db_stages.job_started(conn, job_id, cluster, alloc_cpus=alloc_cpus)

    def may_leave_idle(self, job_id: str, cluster: str) -> bool:
        """The autoscaler's rule (``min_jobs``), in one transaction."""
        with self.session() as conn:
            return may_leave_idle(conn, job_id, cluster)

    def mark_leaving(self, job_id: str, cluster: str, *, finished: bool) -> None:
        """Mark the job draining; ``finished``: the end of its core-hours so far (the last call wins)."""
        with self.session() as conn:
            db_stages.mark_draining(conn, job_id, cluster)
            if finished:
                db_stages.job_finished(conn, job_id, cluster)

    def job_flags(self, job_id: str, cluster: str) -> tuple[bool, datetime | None]:
        """(asked to drain, end time) from the job's row, in one read."""
        with self.session() as conn:
            return db_stages.job_flags(conn, job_id, cluster)


class StageLifecycle(lifecycle.StageLifecycle):
    """:class:`scalebox_hpc.launcher.lifecycle.StageLifecycle` over a database :data:`Session`
    (the signature callers of ``node.StageLifecycle`` know; ``sleep`` replaces the real one)."""

    def __init__(
        self, job: JobEnvironment, spec: ModuleSpec, app_id: int, session: Session, scale: lifecycle.Scale, *,
        end: datetime | None, sleep: Callable[[float], None] = time.sleep, wait_for_budget: bool = True,
        interval: float = lifecycle.DEFAULT_AUTOSCALE_SECONDS,
    ) -> None:
        super().__init__(job, spec, app_id, SessionStageStore(session), scale, end=end, interval=interval,
                         clock=lifecycle.SystemClock(sleep), wait_for_budget=wait_for_budget)


def run_stage_launcher(
    dsn: str, config: LauncherConfig, *, environ: dict[str, str] | None = None, settings: Settings | None = None,
) -> int:
    """The launcher of one node of a stage job (``scalebox launcher --stage-job``).

    Host and job come from the SLURM_* variables. It claims only while a task still fits the
    walltime (``task_max_seconds``), drains on SIGUSR1 (Slurm's ``--signal=B:USR1@grace``,
    forwarded by the job script) or SIGTERM, marks its job as draining so a replacement can be
    submitted, and exits 0. Its first node runs the app's autoscaler every few seconds; it ends
    idle only above the module's ``min_jobs``. ``settings`` (default: read from ``environ``, else
    this process's environment) give the autoscale interval and the Slurm budget.
    """
    site = settings or Settings.from_environ(environ)
    job = JobEnvironment.from_env(environ)
    if len(config.modules) != 1:
        raise ScaleboxError("a stage job runs exactly one module", hint="pass --module NAME")
    module = config.modules[0]
    spec = _module_spec(dsn, config.app_id, module)
    config = dataclasses.replace(config, host=job.node_name or config.host, slots=spec.slurm.slots_per_node)
    hooks = StageLifecycle(job, spec, config.app_id, dsn_session(dsn),
                           stage_autoscaler(dsn, config.work_root, settings=site, environ=environ), end=_job_end(job),
                           interval=site.autoscale_seconds)
    logger.info("stage job %s node %s: app %s module %s, %s CPUs, ends %s", job.job_id, config.host,
                config.app_id, module, job.cpus or "?", hooks.end or "unknown",
                extra={"action": "stage_job_start", "slurm_job_id": job.job_id, "host": config.host,
                       "app_id": config.app_id, "module_name": module, "cpus": job.cpus})
    hooks.started()
    grace = max(1.0, spec.slurm.signal_grace_seconds - WALLTIME_MARGIN_SECONDS)
    # Slurm's TERMs (twice on scancel) and USR1 only drain; a second Ctrl-C of a user stops now
    interactive_only = SignalPolicy(stop_now_on=frozenset({signal.SIGINT}))
    rc = run_launcher(dsn, config, grace=grace, on_tick=hooks.tick, on_drain=hooks.leaving,
                      may_idle_exit=hooks.may_idle_exit, signals=interactive_only, settings=site)
    if threading.current_thread() is threading.main_thread():
        # the slots are gone: a late drain signal (walltime, `stage stop`) must not kill us now
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    hooks.leaving()  # also after an idle exit: a replacement is submitted if work came in meanwhile
    return rc


def _module_spec(dsn: str, app_id: int, module: str) -> ModuleSpec:
    """The stored spec of the app's module (NotFoundError when it has none of that name)."""
    queue = PgQueue(dsn)
    try:
        specs = queue.module_specs(app_id)
    finally:
        queue.close()
    if module not in specs:
        raise NotFoundError("module", module)
    return ModuleSpec.model_validate(specs[module])


def _job_end(job: JobEnvironment) -> datetime | None:
    """When the job's time limit expires, from the environment (newer Slurm releases); else None,
    and :class:`StageLifecycle` reads it from the database once the app's autoscale pass has
    seen the job run (its squeue carries every job's EndTime)."""
    return job.end_time


def run_mpi_stage(config: StageConfig, settings: Settings | None = None) -> int:
    """One rank of an MPI stage job (``srun --mpi=pmi2 scalebox launcher --mpi -m MODULE``).
    The communicator is checked before anything else (the singleton guard); only rank 0
    resolves the database and opens the stage's one connection. ``settings``: the site's
    (default: read from the environment now)."""
    site = settings or Settings.from_environ()
    if config.expected_ranks is None and site.mpi_ranks is not None:
        config = dataclasses.replace(config, expected_ranks=site.mpi_ranks)
    from scalebox_hpc import mpi
    from scalebox_hpc.launcher import mpi_stage

    # MPICH's default UCX netmod publishes an address so long that it goes through PMI in
    # segments, which Slurm 22.05's pmi2 plug-in intermittently misparses (hangs at MPI_Init);
    # the OFI netmod's short address does not (measured: 2 of 5 starts hung vs 0 of 12)
    os.environ.setdefault("MPIR_CVAR_CH4_NETMOD", "ofi")
    mpi.remove_stale_segments()
    with mpi.init_deadline(site.mpi_init_timeout):  # a hung MPI_Init ends this rank (and, --kill-on-bad-exit, the step)
        comm = mpi.load_mpi().COMM_WORLD
    return mpi_stage.run_stage(comm, config, lambda: _open_mpi_stage(config, site), LocalRuntime())


def _open_mpi_stage(config: StageConfig, site: Settings) -> Opened:
    """Rank 0's database side: the stage's one connection. The schema check, the app lookup and
    the stage job's bookkeeping (drain checks, min_jobs, autoscale) go through it too."""
    dsn = configured_dsn(site) or resolve_dsn(create_schema=False, start_embedded=False, settings=site)
    queue = PgQueue(dsn)
    with translate_errors(dsn):
        schema.ensure(queue.conn, create=False)
        app_id = config.app_id if config.app_id is not None else _newest_app(queue.conn)
    opened = Opened(queue, app_id, {})  # no DSN for the scripts (audit F5)
    if config.stage_job:
        opened.hooks = _mpi_stage_hooks(dsn, queue, app_id, config, site)
    return opened


def _newest_app(conn: Connection) -> int:
    row = conn.execute(query("newest_app")).fetchone()
    if not row or row["id"] is None:
        raise NotFoundError("app", "(any)")
    return int(row["id"])


def _mpi_stage_hooks(
    dsn: str, queue: PgQueue, app_id: int, config: StageConfig, site: Settings,
) -> Callable[[ModuleSpec], StageLifecycle]:
    """What builds an MPI stage job's lifecycle from its module's spec, over the stage's one
    connection (lent: the hooks run under the queue's lock, which its heartbeats need too)."""
    job = JobEnvironment.from_env(site.environ)

    @contextlib.contextmanager
    def lent() -> Iterator[Connection]:
        with translate_errors(dsn):
            yield queue.conn

    def stage_hooks(spec: ModuleSpec) -> StageLifecycle:
        scale = stage_autoscaler(dsn, config.work_root, settings=site, session=lent)
        hooks = StageLifecycle(job, spec, app_id, lent, scale, end=_job_end(job), wait_for_budget=False,
                               interval=site.autoscale_seconds)
        hooks.started()
        return hooks

    return stage_hooks

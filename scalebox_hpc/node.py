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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

from scalebox_hpc import early_signals, embedded
from scalebox_hpc.autoscaler import (
    DEFAULT_RPC_PER_MINUTE,
    Autoscaler,
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
from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
from scalebox_hpc.launcher.mpi_stage import StageConfig
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.base import ContainerRuntime
from scalebox_hpc.runtime.choose import RuntimeChooser
from scalebox_hpc.runtime.container import HostDirs
from scalebox_hpc.runtime.local import LocalRuntime
from scalebox_hpc.runtime.paths import default_local_dir
from scalebox_hpc.slurm import JobEnvironment, SlurmClient, SubprocessRunner

logger = logging.getLogger(__name__)


def configure_logging(verbose: int = 0) -> None:
    """Entry points only: one stderr handler, INFO with -v, DEBUG with -vv; text lines, or JSON
    with ``--log-format json`` / SCALEBOX_LOG_FORMAT=json (:mod:`scalebox_hpc.logs`)."""
    from scalebox_hpc import logs

    logs.configure(verbose)


def resolve_dsn(*, create_schema: bool = True, start_embedded: bool = True) -> str:
    """The database to use: SCALEBOX_DSN / PG* variables, else the embedded server (started
    on demand). The schema is checked (and created in an empty database when asked)."""
    dsn = configured_dsn()
    if dsn is None:
        if not start_embedded:
            running = embedded.running_dsn()
            if running is None:
                from scalebox_hpc.errors import EmbeddedDatabaseError

                raise EmbeddedDatabaseError(
                    "no database configured and the embedded PostgreSQL is not running",
                    hint="set SCALEBOX_DSN, or run `scalebox db init` to start the embedded one",
                )
            dsn = running
        else:
            dsn = embedded.ensure_running()
    with connect(dsn) as conn, translate_errors(dsn):
        schema.ensure(conn, create=create_schema)
        conn.commit()
    return dsn


def make_runtime(environ: Mapping[str, str] | None = None, *, local_scratch: Path | None = None) -> ContainerRuntime:
    """This host's runtimes: ``SCALEBOX_RUNTIME`` is the default for modules with a base_image
    and no ``runtime:`` (``auto``: Apptainer, else Podman, else Docker); the launcher's
    ``local_scratch`` is mounted at /local (without one: ``SCALEBOX_LOCAL_DIR``, default
    $TMPDIR/scalebox-<euid>/local, private), ``SCALEBOX_DATA_ROOT`` at /data, ``SCALEBOX_SIF_CACHE``
    holds converted images."""
    env = os.environ if environ is None else environ
    local = local_scratch or env.get("SCALEBOX_LOCAL_DIR") or str(default_local_dir())
    data = env.get("SCALEBOX_DATA_ROOT")
    cache = env.get("SCALEBOX_SIF_CACHE")
    return RuntimeChooser(
        env.get("SCALEBOX_RUNTIME", "auto"), host=HostDirs(Path(local), Path(data) if data else None),
        sif_cache=Path(cache) if cache else None, host_env=env,
    )


def build(
    dsn: str, config: LauncherConfig, *, may_idle_exit: Callable[[], bool] | None = None,
) -> tuple[Launcher, Listener]:
    """Wire the launcher for one host from concrete parts."""
    wakeups = Wakeups()
    listener = Listener(listen_dsn(dsn), wakeups.notify)  # None: no LISTEN, the slots poll
    launcher = Launcher(config, lambda: PgQueue(dsn), make_runtime(local_scratch=config.local_scratch), wakeups,
                        may_idle_exit=may_idle_exit)
    return launcher, listener


def run_launcher(
    dsn: str, config: LauncherConfig, *, grace: float = 30.0, on_tick: Callable[[], bool] | None = None,
    tick_seconds: float = 0.5, on_drain: Callable[[], None] | None = None,
    may_idle_exit: Callable[[], bool] | None = None, signals: SignalPolicy | None = None,
) -> int:
    """Run this host's slots until they end. SIGTERM/SIGINT/SIGUSR1 drain (no new claims; running
    tasks get ``grace`` seconds); a second signal of ``signals.stop_now_on`` stops the running
    tasks at once (see :class:`SignalPolicy`). ``on_tick`` is called periodically; returning True
    drains too. ``on_drain`` is called once when a drain begins (not when the slots end by
    themselves); ``may_idle_exit`` is asked before idle slots end (False keeps them up)."""
    policy = signals or SignalPolicy()
    launcher, listener = build(dsn, config, may_idle_exit=may_idle_exit)
    listener.start()
    listener.ready.wait(5.0)
    stop = threading.Event()
    interrupts = Interrupts(launcher, stop, grace, policy)
    previous = interrupts.install()
    try:
        if launcher.start() == 0:
            logger.warning("no slots for host %s", config.host)
        while launcher.alive() and not stop.is_set():
            if on_tick is not None and on_tick():
                break
            stop.wait(tick_seconds)
        if launcher.alive() and on_drain is not None:
            on_drain()
        launcher.stop(grace)
    finally:
        interrupts.ended = True
        listener.stop()
        if policy.restore:
            _restore_signals(previous)
    code = launcher.exit_code()
    if code:
        logger.error("every slot on %s ended in error (see `scalebox slot` messages / the log above)", config.host)
    if interrupts.received and policy.resume_hint:
        policy.say(policy.resume_hint)
    return code


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
AUTOSCALE_SECONDS = float(os.environ.get("SCALEBOX_AUTOSCALE_SECONDS", "10"))
"""How often the first node of a stage job asks for the app's autoscale pass, and how often an
app gets one whoever asks (env SCALEBOX_AUTOSCALE_SECONDS)."""
SLURM_RPC_PER_MINUTE = int(os.environ.get("SCALEBOX_SLURM_RPC_PER_MINUTE", str(DEFAULT_RPC_PER_MINUTE)))
"""The Slurm commands per minute and cluster autoscale passes may run (env SCALEBOX_SLURM_RPC_PER_MINUTE)."""
LEAVING_BUDGET_WAIT = 5.0
"""Seconds between tries of the last leaving job's pass while the Slurm budget is spent."""
LEAVING_BUDGET_TRIES = 13
"""Tries before the last leaving job gives up waiting for the budget (a minute and then some)."""
WALLTIME_MARGIN_SECONDS = 5.0
"""A task is claimed only if its task_max_seconds plus this fits the job's remaining walltime."""


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
    dsn: str, work_root: Path, *, environ: dict[str, str] | None = None, session: Session | None = None,
) -> Callable[..., ScaleReport]:
    """A function running one autoscale of an app: ``scale(app_id, force=False, only=(), leaving=False)``
    (see :meth:`Autoscaler.reconcile`)."""
    runner = SubprocessRunner(base_env=submit_environment(dsn, environ))
    client = SlurmClient(runner)

    def cluster_client(cluster: str, submit_via: Sequence[str]) -> SlurmClient:
        return SlurmClient(runner, cluster=cluster, prefix=submit_via)

    command = LaunchCommand(python=sys.executable, work_root=work_root)
    open_session = session or dsn_session(dsn)

    def scale(app_id: int, *, force: bool = False, only: tuple[str, ...] = (), leaving: bool = False) -> ScaleReport:
        with open_session() as conn:
            report = Autoscaler(conn, client, command, interval=AUTOSCALE_SECONDS,
                                rpc_per_minute=SLURM_RPC_PER_MINUTE, clusters=cluster_client).reconcile(
                app_id, force=force, only=only, leaving=leaving)
            for error in report.errors:
                logger.error("autoscale: %s", error)
            return report

    return scale


class StageLifecycle:
    """What makes a launcher, or an MPI stage's rank 0, a Slurm stage job (the StageHooks):

    - ``tick``: drain when a task no longer fits the remaining walltime (``task_max_seconds``)
      or when `scalebox stage stop` marked the job; the job's first node runs the app's
      autoscaler every SCALEBOX_AUTOSCALE_SECONDS;
    - ``may_idle_exit``: an idle job ends only above its module's ``min_jobs``;
    - ``leaving``: mark the job draining and (first node) ask for a pass, which runs at once
      when this was the app's last live job, so a replacement is submitted if work remains
      (while the Slurm budget is spent it waits for it, about a minute at most).

    The app gets one pass per interval whichever of its jobs asks first (:class:`Autoscaler`).
    """

    def __init__(
        self, job: JobEnvironment, spec: ModuleSpec, app_id: int, session: Session,
        scale: Callable[..., ScaleReport], *, end: datetime | None, sleep: Callable[[float], None] = time.sleep,
        wait_for_budget: bool = True,
    ) -> None:
        self.job, self.app_id, self.session, self.scale, self.end = job, app_id, session, scale, end
        self.cluster = spec.slurm.cluster or ""  # with the job id, the key of the job's row
        self.budget = (spec.arguments.task_max_seconds or 0) + WALLTIME_MARGIN_SECONDS
        self.first_node = job.nodeid == 0
        self.next_scale = time.monotonic() + AUTOSCALE_SECONDS
        self.sleep = sleep
        # an MPI stage's hooks hold its one connection's lock, which its heartbeats need too
        self.budget_tries = LEAVING_BUDGET_TRIES if wait_for_budget else 1

    def tick(self) -> bool:
        if self.end is not None and datetime.now(UTC) + timedelta(seconds=self.budget) >= self.end:
            logger.warning("walltime: %s left, less than a task needs; draining", self.end - datetime.now(UTC))
            return True
        if time.monotonic() < self.next_scale:
            return False
        self.next_scale = time.monotonic() + AUTOSCALE_SECONDS
        asked, end = self._job_flags()
        if asked:
            logger.warning("stage job %s asked to drain (`scalebox stage stop`)", self.job.job_id)
            return True
        if self.end is None and end is not None:
            # the end time as the app's autoscale pass stored it from its one squeue: every job's
            # launchers asking scontrol themselves made Slurm RPCs grow with the jobs
            self.end = end
            logger.info("stage job %s ends %s", self.job.job_id, end)
        if self.first_node:
            self._autoscale()
        return False

    def started(self) -> None:
        """The first node records the job's allocated CPUs and its start (for its core-hours in
        sbx_usage); from the environment, no Slurm call."""
        if not self.first_node:
            return
        try:
            with self.session() as conn:
                db_stages.job_started(conn, self.job.job_id, self.cluster, alloc_cpus=self.job.cpus)
        except ScaleboxError as exc:
            logger.warning("cannot record the start of stage job %s: %s", self.job.job_id, exc)

    def may_idle_exit(self) -> bool:
        try:
            with self.session() as conn:
                leave = may_leave_idle(conn, self.job.job_id, self.cluster)
        except ScaleboxError as exc:
            logger.warning("cannot check min_jobs (%s): staying up", exc)
            return False
        if not leave:
            logger.info("stage job %s idle, staying up: its module keeps min_jobs", self.job.job_id)
        return leave

    def leaving(self) -> None:
        try:
            with self.session() as conn:
                db_stages.mark_draining(conn, self.job.job_id, self.cluster)
                if self.first_node:  # the end of its core-hours so far (the last call wins)
                    db_stages.job_finished(conn, self.job.job_id, self.cluster)
        except ScaleboxError as exc:
            logger.warning("cannot mark job %s draining: %s", self.job.job_id, exc)
        if not self.first_node:
            return
        for attempt in range(self.budget_tries):
            report = self._autoscale(leaving=True)
            if report is None or not (report.budget_spent and report.urgent):
                return
            if attempt + 1 < self.budget_tries:
                self.sleep(LEAVING_BUDGET_WAIT)  # the last job: its pass must not be skipped
        logger.warning("stage job %s leaves without an autoscale pass: the Slurm budget stayed spent",
                       self.job.job_id)

    def _autoscale(self, *, leaving: bool = False) -> ScaleReport | None:
        try:
            return self.scale(self.app_id, leaving=leaving)
        except ScaleboxError as exc:
            logger.warning("autoscale failed: %s", exc)
            return None

    def _job_flags(self) -> tuple[bool, datetime | None]:
        """(asked to drain, end time) from the job's row, in one read. `scalebox stage stop` marks
        the job in the database (a signal could reach a launcher still starting up, before its
        handlers exist, and kill it)."""
        try:
            with self.session() as conn:
                return db_stages.job_flags(conn, self.job.job_id, self.cluster)
        except ScaleboxError as exc:
            logger.warning("cannot read stage job %s's row (drain request, end time): %s", self.job.job_id, exc)
            return False, None


def run_stage_launcher(dsn: str, config: LauncherConfig, *, environ: dict[str, str] | None = None) -> int:
    """The launcher of one node of a stage job (``scalebox launcher --stage-job``).

    Host and job come from the SLURM_* variables. It claims only while a task still fits the
    walltime (``task_max_seconds``), drains on SIGUSR1 (Slurm's ``--signal=B:USR1@grace``,
    forwarded by the job script) or SIGTERM, marks its job as draining so a replacement can be
    submitted, and exits 0. Its first node runs the app's autoscaler every few seconds; it ends
    idle only above the module's ``min_jobs``.
    """
    job = JobEnvironment.from_env(environ)
    if len(config.modules) != 1:
        raise ScaleboxError("a stage job runs exactly one module", hint="pass --module NAME")
    module = config.modules[0]
    queue = PgQueue(dsn)
    try:
        specs = queue.module_specs(config.app_id)
    finally:
        queue.close()
    if module not in specs:
        raise NotFoundError("module", module)
    spec = ModuleSpec.model_validate(specs[module])
    config = dataclasses.replace(config, host=job.node_name or config.host, slots=spec.slurm.slots_per_node)
    hooks = StageLifecycle(job, spec, config.app_id, dsn_session(dsn),
                           stage_autoscaler(dsn, config.work_root, environ=environ), end=_job_end(job))
    logger.info("stage job %s node %s: module %s, %s CPUs, ends %s", job.job_id, config.host, module,
                job.cpus or "?", hooks.end or "unknown")
    hooks.started()
    grace = max(1.0, spec.slurm.signal_grace_seconds - WALLTIME_MARGIN_SECONDS)
    # Slurm's TERMs (twice on scancel) and USR1 only drain; a second Ctrl-C of a user stops now
    interactive_only = SignalPolicy(stop_now_on=frozenset({signal.SIGINT}))
    rc = run_launcher(dsn, config, grace=grace, on_tick=hooks.tick, on_drain=hooks.leaving,
                      may_idle_exit=hooks.may_idle_exit, signals=interactive_only)
    if threading.current_thread() is threading.main_thread():
        # the slots are gone: a late drain signal (walltime, `stage stop`) must not kill us now
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    hooks.leaving()  # also after an idle exit: a replacement is submitted if work came in meanwhile
    return rc


def _job_end(job: JobEnvironment) -> datetime | None:
    """When the job's time limit expires, from the environment (newer Slurm releases); else None,
    and :class:`StageLifecycle` reads it from the database once the app's autoscale pass has
    seen the job run (its squeue carries every job's EndTime)."""
    return job.end_time


def run_mpi_stage(config: StageConfig) -> int:
    """One rank of an MPI stage job (``srun --mpi=pmi2 scalebox launcher --mpi -m MODULE``).
    The communicator is checked before anything else (the singleton guard); only rank 0
    resolves the database and opens the stage's one connection."""
    from scalebox_hpc import mpi
    from scalebox_hpc.launcher import mpi_stage

    # MPICH's default UCX netmod publishes an address so long that it goes through PMI in
    # segments, which Slurm 22.05's pmi2 plug-in intermittently misparses (hangs at MPI_Init);
    # the OFI netmod's short address does not (measured: 2 of 5 starts hung vs 0 of 12)
    os.environ.setdefault("MPIR_CVAR_CH4_NETMOD", "ofi")
    mpi.remove_stale_segments()
    with mpi.init_deadline():  # a hung MPI_Init ends this rank (and, --kill-on-bad-exit, the step)
        comm = mpi.load_mpi().COMM_WORLD

    def open_queue() -> mpi_stage.Opened:
        # the stage's one connection: the schema check, the app lookup and the stage job's
        # bookkeeping (drain checks, min_jobs, autoscale) go through it too
        dsn = configured_dsn() or resolve_dsn(create_schema=False, start_embedded=False)
        queue = PgQueue(dsn)
        app_id = config.app_id
        with translate_errors(dsn):
            schema.ensure(queue.conn, create=False)
            if app_id is None:
                row = queue.conn.execute(query("newest_app")).fetchone()
                if not row or row["id"] is None:
                    raise NotFoundError("app", "(any)")
                app_id = int(row["id"])
        opened = mpi_stage.Opened(queue, app_id, {})  # no DSN for the scripts (audit F5)
        if config.stage_job:
            job = JobEnvironment.from_env()

            @contextlib.contextmanager
            def lent() -> Iterator[Connection]:
                with translate_errors(dsn):
                    yield queue.conn

            def hooks(spec: ModuleSpec) -> StageLifecycle:
                scale = stage_autoscaler(dsn, config.work_root, session=lent)
                lifecycle = StageLifecycle(job, spec, app_id, lent, scale, end=_job_end(job), wait_for_budget=False)
                lifecycle.started()
                return lifecycle

            opened.hooks = hooks
        return opened

    return mpi_stage.run_stage(comm, config, open_queue, LocalRuntime())

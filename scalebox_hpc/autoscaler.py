"""Stage jobs and elastic scaling, without a daemon.

Every module of an app runs as zero or more long-lived Slurm jobs. How many follows its READY
queue (``ceil(ready / tasks_per_job)`` within ``min_jobs..max_jobs``); whoever touches the queue
applies it — ``scalebox submit`` / ``status`` / ``autoscale`` and the launchers inside the jobs
(periodically, and when they drain or exit). One PostgreSQL advisory lock per app serialises
them, the app's ``autoscaled_at`` elects one pass per interval however many jobs ask (so the
Slurm calls do not grow with the jobs), each pass's Slurm commands are counted per cluster
against ``SCALEBOX_SLURM_RPC_PER_MINUTE``, and the decision is computed from the stored state,
so a repeated call changes nothing: the scaler is idempotent.

While a module with READY tasks has a job waiting for nodes (Reason=Resources, or a QOS /
association limit), the running jobs of modules without work are drained (see
:meth:`Autoscaler._yield_nodes`).

Scaling up submits jobs; scaling down cancels surplus jobs that have not started yet. A running
job is never killed to scale down: its launchers exit by themselves when idle.

A new job asks for the nodes whose scratch holds most input of the module's READY tasks
(``sbatch --nodelist``, only nodes that are up with enough idle CPUs, the rest left to Slurm;
resubmitted without the list when sbatch refuses it): see :func:`place_jobs`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from scalebox_hpc.db import outbox
from scalebox_hpc.db import stages as db_stages
from scalebox_hpc.db.connection import Connection
from scalebox_hpc.db.stages import JobKey, JobModule, StageJobRow, StageModule
from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.models import AppStatus
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.paths import ensure_private, ensure_root
from scalebox_hpc.slurm import SchedulerClient, SlurmCommandError, SlurmParseError, SlurmState
from scalebox_hpc.slurm.parse import NodeInfo
from scalebox_hpc.slurm.script import StageJob, read_template, render

logger = logging.getLogger(__name__)

FAILURE_LIMIT = 3
"""After this many stage jobs of a module failed in a row, the scaler stops resubmitting it."""
VANISHED_AFTER = timedelta(seconds=60)
"""A job neither squeue nor sacct knows this long after its submission is taken as ended."""
_FAILED_STATES = frozenset({SlurmState.FAILED.value, SlurmState.OUT_OF_MEMORY.value, SlurmState.BOOT_FAIL.value})
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
STARVED_REASON = re.compile(r"(Resources|(QOS|Assoc)\w*Limit)\Z")
"""Slurm's reasons for a pending job that other jobs of the same user hold back: no free nodes,
or a QOS / association limit (QOSMaxJobsPerUserLimit, AssocGrpCpuLimit, ...)."""


@dataclass(frozen=True)
class ModuleView:
    """What the scaling decision for one module depends on."""

    name: str
    min_jobs: int
    max_jobs: int
    tasks_per_job: int
    ready: int
    live_jobs: int
    pending_jobs: Sequence[str] = ()
    """Live jobs still PENDING in Slurm, newest first (the ones a scale-down may cancel)."""
    app_status: str = AppStatus.RUNNING
    failing: bool = False


@dataclass(frozen=True)
class Decision:
    """What to do for one module: submit ``submit`` jobs, cancel ``cancel`` (pending) ones."""

    module: str
    target: int
    submit: int = 0
    cancel: tuple[str, ...] = ()
    reason: str = ""


def decide(view: ModuleView) -> Decision:
    """The number of jobs the module should have, and how to get there from ``live_jobs``."""
    if view.app_status == AppStatus.FINISHED:
        return Decision(view.name, 0, cancel=tuple(view.pending_jobs), reason="app finished")
    wanted = math.ceil(view.ready / view.tasks_per_job) if view.ready else 0
    target = max(view.min_jobs, min(view.max_jobs, wanted))
    if view.app_status != AppStatus.RUNNING:
        return Decision(view.name, view.live_jobs, reason=f"app {view.app_status.lower()}")
    if target > view.live_jobs:
        if view.failing:
            return Decision(view.name, target, reason=f"{FAILURE_LIMIT} jobs failed in a row; not resubmitting")
        return Decision(view.name, target, submit=target - view.live_jobs, reason=f"{view.ready} ready")
    surplus = tuple(view.pending_jobs[: view.live_jobs - target])
    return Decision(view.name, target, cancel=surplus, reason=f"{view.ready} ready")


def wants_job(row: StageModule) -> bool:
    """Whether a pass would submit a job for the module now, by its stored counts (READY tasks,
    live jobs, bounds; a failing streak not counted): a leaving job's pass is then urgent."""
    spec = ModuleSpec.model_validate(row.spec)
    min_jobs, max_jobs = effective_bounds(row, spec)
    view = ModuleView(name=row.name, min_jobs=min_jobs, max_jobs=max_jobs, tasks_per_job=spec.slurm.tasks_per_job,
                      ready=row.ready, live_jobs=row.live_jobs, app_status=row.app_status)
    return decide(view).submit > 0


def failing(ended_states: Iterable[str]) -> bool:
    """True when the newest ``FAILURE_LIMIT`` ended jobs (newest first) all failed."""
    recent = list(ended_states)[:FAILURE_LIMIT]
    return len(recent) == FAILURE_LIMIT and all(state in _FAILED_STATES for state in recent)


def active_modules(rows: Sequence[StageModule]) -> set[str]:
    """The modules (their name, spec, ready, running) that have work READY or RUNNING, or a
    module upstream of them (transitively along ``sink_modules``) has: as an idle slot judges
    (the ``module_activity`` query)."""
    sinks = {r.name: r.sink_modules for r in rows}
    active = {r.name for r in rows if r.ready or r.running}
    frontier = list(active)
    while frontier:
        for sink in sinks.get(frontier.pop(), []):
            if sink not in active:
                active.add(sink)
                frontier.append(sink)
    return active


def starved_modules(rows: Sequence[StageModule], live: Sequence[StageJobRow]) -> dict[str, str]:
    """Module -> Slurm's reason, for the modules with READY tasks one of whose live jobs is
    PENDING on resources or a QOS / association limit (:data:`STARVED_REASON`)."""
    ready = {r.id: r.name for r in rows if r.ready}
    out: dict[str, str] = {}
    for job in live:
        reason = job.reason or ""
        if (job.module_id in ready and job.ended_at is None and not job.draining
                and job.state == SlurmState.PENDING.value and STARVED_REASON.match(reason)):
            out.setdefault(ready[job.module_id], reason)
    return out


@dataclass
class ScaleReport:
    """What one ``reconcile`` did."""

    locked: bool = True
    managed: bool = True
    decisions: list[Decision] = field(default_factory=list)
    submitted: dict[str, list[str]] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rate_limited: list[str] = field(default_factory=list)
    """Modules scaled less than ``interval`` ago, left alone this time."""
    placed: dict[str, list[str]] = field(default_factory=dict)
    """Job id -> the nodes it asked for (``--nodelist``) because their scratch holds its inputs."""
    elected: bool = True
    """False: the app had a pass less than an interval ago (by another of its jobs, or a CLI
    call); this one ran no Slurm command."""
    budget_spent: bool = False
    """True: skipped, the cluster's Slurm commands of the last minute reached the ceiling."""
    yielded: list[str] = field(default_factory=list)
    """Running jobs of modules without work, drained because another module's job waits for nodes."""
    urgent: bool = False
    """The pass was due whatever the interval (forced, or the app's last live job leaving)."""
    slurm_calls: int = 0
    """Slurm commands this pass ran (squeue, sacct, sinfo, sbatch, scancel)."""


def place_jobs(
    holders: Sequence[tuple[str, int]], nodes: Mapping[str, NodeInfo], *, jobs: int, nodes_per_job: int,
    cpus_per_node: int, busy: Iterable[str] = (),
) -> list[list[str]]:
    """For each of ``jobs`` new stage jobs, the nodes to ask for: the ``holders`` (host, inputs
    held, most first) that are up with ``cpus_per_node`` idle CPUs and run no job of the module
    yet (``busy``), at most ``nodes_per_job`` per job, none twice. A job may get fewer nodes
    than it needs, or none: Slurm picks the rest."""
    taken = set(busy)
    usable = []
    for host, _count in holders:
        info = nodes.get(host)
        if host in taken or info is None or not info.available or info.idle_cpus < cpus_per_node:
            continue
        usable.append(host)
        taken.add(host)
    return [usable[i * nodes_per_job:(i + 1) * nodes_per_job] for i in range(jobs)]


@dataclass(frozen=True)
class LaunchCommand:
    """How the stage job's srun starts the launcher on each node."""

    python: str
    work_root: Path

    def argv(
        self, app_id: int, module: str, *, mpi: bool = False, local_scratch: str | None = None,
        data_root: str | None = None,
    ) -> list[str]:
        """``python -m scalebox_hpc launcher --stage-job --app N --module M`` (``--mpi --stage-job``
        for an MPI stage), with the module's cluster's scratch (``--local-scratch``) and data root
        (``SCALEBOX_DATA_ROOT``, through ``env``) when it names them."""
        env = ["env", f"SCALEBOX_DATA_ROOT={data_root}"] if data_root else []
        scratch = ["--local-scratch", local_scratch] if local_scratch and not mpi else []
        return [*env, self.python, "-m", "scalebox_hpc", "launcher", *(["--mpi"] if mpi else []), "--stage-job",
                "--app", str(app_id), "--module", module, "--work-root", str(self.work_root), *scratch]


def stage_job(app_id: int, spec: ModuleSpec, command: LaunchCommand) -> StageJob:
    """The stage job of ``spec``: its resources, slots per node and launcher command."""
    slots = spec.slurm.slots_per_node or sum(s.count for s in spec.slots)
    mpi = spec.mpi.mode is not None
    # an MPI stage needs 2 ranks at least (rank 0 dispatches): one node gets one more rank than slots
    default_ranks = slots + 1 if spec.slurm.nodes == 1 else slots
    ranks = (spec.mpi.ranks_per_node or default_ranks) if mpi else None
    return StageJob(app_id=app_id, module=spec.name, slurm=spec.slurm, slots_per_node=slots,
                    work_root=command.work_root,
                    launcher=command.argv(app_id, spec.name, mpi=mpi, local_scratch=spec.slurm.local_scratch,
                                          data_root=spec.slurm.data_root),
                    ranks_per_node=ranks)


def job_script(app_id: int, spec: ModuleSpec, command: LaunchCommand) -> str:
    """The rendered sbatch script of one stage job of ``spec``."""
    return render(read_template(spec.slurm.template), stage_job(app_id, spec, command))


def prepare_log_dir(job: StageJob) -> None:
    """sbatch does not create the --output directory: a job writing there would fail at once."""
    path = job.log_dir
    try:
        ensure_root(job.work_root)
        ensure_private(path, top=job.work_root)
    except OSError as exc:
        raise ScaleboxError(f"cannot create the job log directory {path}: {exc}",
                            hint="pass a writable --work-root (a shared file system on a cluster)") from exc


def effective_bounds(row: StageModule | JobModule, spec: ModuleSpec) -> tuple[int, int]:
    """(min_jobs, max_jobs) of a module: the `scalebox stage scale` overrides stored in its
    ``sbx_modules`` row where set, else the pipeline file's ``slurm:`` values."""
    lo = row.min_jobs if row.min_jobs is not None else spec.slurm.min_jobs
    hi = row.max_jobs if row.max_jobs is not None else spec.slurm.max_jobs
    return lo, hi


def may_leave_idle(conn: Connection, slurm_job_id: str, cluster: str = "") -> bool:
    """Whether an idle stage job may end. It may when the database does not know it, when it
    already drains, or when enough other jobs of its module run to keep ``min_jobs`` (it is
    then marked draining, in the same transaction); otherwise it stays up as warm capacity,
    rather than ending and being resubmitted (another trip through the Slurm queue) at once."""
    with conn.transaction():
        row = db_stages.lock_job_module(conn, slurm_job_id, cluster)
        if row is None or row.draining:
            return True
        min_jobs, _ = effective_bounds(row, ModuleSpec.model_validate(row.spec))
        if db_stages.running_jobs(conn, row.id, slurm_job_id, cluster) <= min_jobs:
            return False
        db_stages.mark_draining(conn, slurm_job_id, cluster)
        return True


ClientFactory = Callable[[str, Sequence[str]], SchedulerClient]
"""Builds the client of a named cluster: (cluster, submit_via argv) -> client."""


class ClusterClients(Mapping[str, SchedulerClient]):
    """The Slurm clients of one pass: ``default`` for modules that name no cluster (the submitting
    host's Slurm), and one per named cluster, built by ``make`` on first use (``-M NAME``, or the
    cluster's ``submit_via`` prefix). Counts each cluster's commands for its budget."""

    def __init__(
        self, default: SchedulerClient, make: ClientFactory | None = None,
        named: Mapping[str, SchedulerClient] | None = None,
    ) -> None:
        self.default = default
        self._make = make
        self._named: dict[str, SchedulerClient] = dict(named or {})
        self._via: dict[str, tuple[str, ...]] = {}

    def learn(self, spec: ModuleSpec) -> None:
        """Remember how to reach the module's cluster (jobs are refreshed per cluster, by name)."""
        if spec.slurm.cluster:
            self._via.setdefault(spec.slurm.cluster, tuple(spec.slurm.submit_via))

    def client(self, cluster: str | None) -> SchedulerClient:
        """The client of ``cluster`` ('' or None: the default one), built on first use."""
        try:
            return self[cluster or ""]
        except KeyError:
            raise ScaleboxError(f"no Slurm client for cluster {cluster!r}",
                                hint="this command runs one cluster only; use `scalebox autoscale`") from None

    def __getitem__(self, cluster: str) -> SchedulerClient:
        if not cluster:
            return self.default
        if cluster not in self._named:
            if self._make is None:
                raise KeyError(cluster)
            self._named[cluster] = self._make(cluster, self._via.get(cluster, ()))
        return self._named[cluster]

    def __iter__(self) -> Iterator[str]:
        """'' (the default) and the named clusters built or given so far."""
        return iter(["", *self._named])

    def __len__(self) -> int:
        return 1 + len(self._named)

    @classmethod
    def of(cls, clients: Mapping[str, SchedulerClient]) -> ClusterClients:
        """``clients`` as a ClusterClients: '' is the default client (required), the others named."""
        if isinstance(clients, ClusterClients):
            return clients
        if "" not in clients:
            raise ScaleboxError("no default Slurm client ('' in the clients)",
                                hint="pass {'': client, 'CLUSTER': client, ...}")
        return cls(clients[""], named={name: c for name, c in clients.items() if name})

    def counts(self) -> dict[str, int]:
        """Commands run so far, by cluster ('' = the default client)."""
        out = {"": self.default.commands_run}
        out.update({name: client.commands_run for name, client in self._named.items()})
        return out


DEFAULT_RPC_PER_MINUTE = 30
"""Slurm commands per minute and cluster that autoscale passes may run (SCALEBOX_SLURM_RPC_PER_MINUTE)."""


class Autoscaler:
    """Applies :func:`decide` to every module of an app, holding the app's advisory lock.

    One pass per app per ``interval``, whoever asks (the first node of each of its stage jobs,
    `scalebox status`, scrontab): the pass is elected under the lock by the app's
    ``autoscaled_at``, so N stage jobs make the Slurm calls of one. Each pass counts the Slurm
    commands it ran against its cluster; a pass is skipped while the last minute's count has
    reached ``rpc_per_minute`` (forced passes, the user's own commands, run and are counted)."""

    def __init__(
        self, conn: Connection, clients: Mapping[str, SchedulerClient], command: LaunchCommand, *,
        interval: float = 10.0, now: Callable[[], datetime] | None = None,
        rpc_per_minute: int = DEFAULT_RPC_PER_MINUTE,
    ) -> None:
        self.conn = conn
        self.clients = ClusterClients.of(clients)
        """The scheduler of each cluster: '' the default one (modules naming no cluster); a
        :class:`ClusterClients` builds the named ones on first use."""
        self.spent: dict[str, int] = {}
        """Slurm commands of the last minute per named cluster, at the start of the pass."""
        self.command = command
        self.interval = timedelta(seconds=interval)
        self.rpc_per_minute = rpc_per_minute
        # the database's clock by default: submitted_at is the database's, and a login node
        # whose clock runs ahead must not take a just-submitted job for vanished
        self.now = now if now is not None else (lambda: db_stages.db_now(conn))

    def refresh(self, live: Sequence[StageJobRow]) -> list[StageJobRow]:
        """Update ``live`` (not yet ended stage jobs) in the database from Slurm, with one batched
        status query; returns those still live, as Slurm now has them."""
        return [j for j in self._refreshed(live) if j.ended_at is None]

    def _refreshed(self, live: Sequence[StageJobRow]) -> list[StageJobRow]:
        """``live`` as Slurm now has them (stored), in the same order, the ended ones too; the
        jobs of a cluster not asked (budget spent, squeue failed) as they were."""
        if not live:
            return list(live)
        by_cluster: dict[str, list[str]] = {}
        for job in live:
            by_cluster.setdefault(job.cluster or "", []).append(job.slurm_job_id)
        # a cluster whose budget is spent is not asked: its jobs keep their last known state
        asked = {c for c in by_cluster if not (c and self._over_budget(c))}
        infos: dict[tuple[str, str], Any] = {}
        for cluster in sorted(asked):
            try:
                found = self.clients.client(cluster).status(by_cluster[cluster])
            except (SlurmCommandError, ScaleboxError) as exc:
                logger.warning("cannot ask Slurm%s the state of stage jobs %s (they keep their last known state): %s",
                               f" cluster {cluster}" if cluster else "", ",".join(by_cluster[cluster]), exc,
                               extra={"action": "slurm_status_failed", "cluster": cluster,
                                      "slurm_job_ids": by_cluster[cluster], "error": str(exc)})
                return list(live)
            infos.update({(cluster, i): info for i, info in found.items()})
        return [self._refresh_one(job, infos) if (job.cluster or "") in asked else job for job in live]

    def _refresh_one(self, job: StageJobRow, infos: Mapping[tuple[str, str], Any]) -> StageJobRow:
        """Store what Slurm said of one job (in ``infos``, by (cluster, id)); the job as it is now."""
        info = infos.get((job.cluster or "", job.slurm_job_id))
        if info is None:
            assert job.submitted_at is not None  # the column is NOT NULL
            if self.now() - job.submitted_at > VANISHED_AFTER:
                db_stages.update_job(self.conn, job.id, state="UNKNOWN", ended=True,
                                     reason="no longer known to squeue or sacct")
                return replace(job, state="UNKNOWN", ended_at=self.now())
            return job
        ended = info.state.is_terminal
        nodes = ",".join(info.nodes) if info.nodes else None
        # a PENDING job's EndTime is Slurm's guess; a RUNNING one's is its walltime, which the
        # job's launchers read from here (no scontrol per job)
        end = info.end_time if info.state is SlurmState.RUNNING else None
        db_stages.update_job(self.conn, job.id, state=info.state.value, ended=ended, nodes=nodes,
                             exit_code=info.exit_code, reason=info.reason, end_time=end)
        return replace(job, state=info.state.value, ended_at=self.now() if ended else None,
                       nodes=nodes or job.nodes, reason=info.reason or job.reason)

    def reconcile(
        self, app_id: int, *, force: bool = False, only: Sequence[str] = (), leaving: JobKey | None = None,
    ) -> ScaleReport:
        """Refresh the jobs and bring each module (or those in ``only``) to its target; ``force``
        ignores the rate limits, the Slurm budget and a failing streak. ``leaving``: (Slurm job
        id, cluster) of the stage job that drains or ends and asks; when no job of the app runs
        any more (nobody else will pass soon) the pass runs whatever the interval, within the
        budget, unless a pass already scaled with the job known as draining and no module wants a
        job (:meth:`_leaving_is_news`): so N jobs leaving together make one pass, not N."""
        report = ScaleReport()
        with self.conn.transaction():
            if not db_stages.try_lock(self.conn, app_id):
                report.locked = False
                return report
            mine, stored = db_stages.launch_state(self.conn, app_id)
            if not mine:
                report.managed = False  # another user's app: their jobs, their account (audit F6)
                return report
            if not force and stored is None:
                report.managed = False  # never submitted (e.g. run by `scalebox run`): not ours to scale
                return report
            gate = db_stages.autoscale_gate(self.conn, app_id)
            urgent = report.urgent = force or (
                leaving is not None and gate.running_jobs == 0 and self._leaving_is_news(app_id, leaving))
            if not urgent and gate.passed_within(self.interval):
                report.elected = False  # another job (or command) of the app passed moments ago
                return report
            spent = gate.calls_last_minute
            if not force and spent >= self.rpc_per_minute:
                report.budget_spent = True
                logger.warning("autoscale of app %d skipped: %d Slurm calls in the last minute on cluster %r, "
                               "the ceiling is %d (SCALEBOX_SLURM_RPC_PER_MINUTE)", app_id, spent,
                               gate.cluster, self.rpc_per_minute,
                               extra={"action": "autoscale_budget_spent", "app_id": app_id, "cluster": gate.cluster,
                                      "calls_last_minute": spent, "ceiling": self.rpc_per_minute})
                return report
            if not only:  # a pass over some modules (`stage scale M`) leaves the others' turn
                db_stages.mark_app_scaled(self.conn, app_id)
            # module rows before job rows, the order of an idle job's may_leave_idle (else the two
            # can deadlock: seen as `stage scale` failing while a job decided to leave)
            db_stages.lock_modules(self.conn, app_id)
            self.spent = {} if force else db_stages.slurm_calls_by_cluster(self.conn)
            before = self.clients.counts()
            self._pass(app_id, stored, report, force=force, urgent=urgent, only=only, leaving=leaving is not None)
            for cluster, count in self.clients.counts().items():
                calls = count - before.get(cluster, 0)
                report.slurm_calls += calls
                if calls:  # the default client's calls count against the app's own cluster label
                    db_stages.record_slurm_calls(self.conn, cluster or gate.cluster, app_id, calls)
            logger.debug("autoscale of app %d: %d Slurm calls", app_id, report.slurm_calls)
        return report

    def _leaving_is_news(self, app_id: int, job: JobKey) -> bool:
        """Whether a leaving job's pass must run now (read under the app's lock): its row is not
        yet ``drain_seen`` (no pass scaled its module knowing it drains; an unknown job counts as
        unseen), or a module still wants a job (work came in, or a job was refused, since). Exact,
        no clock: the pass that saw the job marked it in its own, committed, transaction."""
        if not db_stages.drain_seen(self.conn, job[0], job[1]):
            return True
        wanting = [row.name for row in db_stages.modules(self.conn, app_id) if wants_job(row)]
        if wanting:
            logger.info("stage job %s leaves and no job of app %d runs: modules %s want a job, passing now",
                        job[0], app_id, ",".join(wanting),
                        extra={"action": "autoscale_leaving_urgent", "app_id": app_id, "slurm_job_id": job[0],
                               "modules": wanting})
            return True
        logger.debug("stage job %s leaves: a pass of app %d already saw it drain, no module wants a job",
                     job[0], app_id)
        return False

    def _pass(
        self, app_id: int, stored: tuple[str, str] | None, report: ScaleReport, *, force: bool, urgent: bool,
        only: Sequence[str], leaving: bool = False,
    ) -> None:
        """One elected pass (under the app's lock): recover leases, refresh the jobs (one squeue),
        scale each module not scaled within the interval (all of them when ``urgent``). A leaving
        job's pass that finds every live job draining asks Slurm nothing: no decision depends on
        a draining job's state (it is no capacity whatever Slurm says), and the next other pass
        (`stage list`, `status`, a new job's) records how they ended."""
        recovered = db_stages.recover_expired(self.conn)
        if recovered:
            logger.warning("%d task(s) of dead launchers are READY again (their leases expired; found by the "
                           "autoscale pass of app %d)", recovered, app_id,
                           extra={"action": "leases_recovered", "app_id": app_id, "tasks": recovered})
        # one read of the app's jobs: the live ones refreshed from Slurm, in their place (newest first)
        history = db_stages.jobs(self.conn, app_id, include_ended=True)
        rows = db_stages.modules(self.conn, app_id)
        specs = {row.id: ModuleSpec.model_validate(row.spec) for row in rows}
        for spec in specs.values():
            self.clients.learn(spec)
        live = [j for j in history if j.ended_at is None]
        if leaving and not force and all(j.draining for j in live):
            live = []  # the drain tail's last pass: its squeue would change no decision
        fresh = {j.id: j for j in self._refreshed(live)}
        history = [fresh.get(j.id, j) for j in history]
        command = self._command(app_id, stored)
        yielding, history = self._yield_nodes(rows, history, report)
        for row in rows:
            if only and row.name not in only:
                continue
            cluster = specs[row.id].slurm.cluster
            if cluster and not force and self._over_budget(cluster):
                report.rate_limited.append(row.name)
                logger.warning("autoscale of app %d module %s skipped: %d Slurm calls in the last minute on "
                               "cluster %r, the ceiling is %d (SCALEBOX_SLURM_RPC_PER_MINUTE)", app_id, row.name,
                               self.spent[cluster], cluster, self.rpc_per_minute,
                               extra={"action": "autoscale_budget_spent", "app_id": app_id, "module_name": row.name,
                                      "cluster": cluster, "calls_last_minute": self.spent[cluster],
                                      "ceiling": self.rpc_per_minute})
                continue
            if not urgent and row.scaled_within(self.interval):
                report.rate_limited.append(row.name)
                continue
            self._scale(app_id, row, specs[row.id], history, force, report, command,
                        yielding=row.name in yielding)
        outbox.relay_quietly_on(self.conn, app_id)  # a fallback deliverer of messages to other databases

    def _yield_nodes(
        self, rows: list[StageModule], history: list[StageJobRow], report: ScaleReport,
    ) -> tuple[set[str], list[StageJobRow]]:
        """While a module with READY tasks has a job waiting for nodes (or for a QOS /
        association limit), the modules without work (their own or upstream) give theirs up:
        their running jobs — those kept up as ``min_jobs`` — are marked draining (their
        launchers drain within SCALEBOX_AUTOSCALE_SECONDS), and they count ``min_jobs`` 0 until
        no module starves. Returns those modules, and ``history`` with the drained jobs marked so."""
        starved = starved_modules(rows, history)
        if not starved:
            return set(), history
        active = active_modules(rows)
        yielding = {r.name for r in rows if r.name not in active}
        names = {r.id: r.name for r in rows}
        waiting = ", ".join(f"{m} ({why})" for m, why in sorted(starved.items()))
        out = []
        for job in history:
            module = names.get(job.module_id)
            if (module in yielding and job.ended_at is None and not job.draining
                    and job.state == SlurmState.RUNNING.value):
                db_stages.mark_draining(self.conn, job.slurm_job_id, job.cluster or "")
                job = replace(job, draining=True)
                report.yielded.append(job.slurm_job_id)
                logger.warning("stage job %s of module %s drains: it has no work, and %s waits for nodes",
                               job.slurm_job_id, module, waiting,
                               extra={"action": "stage_job_yield", "slurm_job_id": job.slurm_job_id,
                                      "module_name": module, "waiting": sorted(starved)})
            out.append(job)
        return yielding, out

    def _over_budget(self, cluster: str) -> bool:
        """True when the named cluster's Slurm commands of the last minute reached the ceiling."""
        return self.spent.get(cluster, 0) >= self.rpc_per_minute

    def _command(self, app_id: int, stored: tuple[str, str] | None) -> LaunchCommand:
        """The launch command the app's first stage job used (kept so that every later job,
        whoever submits it, runs the same Python in the same work root)."""
        if stored is not None:
            check_interpreter(stored[0])
            return LaunchCommand(python=stored[0], work_root=Path(stored[1]))
        db_stages.save_launch_settings(self.conn, app_id, self.command.python, str(self.command.work_root))
        return self.command

    def _scale(
        self, app_id: int, row: StageModule, spec: ModuleSpec, history: list[StageJobRow], force: bool,
        report: ScaleReport, command: LaunchCommand, *, yielding: bool = False,
    ) -> None:
        own = [j for j in history if j.module_id == row.id]  # newest first
        mine = [j for j in own if j.ended_at is None and not j.draining]
        ended = [j.state for j in own if j.ended_at is not None]
        min_jobs, max_jobs = effective_bounds(row, spec)
        if yielding:  # another module waits for the nodes: no warm capacity for this one now
            min_jobs = 0
        view = ModuleView(
            name=spec.name, min_jobs=min_jobs, max_jobs=max_jobs,
            tasks_per_job=spec.slurm.tasks_per_job, ready=row.ready, live_jobs=len(mine),
            pending_jobs=[j.slurm_job_id for j in mine if j.state == SlurmState.PENDING.value],
            app_status=row.app_status, failing=failing(ended) and not force,
        )
        decision = decide(view)
        report.decisions.append(decision)
        db_stages.mark_scaled(self.conn, row.id)
        # this pass decided knowing these jobs drain: their own leaving passes need not run now
        db_stages.mark_drain_seen(self.conn, [j.id for j in own if j.draining and not j.drain_seen])
        client = self.clients.client(spec.slurm.cluster)
        if decision.cancel:
            client.cancel(decision.cancel)
            for job in mine:
                if job.slurm_job_id in decision.cancel:
                    db_stages.update_job(self.conn, job.id, state=SlurmState.CANCELLED.value, ended=True,
                                         reason="scaled down")
            report.cancelled += decision.cancel
        if decision.submit:
            busy = {n for j in mine if j.nodes for n in j.nodes.split(",")}
            self._submit(app_id, row.id, spec, command, decision, report, busy, client)

    def _submit(
        self, app_id: int, module_id: int, spec: ModuleSpec, command: LaunchCommand, decision: Decision,
        report: ScaleReport, busy: set[str], client: SchedulerClient,
    ) -> None:
        """``decision.submit`` jobs of the module (through its cluster's ``client``): one script,
        rendered once, submitted N times, each asking for the nodes holding the module's pending
        inputs (when any are free)."""
        try:
            job = stage_job(app_id, spec, command)
            prepare_log_dir(job)
            script = render(read_template(spec.slurm.template), job)
        except ScaleboxError as exc:
            report.errors.append(f"{spec.name}: {exc}")
            logger.error("stage job of app %d module %s not submitted (its script): %s", app_id, spec.name, exc,
                         extra={"action": "stage_submit_failed", "app_id": app_id, "module_name": spec.name,
                                "error": str(exc)})
            return
        placements = self._placements(module_id, job, decision.submit, busy, client)
        for i in range(decision.submit):
            nodes = placements[i] if i < len(placements) else []
            try:
                job_id = self._submit_one(script, nodes, client)
            except ScaleboxError as exc:  # sbatch refused, timed out, or printed no job id
                report.errors.append(f"{spec.name}: {exc}")
                logger.error("stage job of app %d module %s not submitted (sbatch): %s", app_id, spec.name, exc,
                             extra={"action": "stage_submit_failed", "app_id": app_id, "module_name": spec.name,
                                    "error": str(exc)})
                break
            db_stages.record_job(self.conn, app_id, module_id, job_id, cluster=spec.slurm.cluster or "",
                                 nodes=",".join(nodes))
            report.submitted.setdefault(spec.name, []).append(job_id)
            if nodes:
                report.placed[job_id] = nodes
            logger.info("stage %s: submitted job %s (%s)%s", spec.name, job_id, decision.reason,
                        f" on {','.join(nodes)}, which hold its inputs" if nodes else "",
                        extra={"action": "stage_job_submitted", "app_id": app_id, "module_name": spec.name,
                               "slurm_job_id": job_id, "reason": decision.reason, "nodes": nodes})

    def _placements(
        self, module_id: int, job: StageJob, count: int, busy: set[str], client: SchedulerClient,
    ) -> list[list[str]]:
        """The nodes each new job of the module asks for (see :func:`place_jobs`); none when the
        module's ``slurm.locality`` is off, no READY task names inputs, or sinfo fails."""
        if job.slurm.locality == "off":
            return []
        holders = [(h, n) for h, n in db_stages.input_holders(self.conn, module_id) if _NODE_NAME.match(h)]
        if not holders:
            return []
        try:
            nodes = client.nodes([h for h, _ in holders], job.slurm.partition)
        except (SlurmCommandError, SlurmParseError) as exc:
            logger.warning("cannot ask Slurm which of %d input-holding nodes are free (%s): stage jobs go anywhere",
                           len(holders), exc, extra={"action": "slurm_nodes_failed", "error": str(exc)})
            return []
        per_node = (job.ranks_per_node or job.slots_per_node) * job.slurm.cpus_per_slot
        return place_jobs(holders, nodes, jobs=count, nodes_per_job=job.slurm.nodes, cpus_per_node=per_node,
                          busy=busy)

    def _submit_one(self, script: str, nodes: list[str], client: SchedulerClient) -> str:
        """sbatch the script, asking for ``nodes``; when sbatch refuses the node list (a site that
        forbids it, a node the partition lacks), once more without it."""
        if not nodes:
            return client.submit(script)
        try:
            return client.submit(script, [f"--nodelist={','.join(nodes)}"])
        except SlurmCommandError as exc:
            logger.warning("sbatch refused --nodelist=%s (%s): submitting without it", ",".join(nodes), exc,
                           extra={"action": "sbatch_nodelist_refused", "nodes": nodes, "error": str(exc)})
            return client.submit(script)


def check_interpreter(path: str) -> None:
    """Refuse to start stage jobs with a Python that someone else could have put there: the path
    (and what a symlink points to) must be owned by this user or root and not writable by group
    or others (audit F6: the interpreter is what every stage job of the app runs)."""
    for where, info in _stats(path):
        writable = info.st_mode & 0o022 and not stat.S_ISLNK(info.st_mode)  # a link's own mode means nothing
        if info.st_uid not in (0, os.geteuid()) or writable:
            raise ScaleboxError(
                f"the app's stage Python {path} is not safe to run: {where} is owned by uid {info.st_uid} "
                f"with mode {info.st_mode & 0o7777:o}",
                hint="stage jobs run the interpreter the app was first submitted with; it must be yours (or "
                     "root's) and writable by nobody else")


def _stats(path: str) -> list[tuple[str, os.stat_result]]:
    try:
        found = [(path, os.lstat(path))]
        if os.path.islink(path):
            found.append((os.path.realpath(path), os.stat(path)))
    except OSError as exc:
        raise ScaleboxError(f"the app's stage Python {path} cannot be used: {exc.strerror}",
                         hint="the interpreter the app was first submitted with must exist on the login node "
                              "and the compute nodes") from None
    return found


def submit_environment(dsn: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """What sbatch should see: the caller's environment without the SLURM_* variables of an
    enclosing job (a job submitted from inside a job would inherit them), plus the DSN the
    launchers must use."""
    env = dict(os.environ if environ is None else environ)
    keep = {"SLURM_CONF", "SLURM_TIME_FORMAT"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k in keep}
    env["SCALEBOX_DSN"] = dsn
    return env

"""Gathering the facts the checks judge: the database from this host, each cluster's Slurm
through the Slurm adapter (:class:`~scalebox_hpc.slurm.client.SlurmClient` over an injected
:class:`~scalebox_hpc.slurm.commands.CommandRunner`), the engines here, and the probe jobs.

Tests drive these with fake Slurm commands on PATH (as ``tests/unit/test_slurm_fake.py`` does)
and the real PostgreSQL; the judgements themselves are :mod:`scalebox_hpc.doctor.checks`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from scalebox_hpc.doctor import checks
from scalebox_hpc.doctor.plan import ProbeTarget, SlurmTarget
from scalebox_hpc.doctor.probe import apptainer_version
from scalebox_hpc.doctor.report import ProbeParseError, ProbeReport, parse_report
from scalebox_hpc.doctor.result import Check, clip
from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.slurm.client import SlurmClient
from scalebox_hpc.slurm.commands import CommandResult, CommandRunner, SlurmCommandError

logger = logging.getLogger(__name__)

SLURM_COMMANDS = ("sinfo", "squeue", "sbatch", "scancel")
PROBE_TIME_LIMIT = "00:05:00"
"""The probe job's ``--time``: short, so that it backfills into gaps."""
PROBE_JOB_NAME = "sbx-doctor"


# -- the database, from here -----------------------------------------------------------------
@dataclass
class DatabaseFacts:
    """What the database checks found; ``dsn`` is usable (reached, schema read) or None."""

    checks: list[Check]
    dsn: str | None


def database(environ: Mapping[str, str], start_embedded: Callable[[], str]) -> DatabaseFacts:
    """Resolve the DSN as the CLI does (SCALEBOX_DSN, else PG*, else the embedded server started
    on demand), connect, read the schema version and the database's clock."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    from scalebox_hpc.db.connection import configured_dsn, redact

    dsn = configured_dsn(environ)
    if dsn:
        try:
            conninfo_to_dict(dsn)
        except ProgrammingError as exc:
            return DatabaseFacts([checks.dsn_check("env", "", error=_without_secret(str(exc), dsn))], None)
    source = ("env" if environ.get("SCALEBOX_DSN") else "served") if dsn else "pg" if dsn == "" else "embedded"
    if dsn is None:
        try:
            dsn = start_embedded()
        except ScaleboxError as exc:
            return DatabaseFacts([checks.failed_embedded(str(exc), exc.hint)], None)
    shown = redact(dsn)
    found = [checks.dsn_check(source, shown)]
    try:
        version, server, skew = _read_database(dsn)
    except ScaleboxError as exc:
        return DatabaseFacts([*found, checks.reachable_check(shown, _without_secret(str(exc), dsn))], None)
    from scalebox_hpc.db import sql

    found += [checks.reachable_check(shown, None, server), checks.schema_check(version, sql.schema_version()),
              checks.clock_check("db.clock", skew, "this host")]
    return DatabaseFacts(found, dsn)


def _read_database(dsn: str) -> tuple[int | None, str, float]:
    from scalebox_hpc.db import schema
    from scalebox_hpc.db.connection import connect, translate_errors
    from scalebox_hpc.db.sql import query

    with connect(dsn, timeout=10.0, autocommit=True) as conn, translate_errors(dsn):
        before = time.time()
        row = conn.execute(query("server_info")).fetchone()
        after = time.time()
        version = schema.current_version(conn)
    assert row is not None
    return version, f"PostgreSQL {row['version']}", row["now"].timestamp() - (before + after) / 2


def _without_secret(text: str, dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    with contextlib.suppress(Exception):
        password = conninfo_to_dict(dsn).get("password")
        if password:
            return text.replace(str(password), "***")
    if "://" in dsn and "@" in dsn:  # an unparsable URL may still carry user:password@
        secret = dsn.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
        if secret:
            return text.replace(secret, "***")
    return text


# -- Slurm -------------------------------------------------------------------------------------
class DoctorClient(SlurmClient):
    """The Slurm client with one more verb: any read-only query on its cluster (``-M`` or the
    cluster's ``submit_via`` prefix applied, the call counted) — sinfo's partition list,
    ``--version``, sacctmgr."""

    def query(self, argv: Sequence[str]) -> CommandResult:
        """Run ``argv`` on this client's cluster; raises SlurmCommandError only when it cannot run."""
        return self._run(argv)


ClientFactory = Callable[[str, Sequence[str]], DoctorClient]
"""(cluster, submit_via) -> a client; ('', ()) is the default cluster."""


def runner_clients(runner: CommandRunner, timeout: float = 30.0) -> ClientFactory:
    """Clients over one runner, as the autoscaler builds them (``-M`` unless a ``submit_via``)."""
    def make(cluster: str, submit_via: Sequence[str]) -> DoctorClient:
        return DoctorClient(runner, use_json=False, timeout=timeout, cluster=cluster or None, prefix=submit_via)

    return make


def slurm(target: SlurmTarget, clients: ClientFactory, user: str) -> tuple[list[Check], bool]:
    """The Slurm checks of one cluster, and whether its commands work (the probe needs them)."""
    client = clients(target.cluster, target.submit_via)
    versions = {name: _version(client, name) for name in SLURM_COMMANDS}
    found = [checks.commands_check(versions, target.label)]
    if any(v is None for v in versions.values()):
        return found, False
    argv = ["sinfo", "--noheader", "--format=%R|%a"]
    try:
        result = client.query(argv)
        error = None if result.ok else (result.stderr.strip() or f"exit {result.returncode}")
    except SlurmCommandError as exc:
        result, error = None, str(exc)
    partitions = parse_partitions(result.stdout) if result is not None and result.ok else {}
    found.append(checks.controller_check(error, partitions, target.label))
    if error is not None:
        return found, False
    found += checks.partition_checks(target.partitions, partitions, target.label)
    if target.accounts or target.qos:
        plain = clients("", target.submit_via)  # sacctmgr has no -M: the cluster is a where-clause
        found += checks.account_checks(target.accounts, target.qos, associations(plain, user, target.cluster),
                                       target.label)
    return found, True


def _version(client: DoctorClient, command: str) -> str | None:
    try:
        result = client.query([command, "--version"])
    except SlurmCommandError:
        return None
    if not result.ok:
        return None
    return clip(result.stdout.strip() or result.stderr.strip() or command, 60)


def parse_partitions(text: str) -> dict[str, str]:
    """``sinfo --noheader --format=%R|%a`` → partition → availability (``up``, ``down``,
    ``drain``, ``inact``). ``-M`` adds ``CLUSTER: name`` lines; anything else malformed is skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, avail = line.strip().partition("|")
        name = name.strip()
        if not sep or not name or name.startswith("CLUSTER:") or any(c.isspace() for c in name):
            continue
        out.setdefault(name, avail.strip().lower())
    return out


def parse_associations(text: str) -> dict[str, frozenset[str]]:
    """``sacctmgr -nP show assoc format=account,qos`` → account → its QOS (comma-separated)."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        account, sep, qos = line.strip().partition("|")
        account = account.strip()
        if not sep or not account or any(c.isspace() for c in account):
            continue
        out.setdefault(account, set()).update(q.strip() for q in qos.split(",") if q.strip())
    return {a: frozenset(q) for a, q in out.items()}


def parse_names(text: str) -> frozenset[str]:
    """One name a line (``sacctmgr -nP show qos format=name``)."""
    return frozenset(w for w in (line.strip() for line in text.splitlines()) if w and not any(c.isspace() for c in w))


def associations(client: DoctorClient, user: str, cluster: str) -> checks.Associations | str:
    """The user's associations on ``cluster`` and the defined QOS; or why they could not be read."""
    where = [f"user={user}", *([f"cluster={cluster}"] if cluster else [])]
    try:
        assoc = client.query(["sacctmgr", "--noheader", "--parsable2", "show", "assoc", *where,
                              "format=account,qos"])
        qos = client.query(["sacctmgr", "--noheader", "--parsable2", "show", "qos", "format=name"])
    except SlurmCommandError as exc:
        return str(exc)
    for result in (assoc, qos):
        if not result.ok:
            return result.stderr.strip() or f"sacctmgr exited {result.returncode}"
    return checks.Associations(parse_associations(assoc.stdout), parse_names(qos.stdout))


# -- engines here ------------------------------------------------------------------------------
def engine(name: str, runner: CommandRunner, which: Callable[[str], str | None], *, needed: bool) -> Check:
    """The engine is on PATH here, and says its version."""
    exe = which(name)
    if exe is None:
        return checks.engine_check(name, None, "not on PATH", needed=needed)
    if name == "apptainer":  # through the adapter that pulls and builds its images
        try:
            return checks.engine_check(name, apptainer_version(exe, runner, 30.0))
        except ScaleboxError as exc:
            return checks.engine_check(name, None, str(exc), needed=needed)
    try:
        result = runner.run([exe, "--version"], timeout=30.0)
    except SlurmCommandError as exc:
        return checks.engine_check(name, None, str(exc), needed=needed)
    if not result.ok:
        return checks.engine_check(name, None, result.stderr.strip() or f"exit {result.returncode}", needed=needed)
    return checks.engine_check(name, (result.stdout.strip() or result.stderr.strip()).splitlines()[0] or exe)


# -- the probe jobs ------------------------------------------------------------------------------
def probe_argv(python: str, work_root: Path, target: ProbeTarget) -> list[str]:
    """The probe's command line in the job: the stage jobs' interpreter, ``-m scalebox_hpc doctor-probe``."""
    argv = [python, "-m", "scalebox_hpc", "doctor-probe", "--work-root", str(work_root)]
    if target.scratch:
        argv += ["--scratch", target.scratch]
    if target.engine:
        argv += ["--engine", target.engine]
        if target.image:
            argv += ["--image", target.image]
        if target.code_path is not None:
            argv += ["--code-path", str(target.code_path)]
    return argv


def probe_script(argv: Sequence[str]) -> str:
    """The job script: the probe, nothing else (``exec`` so its exit is the job's)."""
    return f"#!/bin/sh\n# scalebox doctor's probe job\nexec {shlex.join(argv)}\n"


def probe_sbatch_args(target: ProbeTarget, out: Path, err: Path) -> list[str]:
    """One task on one node, five minutes, the placement of the stage jobs it stands for."""
    args = [f"--job-name={PROBE_JOB_NAME}", "--nodes=1", "--ntasks=1", f"--time={PROBE_TIME_LIMIT}",
            f"--output={out}", f"--error={err}"]
    for name in ("partition", "account", "qos", "constraint", "gres"):
        value = getattr(target, name)
        if value:
            args.append(f"--{name}={value}")
    return args


@dataclass
class ProbeOutcome:
    """One probe job's end: its report, or why there is none."""

    target: ProbeTarget
    job_id: str = ""
    state: str = ""
    reason: str = ""
    report: ProbeReport | None = None
    error: str = ""


@dataclass
class _Running:
    outcome: ProbeOutcome
    client: DoctorClient
    out: Path
    err: Path


def run_probes(
    targets: Sequence[ProbeTarget], clients: ClientFactory, *, python: str, work_root: Path,
    timeout: float, sleep: Callable[[float], None] = time.sleep, monotonic: Callable[[], float] = time.monotonic,
) -> list[ProbeOutcome]:
    """Submit one probe job per target, follow them all (one ``squeue`` per cluster and round),
    read each report from its output file under ``WORK_ROOT/.doctor``; a job still not done after
    ``timeout`` seconds is cancelled. The files of a probe that passed are removed."""
    folder = work_root / ".doctor"
    running: list[_Running] = []
    done: list[ProbeOutcome] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return [ProbeOutcome(t, error=f"cannot create {folder}: {exc.strerror or exc}") for t in targets]
    for target in targets:
        outcome = ProbeOutcome(target)
        stem = folder / f"probe-{os.getpid()}-{secrets.token_hex(3)}"
        out, err = stem.with_suffix(".out"), stem.with_suffix(".err")
        client = clients(target.cluster, target.submit_via)
        try:
            outcome.job_id = client.submit(probe_script(probe_argv(python, work_root, target)),
                                           probe_sbatch_args(target, out, err))
        except ScaleboxError as exc:
            outcome.error = f"sbatch refused the probe job: {exc}"
            done.append(outcome)
            continue
        running.append(_Running(outcome, client, out, err))
    deadline = monotonic() + timeout
    pause = 1.0
    while running:
        running = _poll(running, done)
        if not running:
            break
        if monotonic() >= deadline:
            for job in running:
                _give_up(job, timeout)
                done.append(job.outcome)
            break
        sleep(pause)
        pause = min(pause * 1.5, 5.0)
    return sorted(done, key=lambda o: targets.index(o.target))


def _poll(running: list[_Running], done: list[ProbeOutcome]) -> list[_Running]:
    """One status round (one squeue per client); the jobs still running."""
    by_client: dict[int, list[_Running]] = {}
    for job in running:
        by_client.setdefault(id(job.client), []).append(job)
    still: list[_Running] = []
    for jobs in by_client.values():
        try:
            infos = jobs[0].client.status([j.outcome.job_id for j in jobs])
        except ScaleboxError as exc:
            logger.warning("doctor: probe status query failed: %s", exc)
            infos = {}
        for job in jobs:
            info = infos.get(job.outcome.job_id)
            if info is not None:
                job.outcome.state, job.outcome.reason = info.state.value, info.reason or ""
            finished = info is not None and info.state.is_terminal
            if finished or (info is None and _has_report(job.out)):
                _collect(job)
                done.append(job.outcome)
            else:
                still.append(job)
    return still


def _has_report(path: Path) -> bool:
    try:
        parse_report(_tail(path))
    except (OSError, ProbeParseError):
        return False
    return True


def _tail(path: Path, limit: int = 1 << 20) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - limit))
        return fh.read()


def _collect(job: _Running) -> None:
    outcome = job.outcome
    try:
        outcome.report = parse_report(_tail(job.out))
    except OSError as exc:
        outcome.error = (f"no output file {job.out} on this host ({exc.strerror or exc}): the work root must be "
                         "on a filesystem the login and compute nodes share")
    except ProbeParseError as exc:
        outcome.error = f"{exc}; stderr: {_stderr_tail(job.err) or '(empty)'}"
    if outcome.report is not None and outcome.state not in ("", "COMPLETED"):
        outcome.error = f"the job ended {outcome.state}; stderr: {_stderr_tail(job.err) or '(empty)'}"
    if outcome.report is not None and not outcome.error:
        for path in (job.out, job.err):
            with contextlib.suppress(OSError):
                path.unlink()


def _stderr_tail(path: Path) -> str:
    try:
        text = _tail(path, 4096).decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return clip(" | ".join(lines[-3:]), 300)


def _give_up(job: _Running, timeout: float) -> None:
    outcome = job.outcome
    with contextlib.suppress(ScaleboxError):
        job.client.cancel([outcome.job_id])
    pending = outcome.state == "PENDING"
    busy = " (the partition is busy: try again later, or a longer --probe-timeout)" if pending else ""
    outcome.error = f"not done after {timeout:g} s, cancelled{busy}"

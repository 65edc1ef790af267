"""The checks' judgements: pure functions from gathered facts to :class:`Check` results.

Gathering (connecting, running Slurm commands, the probe job) is in
:mod:`scalebox_hpc.doctor.gather`; everything here is data in, data out, so each pass, warn
and fail (and its hint) is unit-tested without a database, Slurm or a node.

Check ids (stable, matched by scripts on ``--json``)::

    db.dsn db.reachable db.schema db.clock
    slurm.commands slurm.controller slurm.partition slurm.account slurm.qos
    engine.present
    probe.job probe.python probe.db probe.clock probe.engine probe.scratch probe.work_root
    probe.resources probe.gpu probe.mpi
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from scalebox_hpc.doctor.report import PathFacts, ProbeReport
from scalebox_hpc.doctor.result import Check, clip, failed, passed, skipped, warned

CLOCK_WARN_SECONDS = 2.0
"""Skew above this is worth fixing (leases and walltimes are judged by both clocks)."""
CLOCK_FAIL_SECONDS = 30.0
"""Skew above this breaks walltime draining and lease expiry (heartbeats are 10 s)."""
FREE_WARN_BYTES = 1 << 30
"""A directory with less free space than this (1 GiB) gets a warning."""

UNREACHABLE_HINT = ("check SCALEBOX_DSN / PG* variables, that the server runs and admits this host "
                    "(listen_addresses, pg_hba.conf); `scalebox db status`")
NODE_DB_HINT = ("compute nodes must reach the database: a DSN host they resolve (not localhost), the server's "
                "listen_addresses and pg_hba.conf admitting them, no firewall between")
SLURM_MISSING_HINT = ("install the Slurm client tools or load their module (`module load slurm`); "
                      "without Slurm `scalebox run app.yaml` runs a pipeline on this host")


def _size(n: int | None) -> str:
    if n is None:
        return "? B"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


# -- database (from the login node) -----------------------------------------------------------
def dsn_check(source: str, shown: str, *, error: str = "") -> Check:
    """Where the DSN comes from. ``source``: ``env`` (SCALEBOX_DSN), ``pg`` (PG* variables),
    ``served`` (the service file of ``db serve``) or ``embedded`` (none: the private embedded
    server, which only this host reaches)."""
    if error:
        return failed("db.dsn", f"SCALEBOX_DSN is not a PostgreSQL connection string: {clip(error)}",
                      "use postgresql://USER@HOST:5432/DBNAME (password in ~/.pgpass), or unset it")
    if source == "embedded":
        return warned("db.dsn", f"no SCALEBOX_DSN: the embedded database ({shown}), on this host only",
                      "stage jobs on compute nodes cannot reach it: set SCALEBOX_DSN to a PostgreSQL they reach "
                      "(a service node or a DB VM), or run `scalebox db serve --slurm`")
    label = {"env": "SCALEBOX_DSN", "pg": "PG* variables", "served": "served (service file)"}[source]
    return passed("db.dsn", f"{label}: {shown}")


def reachable_check(shown: str, error: str | None, server: str = "") -> Check:
    """The login node reached the database (``error`` None), or why not."""
    if error is not None:
        return failed("db.reachable", f"cannot connect to {shown}: {clip(error)}", UNREACHABLE_HINT)
    return passed("db.reachable", f"connected to {shown}" + (f" ({clip(server, 80)})" if server else ""))


def schema_check(version: int | None, expected: int) -> Check:
    """The schema version against the one this scalebox_hpc needs."""
    if version is None:
        return failed("db.schema", "the database has no scalebox schema", "run `scalebox db init`")
    if version < expected:
        return failed("db.schema", f"the schema is at version {version}, this scalebox needs {expected}",
                      "run `scalebox db upgrade`")
    if version > expected:
        return failed("db.schema", f"the schema is at version {version}, newer than this scalebox ({expected})",
                      "upgrade scalebox_hpc here (`pip install -U scalebox_hpc`)")
    return passed("db.schema", f"schema version {version} (current)")


def clock_check(check_id: str, skew: float | None, where: str, target: str = "") -> Check:
    """The difference between the database's clock and ``where``'s."""
    if skew is None:
        return skipped(check_id, "no clock reading (the database was not reached)", target=target)
    text = f"{where}'s clock is {abs(skew):.3f} s {'behind' if skew > 0 else 'ahead of'} the database's"
    hint = ("run NTP (chrony) on both hosts: walltime draining and lease expiry compare the two clocks")
    if abs(skew) > CLOCK_FAIL_SECONDS:
        return failed(check_id, text, hint, target=target)
    if abs(skew) > CLOCK_WARN_SECONDS:
        return warned(check_id, text, hint, target=target)
    return passed(check_id, text, target=target)


# -- Slurm -------------------------------------------------------------------------------------
def commands_check(versions: Mapping[str, str | None], target: str = "") -> Check:
    """``sinfo/squeue/sbatch/scancel --version``: each command's version line, None when it did not run."""
    missing = [name for name, version in versions.items() if version is None]
    if missing:
        return failed("slurm.commands", f"Slurm command(s) not found or not working: {', '.join(missing)}",
                      SLURM_MISSING_HINT, target=target)
    shown = sorted({v for v in versions.values() if v})
    return passed("slurm.commands", f"{', '.join(versions)} present ({'; '.join(shown)[:80]})", target=target)


def controller_check(error: str | None, partitions: Mapping[str, str], target: str = "") -> Check:
    """``sinfo`` answered (slurmctld is up) and listed these partitions (name → availability)."""
    if error is not None:
        return failed("slurm.controller", f"sinfo did not answer: {clip(error)}",
                      "slurmctld must answer from here: `scontrol ping`; check SLURM_CONF and the network",
                      target=target)
    if not partitions:
        return warned("slurm.controller", "slurmctld answered but lists no partitions",
                      "`sinfo -s` should list the partitions you may use", target=target)
    return passed("slurm.controller", f"slurmctld answers; partitions: {clip(', '.join(partitions), 120)}",
                  target=target)


def partition_checks(wanted: Iterable[str], partitions: Mapping[str, str], target: str = "") -> list[Check]:
    """Each partition the pipeline (or ``--partition``) names exists and is up."""
    from scalebox_hpc.pipeline import did_you_mean

    out = []
    for name in dict.fromkeys(wanted):
        where = f"{target}/{name}" if target else name
        state = partitions.get(name)
        if state is None:
            close = did_you_mean(name, list(partitions))
            out.append(failed("slurm.partition", f"partition {name!r} does not exist{close}",
                              "fix slurm.partition (or --partition); `sinfo -s` lists the partitions", target=where))
        elif state.lower() not in ("up", ""):
            out.append(warned("slurm.partition", f"partition {name!r} is {state}",
                              "jobs wait until the site brings it up; `sinfo -p NAME`", target=where))
        else:
            out.append(passed("slurm.partition", f"partition {name!r} exists and is up", target=where))
    return out


@dataclass(frozen=True)
class Associations:
    """What ``sacctmgr show assoc`` says the user may use: account → allowed QOS (empty: not listed)."""

    accounts: Mapping[str, frozenset[str]]
    qos: frozenset[str]
    """Every QOS the cluster defines (``sacctmgr show qos``)."""


def account_checks(
    accounts: Iterable[str], qos: Iterable[str], assoc: Associations | str, target: str = "",
) -> list[Check]:
    """Each account and QOS the pipeline names is one the user's associations allow.
    ``assoc`` is the associations, or why they could not be read (no slurmdbd: a warning)."""
    from scalebox_hpc.pipeline import did_you_mean

    wanted_accounts, wanted_qos = list(dict.fromkeys(accounts)), list(dict.fromkeys(qos))
    if not wanted_accounts and not wanted_qos:
        return []
    if isinstance(assoc, str):
        names = [f"account {a!r}" for a in wanted_accounts] + [f"QOS {q!r}" for q in wanted_qos]
        return [warned("slurm.account", f"cannot check {', '.join(names)}: {clip(assoc)}",
                       "sacctmgr needs slurmdbd; without accounting sbatch checks them when a job is submitted",
                       target=target)]
    out = []
    for name in wanted_accounts:
        where = f"{target}/{name}" if target else name
        if name in assoc.accounts:
            out.append(passed("slurm.account", f"account {name!r} is one of yours", target=where))
        else:
            close = did_you_mean(name, list(assoc.accounts))
            out.append(failed("slurm.account", f"account {name!r} is not one of yours{close} "
                              f"(yours: {', '.join(sorted(assoc.accounts))})",
                              "fix slurm.account; `sacctmgr show assoc user=$USER format=account` lists yours",
                              target=where))
    allowed = frozenset().union(*assoc.accounts.values()) if assoc.accounts else frozenset()
    for name in wanted_qos:
        where = f"{target}/{name}" if target else name
        if assoc.qos and name not in assoc.qos:
            out.append(failed("slurm.qos", f"QOS {name!r} does not exist{did_you_mean(name, sorted(assoc.qos))}",
                              "fix slurm.qos; `sacctmgr show qos format=name` lists them", target=where))
        elif allowed and name not in allowed:
            out.append(failed("slurm.qos", f"QOS {name!r} is not yours (allowed: {', '.join(sorted(allowed))})",
                              "`sacctmgr show assoc user=$USER format=account,qos` lists the QOS you may use",
                              target=where))
        else:
            out.append(passed("slurm.qos", f"QOS {name!r} exists and is yours to use", target=where))
    return out


# -- the container engine (login node) ------------------------------------------------------------
def engine_check(name: str, version: str | None, error: str = "", *, needed: bool = True) -> Check:
    """The engine the pipeline's images need is installed here (the probe checks the nodes)."""
    if version is None:
        text = f"container engine {name!r} is not usable here: {clip(error) or 'not on PATH'}"
        hint = "install or load it (`module load apptainer`), or set the module's runtime: / SCALEBOX_RUNTIME"
        return failed("engine.present", text, hint, target=name) if needed else \
            warned("engine.present", text, hint, target=name)
    return passed("engine.present", f"{name}: {clip(version, 100)}", target=name)


def no_engine_check(found: Sequence[str]) -> Check:
    """Without a pipeline: which engines this host has."""
    if not found:
        return warned("engine.present", "no container engine (apptainer, podman, docker) on PATH",
                      "modules with a base_image need one; modules without run bare")
    return passed("engine.present", f"installed: {', '.join(found)}")


# -- the probe job ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expectations:
    """What the login side expects of a probe: the stage jobs' interpreter and versions, what the
    pipeline's modules ask for."""

    python: str
    """The interpreter the stage jobs run (``_stage.python`` of the app, else this one)."""
    python_version: str
    scalebox: str
    engine: str | None = None
    gpu: bool = False
    """A module asks for a GPU (``gres: gpu...``)."""
    mpi: bool = False
    """A module is an MPI stage (needs ``srun --mpi=pmi2``)."""
    free_warn_bytes: int = FREE_WARN_BYTES


def job_check(job_id: str, state: str, reason: str, error: str, target: str = "") -> Check:
    """The probe job itself: ran to the end (``state`` COMPLETED, or '' when the report is all we
    know), or did not (never started, failed, killed, no report)."""
    where = f"job {job_id}" if job_id else "the probe job"
    if error:
        return failed("probe.job", f"{where} ({state or 'not submitted'}"
                      f"{'/' + reason if reason and reason.lower() != 'none' else ''}): {clip(error)}",
                      "see the job's output file; `scalebox doctor --no-probe` checks the login node only",
                      target=target)
    return passed("probe.job", f"{where} ran ({state or 'done'})", target=target)


def probe_checks(report: ProbeReport, expect: Expectations, target: str = "") -> list[Check]:
    """Every judgement of one probe's report."""
    on = f" on {report.host}" if report.host else ""
    return [
        _python_check(report, expect, on, target),
        _db_check(report, on, target),
        clock_check("probe.clock", report.db.skew_seconds, report.host or "the node", target),
        _engine_check(report, expect, on, target),
        path_check("probe.scratch", report.path("scratch"), expect.free_warn_bytes, on, target),
        path_check("probe.work_root", report.path("work_root"), expect.free_warn_bytes, on, target),
        _resources_check(report, on, target),
        _gpu_check(report, expect, on, target),
        _mpi_check(report, expect, on, target),
    ]


def _python_check(report: ProbeReport, expect: Expectations, on: str, target: str) -> Check:
    got = report.python
    if got.executable != expect.python:
        return failed("probe.python", f"the job ran {got.executable or '?'}{on}, the stage jobs use {expect.python}",
                      "install scalebox_hpc in a venv on a shared filesystem and submit from it", target=target)
    if got.scalebox != expect.scalebox:
        return failed("probe.python", f"scalebox_hpc {got.scalebox or '(none)'}{on}, {expect.scalebox} here",
                      "the nodes must see the same installation (a venv on a shared filesystem)", target=target)
    if got.version != expect.python_version:
        return warned("probe.python", f"Python {got.version}{on}, {expect.python_version} here",
                      "the same path holds another interpreter on the nodes: use a venv on a shared filesystem",
                      target=target)
    return passed("probe.python", f"{got.executable} (Python {got.version}, scalebox_hpc {got.scalebox}){on}",
                  target=target)


def _db_check(report: ProbeReport, on: str, target: str) -> Check:
    db = report.db
    if not db.ok:
        return failed("probe.db", f"cannot reach the database {db.dsn or ''}{on}: {clip(db.error)}", NODE_DB_HINT,
                      target=target)
    return passed("probe.db", f"connected to {db.dsn}{on}", target=target)


def _engine_check(report: ProbeReport, expect: Expectations, on: str, target: str) -> Check:
    engine = report.engine
    if engine.skipped and not engine.error:
        return skipped("probe.engine", f"{engine.name + ': ' if engine.name else ''}{engine.skipped}", target=target)
    if not engine.ok:
        return failed("probe.engine", f"{engine.name or expect.engine or 'the engine'}{on}: {clip(engine.error)}",
                      "the nodes need the engine (and the image's definition or cache on a shared filesystem); "
                      "or set the module's runtime:", target=target)
    return passed("probe.engine", f"{engine.name} ran {engine.image}{on} ({clip(engine.version, 60)})", target=target)


def path_check(check_id: str, facts: PathFacts | None, warn_below: int, on: str = "", target: str = "") -> Check:
    """A directory the probe wrote to: writable, and how much room is left."""
    what = "local scratch" if check_id.endswith("scratch") else "work root"
    hint = ("local_scratch (clusters:) / SCALEBOX_LOCAL_SCRATCH must be a writable node-local directory with room"
            if what == "local scratch" else
            "SCALEBOX_WORK_ROOT must be writable, with room, on a filesystem the login and compute nodes share")
    if facts is None:
        return failed(check_id, f"the probe did not report its {what}", hint, target=target)
    room = f"{_size(facts.free_bytes)} free of {_size(facts.total_bytes)}"
    if not facts.writable:
        return failed(check_id, f"cannot write to the {what} {facts.path}{on}: {clip(facts.error)} ({room})",
                      hint, target=target)
    if facts.free_bytes is not None and facts.free_bytes < warn_below:
        return warned(check_id, f"{what} {facts.path}{on}: only {room}", hint, target=target)
    return passed(check_id, f"{what} {facts.path}{on}: writable, {room}", target=target)


def _resources_check(report: ProbeReport, on: str, target: str) -> Check:
    res = report.resources
    cpus = f"{res.cpus_usable if res.cpus_usable is not None else '?'} of {res.cpus_online or '?'} CPUs usable"
    mem = f"memory {_size(res.memory_available_bytes)} available of {_size(res.memory_total_bytes)}"
    return passed("probe.resources", f"{cpus}, {mem}{on}", target=target)


def _gpu_check(report: ProbeReport, expect: Expectations, on: str, target: str) -> Check:
    gpu = report.gpu
    hint = "the module asks for a GPU (gres): check the partition's GPUs and the node's driver (`nvidia-smi -L`)"
    if gpu.devices:
        return passed("probe.gpu", f"{len(gpu.devices)} GPU(s){on}: {clip('; '.join(gpu.devices), 120)}",
                      target=target)
    if not expect.gpu:
        why = f"nvidia-smi: {clip(gpu.error, 80)}" if gpu.error else "none listed" if gpu.tool else "no nvidia-smi"
        return skipped("probe.gpu", f"no GPU visible{on} ({why}); no module asks for one", target=target)
    return failed("probe.gpu", f"no GPU visible{on}" + (f": {clip(gpu.error)}" if gpu.error else ""), hint,
                  target=target)


def _mpi_check(report: ProbeReport, expect: Expectations, on: str, target: str) -> Check:
    mpi = report.mpi
    if "pmi2" in mpi.plugins:
        return passed("probe.mpi", f"srun offers pmi2{on} ({clip(', '.join(mpi.plugins), 80)})", target=target)
    text = (f"no srun{on}" if not mpi.srun else
            f"srun --mpi=list{on} lacks pmi2 ({clip(', '.join(mpi.plugins) or mpi.error or 'nothing listed', 80)})")
    hint = "MPI stages start their ranks with `srun --mpi=pmi2`: ask the site for Slurm's pmi2 plug-in"
    if expect.mpi:
        return failed("probe.mpi", text, hint, target=target)
    return warned("probe.mpi", text, hint + " (only MPI stages need it)", target=target)


def failed_embedded(error: str, hint: str) -> Check:
    """No DSN configured and the embedded server would not start."""
    return failed("db.dsn", f"no SCALEBOX_DSN, and the embedded database did not start: {clip(error)}",
                  hint or "set SCALEBOX_DSN to a PostgreSQL server, or see `scalebox db status`")

"""``scalebox doctor``: checks a new user runs first, each pass/warn/fail with a one-line hint.

::

    result.py   Check, Status: what a check says (a stable id, one line, a hint)
    checks.py   the judgements: pure functions from facts to checks
    plan.py     what a pipeline asks of the site (clusters, partitions, engines, probe placements)
    gather.py   the facts: the database, Slurm through the adapter, engines, the probe jobs
    probe.py    the probe a job runs on a compute node (``python -m scalebox_hpc doctor-probe``)
    report.py   the probe's one-line JSON report and its parser
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scalebox_hpc.doctor import checks, gather
from scalebox_hpc.doctor.plan import Plan, ProbeTarget, SlurmTarget, make_plan
from scalebox_hpc.doctor.result import Check, Status, exit_code, skipped
from scalebox_hpc.slurm.commands import CommandRunner, SubprocessRunner

__all__ = ["Check", "Plan", "Services", "Settings", "Status", "diagnose", "exit_code", "make_plan"]


def _runner(env: Mapping[str, str] | None) -> CommandRunner:
    return SubprocessRunner(base_env=env)


def _user_name() -> str:
    import getpass

    return getpass.getuser()  # USER/LOGNAME, else the password database


def _start_embedded() -> str:
    from scalebox_hpc import embedded

    return embedded.ensure_running()


@dataclass
class Settings:
    """What to check: the plan, the stage jobs' interpreter and work root, whether to probe."""

    plan: Plan
    python: str
    work_root: Path
    probe: bool = True
    probe_timeout: float = 300.0
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    user: str = field(default_factory=_user_name)
    """Whose Slurm associations are checked (sacctmgr ``user=``)."""


@dataclass
class Services:
    """The doctor's outside world, replaced in tests."""

    runner: Callable[[Mapping[str, str] | None], CommandRunner] = _runner
    """A command runner whose children get this environment (None: this process's)."""
    which: Callable[[str], str | None] = shutil.which
    start_embedded: Callable[[], str] = _start_embedded
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic


def diagnose(settings: Settings, services: Services | None = None) -> list[Check]:
    """Run every check of ``settings.plan``, in order: database, Slurm, engines, probe jobs."""
    services = services or Services()
    db = gather.database(settings.environ, services.start_embedded)
    found = list(db.checks)
    clients = gather.runner_clients(services.runner(None))
    working: dict[str, bool] = {}
    for target in settings.plan.targets or [SlurmTarget()]:
        slurm_checks, working[target.cluster] = gather.slurm(target, clients, settings.user)
        found += slurm_checks
    found += _engines(settings.plan, services, any(working.values()))
    found += _probes(settings, services, db.dsn, working)
    return found


def _engines(plan: Plan, services: Services, slurm: bool) -> list[Check]:
    from scalebox_hpc.runtime.choose import ENGINES

    if not plan.source:
        return [checks.no_engine_check([e for e in ENGINES if services.which(e)])]
    if not plan.engines:
        return [skipped("engine.present", "no module has a base_image: nothing runs in a container")]
    # with Slurm the stage jobs run elsewhere: an engine missing here is the probe's to judge
    runner = services.runner(None)
    return [gather.engine(name, runner, services.which, needed=not slurm) for name in plan.engines]


def _probes(settings: Settings, services: Services, dsn: str | None, working: Mapping[str, bool]) -> list[Check]:
    if not settings.probe:
        return [skipped("probe.job", "not run (--no-probe)")]
    out: list[Check] = []
    ready: list[ProbeTarget] = []
    for target in settings.plan.probes:
        if not working.get(target.cluster, False):
            out.append(skipped("probe.job", "not run: Slurm does not work here (see slurm.*)", target=target.label))
        elif dsn is None:
            out.append(skipped("probe.job", "not run: the database is not reachable from here (see db.*)",
                               target=target.label))
        else:
            ready.append(target)
    if not ready:
        return out
    from scalebox_hpc.autoscaler import submit_environment

    assert dsn is not None
    clients = gather.runner_clients(services.runner(submit_environment(dsn, dict(settings.environ))))
    outcomes = gather.run_probes(ready, clients, python=settings.python, work_root=settings.work_root,
                                 timeout=settings.probe_timeout, sleep=services.sleep, monotonic=services.monotonic)
    for outcome in outcomes:
        label = outcome.target.label
        out.append(checks.job_check(outcome.job_id, outcome.state, outcome.reason, outcome.error, label))
        if outcome.report is not None:
            out += checks.probe_checks(outcome.report, _expect(settings, outcome.target), label)
    return out


def _expect(settings: Settings, target: ProbeTarget) -> checks.Expectations:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("scalebox_hpc")
    except PackageNotFoundError:
        installed = ""
    return checks.Expectations(python=settings.python, python_version=platform.python_version(),
                               scalebox=installed, engine=target.engine, gpu=target.gpu, mpi=target.mpi)

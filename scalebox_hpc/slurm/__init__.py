"""The Slurm adapter: argv renderer + injected ``CommandRunner`` + pure parsers.

::

    commands.py     CommandRunner Protocol, SubprocessRunner, SlurmCommandError
    parse.py        SlurmState, JobInfo, parsers for sbatch/squeue/sacct/scontrol output, hostlists
    client.py       SlurmClient: submit, status (batched squeue + sacct), cancel, job_end_time
    scheduler.py    SchedulerClient Protocol: what the autoscaler calls (SlurmClient implements it)
    watcher.py      StatusWatcher: one rate-limited status query for every followed job
    environment.py  JobEnvironment: the SLURM_* variables of the job this process runs in

Drives the Slurm CLI (``--parsable``, ``--json``, ``scontrol -o``): no pyslurm build exists
for Slurm 22.05 on PyPI, and the CLI is what every site has.
"""

from __future__ import annotations

from scalebox_hpc.slurm.client import SlurmClient
from scalebox_hpc.slurm.commands import (
    SLURM_ENV,
    CommandResult,
    CommandRunner,
    SlurmCommandError,
    SubprocessRunner,
)
from scalebox_hpc.slurm.environment import JobEnvironment, NotInSlurmJobError, in_slurm_job
from scalebox_hpc.slurm.parse import JobInfo, SlurmParseError, SlurmState, expand_hostlist, translate_state
from scalebox_hpc.slurm.scheduler import SchedulerClient
from scalebox_hpc.slurm.watcher import StatusWatcher

__all__ = [
    "SLURM_ENV",
    "CommandResult",
    "CommandRunner",
    "JobEnvironment",
    "JobInfo",
    "NotInSlurmJobError",
    "SchedulerClient",
    "SlurmClient",
    "SlurmCommandError",
    "SlurmParseError",
    "SlurmState",
    "StatusWatcher",
    "SubprocessRunner",
    "expand_hostlist",
    "in_slurm_job",
    "translate_state",
]

"""``JobEnvironment``: what a process inside a Slurm job learns from its ``SLURM_*`` variables.

Read once, from a mapping passed in (``os.environ`` by default), never modified. Variable
names are those Slurm 22.05 sets in batch scripts and ``srun`` tasks; ``SLURM_JOB_END_TIME``
(epoch seconds) only exists in newer releases, so ``end_time`` may be None: ask
``SlurmClient.job_end_time`` then.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.slurm.parse import expand_hostlist


class NotInSlurmJobError(ScaleboxError):
    """This process is not running inside a Slurm job (SLURM_JOB_ID is not set)."""

    hint = "start it with sbatch or srun, or run the launcher without Slurm integration"


class SlurmEnvironmentError(ScaleboxError):
    """A SLURM_* variable has a value that cannot be parsed."""


_ENV: dict[str, tuple[str, ...]] = {
    "job_id": ("SLURM_JOB_ID", "SLURM_JOBID"),
    "array_job_id": ("SLURM_ARRAY_JOB_ID",),
    "array_task_id": ("SLURM_ARRAY_TASK_ID",),
    "node_name": ("SLURMD_NODENAME",),
    "node_list": ("SLURM_JOB_NODELIST", "SLURM_NODELIST"),
    "num_nodes": ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"),
    "procid": ("SLURM_PROCID",),
    "localid": ("SLURM_LOCALID",),
    "nodeid": ("SLURM_NODEID",),
    "ntasks": ("SLURM_NTASKS", "SLURM_NPROCS"),
    "cpus_per_task": ("SLURM_CPUS_PER_TASK",),
    "end_time": ("SLURM_JOB_END_TIME",),
    "job_name": ("SLURM_JOB_NAME",),
    "partition": ("SLURM_JOB_PARTITION",),
}
"""Each property and the variables it is read from, first one set wins."""


_CPUS_GROUP = re.compile(r"([0-9]{1,7})(?:\(x([0-9]{1,7})\))?\Z")


def cpus_per_node_total(text: str) -> int | None:
    """The CPUs of ``SLURM_JOB_CPUS_PER_NODE`` (``72``, ``4(x2),2``: per node, ``(xN)`` for N
    nodes alike) summed over the job's nodes; None for anything else. Total for any text."""
    total = 0
    for group in text.strip().split(","):
        match = _CPUS_GROUP.match(group.strip())
        if match is None:
            return None
        total += int(match.group(1)) * int(match.group(2) or 1)
    return total or None


def allocated_cpus(environ: Mapping[str, str] | None = None) -> int | None:
    """The CPUs allocated to the job this process runs in, all its nodes: from
    ``SLURM_JOB_CPUS_PER_NODE``, else ``SLURM_CPUS_ON_NODE`` x the node count; None when
    neither says (no Slurm call: a stage job's core-hours must not cost RPCs)."""
    env = os.environ if environ is None else environ
    total = cpus_per_node_total(env.get("SLURM_JOB_CPUS_PER_NODE", ""))
    if total is not None:
        return total
    per_node = env.get("SLURM_CPUS_ON_NODE", "").strip()
    nodes = (_get(env, "num_nodes") or "1").strip()
    if per_node.isascii() and per_node.isdigit() and nodes.isascii() and nodes.isdigit() and int(per_node) > 0:
        return int(per_node) * max(1, int(nodes))
    return None


def in_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``environ`` (default: this process's environment) belongs to a Slurm job."""
    return _get(os.environ if environ is None else environ, "job_id") is not None


def _get(environ: Mapping[str, str], prop: str) -> str | None:
    for name in _ENV[prop]:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def _int(environ: Mapping[str, str], prop: str, default: int | None = None) -> int | None:
    value = _get(environ, prop)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise SlurmEnvironmentError(f"{_ENV[prop][0]}={value!r} is not an integer") from exc


@dataclass(frozen=True)
class JobEnvironment:
    """The Slurm job (and task) this process runs in.

    ``procid``/``localid``/``nodeid`` are 0 in a batch script (one task, on the first node);
    ``ntasks`` is None when the job did not ask for a task count.
    """

    job_id: str
    node_name: str
    node_list: list[str] = field(default_factory=list)
    num_nodes: int = 1
    procid: int = 0
    localid: int = 0
    nodeid: int = 0
    ntasks: int | None = None
    cpus_per_task: int | None = None
    end_time: datetime | None = None
    array_job_id: str | None = None
    array_task_id: str | None = None
    job_name: str = ""
    partition: str = ""
    cpus: int | None = None
    """The CPUs allocated to the whole job (:func:`allocated_cpus`); None when not told."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobEnvironment:
        """Read the job environment; raises ``NotInSlurmJobError`` outside a job."""
        env = os.environ if environ is None else environ
        job_id = _get(env, "job_id")
        if job_id is None:
            raise NotInSlurmJobError()
        nodes = expand_hostlist(_get(env, "node_list"))
        end = _int(env, "end_time")
        return cls(
            job_id=job_id,
            node_name=_get(env, "node_name") or (nodes[0] if nodes else ""),
            node_list=nodes,
            num_nodes=_int(env, "num_nodes", len(nodes) or 1) or 1,
            procid=_int(env, "procid", 0) or 0,
            localid=_int(env, "localid", 0) or 0,
            nodeid=_int(env, "nodeid", 0) or 0,
            ntasks=_int(env, "ntasks"),
            cpus_per_task=_int(env, "cpus_per_task"),
            end_time=datetime.fromtimestamp(end, tz=UTC) if end else None,
            array_job_id=_get(env, "array_job_id"),
            array_task_id=_get(env, "array_task_id"),
            job_name=_get(env, "job_name") or "",
            partition=_get(env, "partition") or "",
            cpus=allocated_cpus(env),
        )

    @property
    def is_first_task(self) -> bool:
        """True for the task with global rank 0 (the batch script itself, or srun task 0)."""
        return self.procid == 0

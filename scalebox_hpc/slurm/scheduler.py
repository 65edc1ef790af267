"""The scheduler port of the autoscaler: what an autoscale pass calls of a cluster's batch
scheduler, as a Protocol (:class:`SchedulerClient`). :class:`~scalebox_hpc.slurm.client.SlurmClient`,
the Slurm CLI adapter, implements it; so do the in-memory fakes of the tests, checked by mypy
without casts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from scalebox_hpc.slurm.parse import JobInfo, NodeInfo


class SchedulerClient(Protocol):
    """Submit, query and cancel the stage jobs of one cluster, ask which nodes are free, and count
    the commands run (each pass's calls count against the cluster's budget by the difference)."""

    @property
    def commands_run(self) -> int:
        """Commands run so far that reached the scheduler."""

    def submit(self, script: str, extra_args: Sequence[str] = ()) -> str:
        """Submit a job script (sbatch); its job id."""

    def status(self, job_ids: Iterable[str]) -> Mapping[str, JobInfo]:
        """What the scheduler knows of these jobs (one batched query); a job it forgot is absent."""

    def cancel(self, job_ids: Iterable[str], signal: str | None = None) -> None:
        """Cancel these jobs (or send them ``signal``)."""

    def nodes(self, names: Iterable[str], partition: str | None = None) -> Mapping[str, NodeInfo]:
        """State and idle CPUs of these nodes (those the scheduler knows)."""

"""How a module reaches Slurm: the ``slurm:`` spec (stage jobs), the ``clusters:`` it may name, and
Slurm time limits."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from scalebox_hpc.pipeline.parameters import _CONFIG


def walltime_seconds(text: str) -> int:
    """Seconds of a Slurm time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``."""
    value = text.strip()
    day = re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?(?::(\d+))?", value)
    if day:
        d, h, m, sec = (int(x or 0) for x in day.groups())
        return ((d * 24 + h) * 60 + m) * 60 + sec
    parts = value.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        raise ValueError(f"time {text!r} is not a Slurm time limit (MM, MM:SS, HH:MM:SS or D-HH:MM:SS)")
    nums = [int(p) for p in parts]
    if len(nums) == 1:
        return nums[0] * 60
    if len(nums) == 2:
        return nums[0] * 60 + nums[1]
    return (nums[0] * 60 + nums[1]) * 60 + nums[2]


class SlurmSpec(BaseModel):
    """How a module runs as Slurm stage jobs (``slurm:`` of a module, over the app's ``slurm:`` defaults)."""

    model_config = _CONFIG

    nodes: int = Field(default=1, ge=1)
    slots_per_node: int | None = Field(default=None, ge=1)
    """None: from the module's ``slots`` (the counts whose host regex matches the node)."""
    cpus_per_slot: int = Field(default=1, ge=1)
    mem: str | None = None
    gres: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra_sbatch_args: list[str] = Field(default_factory=list)
    min_jobs: int = Field(default=0, ge=0)
    max_jobs: int = Field(default=1, ge=0)
    tasks_per_job: int = Field(default=1, ge=1)
    """READY tasks per stage job when scaling: ``ceil(ready / tasks_per_job)`` jobs, within min..max."""
    signal_grace_seconds: int = Field(default=60, ge=1)
    """``--signal=B:USR1@N``: the launchers drain this long before the time limit."""
    template: str | None = None
    """A site's sbatch template (default: launchers/slurm/stage.sbatch shipped with scalebox_hpc)."""
    locality: Literal["nodelist", "off"] = "nodelist"
    """``nodelist``: a new stage job asks (``sbatch --nodelist``) for the available nodes whose
    scratch holds most input of the module's READY tasks, the rest left to Slurm; ``off``:
    any nodes (a site that forbids --nodelist, or inputs not in node-local scratch)."""
    cluster: str | None = None
    """The Slurm cluster of the stage jobs (the module's ``cluster:``, declared under ``clusters:``);
    None: the submitting host's default cluster."""
    submit_via: list[str] = Field(default_factory=list)
    """Argv put before every Slurm command for this cluster (``[ssh, login2]``); empty: ``-M cluster``."""
    local_scratch: str | None = None
    """The cluster's node-local scratch root (``${HOST}`` allowed), given to its launchers."""
    data_root: str | None = None
    """The cluster's data root (SCALEBOX_DATA_ROOT of its launchers)."""

    @field_validator("extra_sbatch_args", mode="before")
    @classmethod
    def _args(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None:
            walltime_seconds(value)
        return value

    @model_validator(mode="after")
    def _bounds(self) -> SlurmSpec:
        if self.min_jobs > self.max_jobs:
            raise ValueError(f"min_jobs {self.min_jobs} is above max_jobs {self.max_jobs}")
        return self

    @property
    def time_seconds(self) -> int | None:
        """The time limit in seconds, None when unset (the partition's default)."""
        return None if self.time is None else walltime_seconds(self.time)


class ClusterSpec(BaseModel):
    """A Slurm cluster an app's modules may run on (``clusters: {NAME: ...}``)."""

    model_config = _CONFIG

    slurm: dict[str, Any] = Field(default_factory=dict)
    """Defaults for the ``slurm:`` of the modules on this cluster (over the app's, under the module's)."""
    submit_via: list[str] = Field(default_factory=list)
    """Argv before every Slurm command (``[ssh, login2]``: only that login node can submit); empty:
    the clusters share a slurmdbd and commands reach this one with ``-M NAME``."""
    local_scratch: str | None = None
    """Node-local scratch on this cluster's nodes (``${HOST}`` allowed)."""
    data_root: str | None = None
    """The data root on this cluster (SCALEBOX_DATA_ROOT of its launchers)."""

    @field_validator("submit_via", mode="before")
    @classmethod
    def _argv(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value


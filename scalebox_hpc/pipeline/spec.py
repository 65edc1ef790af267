"""The stored specs: a module (:class:`ModuleSpec`, with its MPI use) and the whole app (:class:`AppSpec`).

These models never touch the filesystem: launchers on other hosts re-validate the stored specs
with ``ModuleSpec.model_validate(data)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from scalebox_hpc.pipeline.parameters import (
    _CONFIG,
    AppParameters,
    ModuleArguments,
    ModuleParameters,
    SlotSpec,
    _str_list,
    _upper,
)
from scalebox_hpc.pipeline.remotes import Remote, module_remote, remote_dsn
from scalebox_hpc.pipeline.slurm import ClusterSpec, SlurmSpec

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HANDLER = re.compile(r"[^:\s]+:[A-Za-z_][A-Za-z0-9_]*")
"""``file.py:function`` or ``package.module:function``."""


def _env_text(value: Any) -> Any:
    """A YAML scalar as an environment value (``true``/``false`` for booleans, ``""`` for null)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return value


class MpiSpec(BaseModel):
    """How a module uses MPI (``mpi:`` in the pipeline file).

    - ``mode: farm``: the module runs as one MPI stage job, one rank per slot; rank 0 alone
      talks to the database and hands tasks (claimed ``batch`` at a time) to idle ranks;
    - ``mode: collective``: every task goes to every rank; ``handler`` (``file.py:function``
      relative to code_path, or ``package.module:function``) runs on all of them with the
      communicator (see :mod:`scalebox_hpc.mpi`);
    - no mode, ``ranks: K``: ordinary slots, but each run.sh is an MPI program launched with
      ``srun -n K`` (``mpiexec -n K`` outside Slurm); a task's ``ranks`` header overrides K, up
      to ``max_ranks`` (default K). Modules without ``ranks`` ignore the header.

    ``ranks_per_node`` is what a stage job asks Slurm for (one rank per slot).
    """

    model_config = _CONFIG

    mode: Literal["farm", "collective"] | None = None
    ranks_per_node: int | None = Field(default=None, ge=1)
    ranks: int | None = Field(default=None, ge=1)
    max_ranks: int | None = Field(default=None, ge=1)
    """The most ranks a task's ``ranks`` header may ask for (None: ``ranks``); outside Slurm it
    also allows more ranks than the host has CPUs (see :mod:`scalebox_hpc.launcher.mpirun`)."""
    batch: int | None = Field(default=None, ge=1)
    handler: str | None = None

    @field_validator("mode", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() or None if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> MpiSpec:
        if self.mode == "collective" and not self.handler:
            raise ValueError("mode collective needs a handler (file.py:function or package.module:function)")
        if self.handler is not None and self.mode != "collective":
            raise ValueError("handler is only used by mode collective")
        if self.handler is not None and not _HANDLER.fullmatch(self.handler):
            raise ValueError(f"handler {self.handler!r} is not file.py:function or package.module:function")
        if self.ranks is not None and self.mode is not None:
            raise ValueError(f"ranks is for MPI tasks of ordinary slots; mode {self.mode} runs one rank per slot")
        if self.max_ranks is not None and self.ranks is None:
            raise ValueError("max_ranks needs ranks (MPI tasks of ordinary slots)")
        if self.max_ranks is not None and self.ranks is not None and self.max_ranks < self.ranks:
            raise ValueError(f"max_ranks {self.max_ranks} is below ranks {self.ranks}")
        if self.mode is None and (self.ranks_per_node is not None or self.batch is not None):
            raise ValueError("ranks_per_node and batch need mode farm or collective")
        return self


class RemoteSpec(BaseModel):
    """Another cluster's database and the app there (``remotes: {NAME: {dsn: ..., app_id: N}}``):
    the native form of a module's REMOTE_SERVER + APP_ID, named by a module's ``remote: NAME``."""

    model_config = _CONFIG

    dsn: str
    """As REMOTE_SERVER: a URI, a ``key=value`` string, or a host name with an optional port."""
    app_id: int = Field(ge=1)

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        remote_dsn(value)
        return value.strip()


def _default_slots() -> list[SlotSpec]:
    return [SlotSpec(host_regex=".*", count=1)]


class ModuleSpec(BaseModel):
    """One module (stage) of a pipeline, as stored in the database and used by launchers."""

    model_config = _CONFIG

    name: str
    base_image: str | None = None
    code_path: Path
    environments: dict[str, str] = Field(default_factory=dict)
    volumes: list[str] = Field(default_factory=list)
    slots: list[SlotSpec] = Field(default_factory=_default_slots)
    sink_modules: list[str] = Field(default_factory=list)
    schedule_mode: str | None = None
    arguments: ModuleArguments = Field(default_factory=ModuleArguments)
    parameters: ModuleParameters = Field(default_factory=ModuleParameters)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    mpi: MpiSpec = Field(default_factory=MpiSpec)
    handler: str | None = None
    remote: str | None = None
    """A remote declared under ``remotes:``: this module's sinks that are not modules of the file
    are modules of the app there (the native form of REMOTE_SERVER + APP_ID)."""
    cluster: str | None = None
    """The cluster (declared under ``clusters:``) whose Slurm runs this module's stage jobs;
    default: the app's ``cluster`` when declared there, else the submitting host's."""
    """In-slot Python task handler (``file.py:function`` relative to code_path, or
    ``package.module:function``): each slot keeps one Python worker process that calls it per
    task instead of running run.sh (see :mod:`scalebox_hpc.launcher.pyworker`)."""

    @field_validator("handler", mode="before")
    @classmethod
    def _handler_spec(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip() or None
        if isinstance(value, str) and not _HANDLER.fullmatch(value):
            raise ValueError(f"handler {value!r} is not file.py:function or package.module:function")
        return value

    @model_validator(mode="after")
    def _handler_alone(self) -> ModuleSpec:
        if self.handler is None:
            return self
        if self.mpi.mode is not None or self.mpi.ranks is not None:
            raise ValueError("handler runs in ordinary slots without MPI; a collective stage names mpi: {handler: ...}")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _MODULE_NAME.fullmatch(value):
            raise ValueError(f"module name {value!r} must be letters, digits, '_', '.' or '-'")
        return value

    @field_validator("code_path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"code_path {str(value)!r} must be absolute")
        return value

    @field_validator("environments", mode="before")
    @classmethod
    def _environments(cls, value: Any) -> Any:
        """Accept ``["K=V", ...]`` (Scalebox) or a mapping."""
        if isinstance(value, list):
            pairs: dict[str, Any] = {}
            for item in value:
                if not isinstance(item, str) or "=" not in item:
                    raise ValueError(f"environment entry {item!r} is not KEY=VALUE")
                key, _, val = item.partition("=")
                pairs[key.strip()] = val
            value = pairs
        if isinstance(value, Mapping):
            return {str(k): _env_text(v) for k, v in value.items()}
        return value

    @field_validator("environments")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"environment name {key!r} is not a valid variable name")
        return value

    @field_validator("volumes", "slots", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("base_image", mode="before")
    @classmethod
    def _no_image(cls, value: Any) -> Any:
        """An empty base_image (e.g. ``${IMAGE}`` with IMAGE unset) runs the module bare."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("volumes")
    @classmethod
    def _no_empty_volumes(cls, value: list[str]) -> list[str]:
        """An empty entry (e.g. ``${VOLUME}`` with VOLUME unset) adds no bind."""
        return [v for v in value if v.strip()]

    @field_validator("sink_modules", mode="before")
    @classmethod
    def _sinks(cls, value: Any) -> Any:
        return _str_list(value)

    @field_validator("slots")
    @classmethod
    def _some_slots(cls, value: list[SlotSpec]) -> list[SlotSpec]:
        if not value:
            raise ValueError("slots is empty (omit it for one slot on any host)")
        return value

    @field_validator("schedule_mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        value = _upper(value)
        return value or None

    def script(self, name: str) -> Path | None:
        """``code_path/name`` if that file exists (``run.sh``, ``setup.sh``, ``check.sh``, ``teardown.sh``)."""
        path = self.code_path / name
        return path if path.is_file() else None


class AppSpec(BaseModel):
    """A validated pipeline: the app, its parameters and its modules in file order."""

    model_config = _CONFIG

    name: str
    label: str | None = None
    cluster: str | None = None
    clusters: dict[str, ClusterSpec] = Field(default_factory=dict)
    """The Slurm clusters modules may name (one database, several clusters)."""
    remotes: dict[str, RemoteSpec] = Field(default_factory=dict)
    """Other clusters' databases and apps, named by a module's ``remote:`` (one database per cluster)."""
    parameters: AppParameters = Field(default_factory=AppParameters)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    """Defaults for every module's ``slurm:`` (each module's keys win)."""
    modules: list[ModuleSpec]
    app_dir: Path
    variables: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the app name is empty")
        return value

    @field_validator("modules")
    @classmethod
    def _modules(cls, value: list[ModuleSpec]) -> list[ModuleSpec]:
        if not value:
            raise ValueError("at least one module is required")
        seen: set[str] = set()
        for module in value:
            if module.name in seen:
                raise ValueError(f"duplicate module name {module.name!r}")
            seen.add(module.name)
        return value

    @field_validator("app_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"app_dir {str(value)!r} must be absolute")
        return value

    def module(self, name: str) -> ModuleSpec:
        """The module called ``name``; KeyError when there is none."""
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(name)

    def remote_sinks(self) -> dict[str, Remote]:
        """The sinks that name a module of another app in another database: every sink of a
        module whose environments carry REMOTE_SERVER and APP_ID that is not a module here.
        ValueError when two modules send to one sink name at different remotes."""
        names = {m.name for m in self.modules}
        out: dict[str, Remote] = {}
        for module in self.modules:
            remote = self.module_remote(module)
            for sink in module.sink_modules:
                if sink in names or remote is None:
                    continue
                if out.setdefault(sink, remote) != remote:
                    raise ValueError(f"sink {sink!r} is named at two remotes: {out[sink]} and {remote}")
        return out

    def module_remote(self, module: ModuleSpec) -> Remote | None:
        """Where ``module``'s sinks not in the file live: its REMOTE_SERVER + APP_ID, else its
        ``remote:`` (KeyError when that names no entry of ``remotes:``), else None."""
        remote = module_remote(module.environments)
        if remote is None and module.remote is not None:
            entry = self.remotes[module.remote]
            remote = Remote(entry.dsn, entry.app_id)
        return remote

"""Load and validate pipeline files (``app.yaml``) into frozen, JSON-round-trippable specs.

A pipeline file names an app and its modules (Scalebox style)::

    name: app-primes
    parameters: {start_task: start}
    modules:
      scatter: {sink_modules: [calc]}
      calc:
        sink_modules: [gather]
        environments: [LENGTH=${LENGTH}]
        slots: [".*:2"]
      gather: {}

:func:`load_pipeline` reads the file with ``yaml.compose`` so that every error names
``file:line: key.path``, substitutes ``${VAR}`` / ``${VAR:-default}`` from env files and the
environment, accepts the 2023 aliases (``jobs``, ``sink_jobs``, ``hosts`` ...), resolves each
module's ``code_path`` and checks that it holds a ``run.sh``. YAML aliases are expanded, but a
file that expands to more than :data:`MAX_YAML_NODES` nodes or :data:`MAX_YAML_DEPTH` levels, or
whose anchors contain themselves, is refused (files from others may be validated, ``app create --check``).

The models themselves never touch the filesystem: launchers on other hosts re-validate the
stored specs with ``ModuleSpec.model_validate(data)``.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scalebox_hpc.errors import PipelineError
from scalebox_hpc.models import ConflictAction

logger = logging.getLogger(__name__)

DEFAULT_ENV_FILE = "scalebox.env"
"""Read from the app dir (when present) before any ``-e`` file."""
STANDARD_PREFIX = "scalebox:"
STANDARD_MODULES = Path(__file__).resolve().parent / "modules"
"""The standard modules (``code_path: scalebox:list-dir``), shipped inside the package."""

_CONFIG = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_YAML_NODES = 100_000
"""Nodes (keys, values, list items) a pipeline file may expand to once its aliases are expanded:
a few hundred bytes of nested anchors would otherwise expand to millions of nodes (an alias bomb)."""
MAX_YAML_DEPTH = 100
"""How deeply mappings and lists may nest, aliases expanded (PyYAML composes recursively)."""

_HANDLER = re.compile(r"[^:\s]+:[A-Za-z_][A-Za-z0-9_]*")
"""``file.py:function`` or ``package.module:function``."""
_SLOT = re.compile(r"(?P<regex>.*):\s*(?P<count>[+-]?\w+)\s*", re.DOTALL)
_RETRY_RULE = re.compile(r"(\*|-?\d+)(:\d+)?")


# -- models -------------------------------------------------------------------------------------
def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _str_list(value: Any, sep: str = ",") -> Any:
    """A single string becomes a list (split on ``sep``); anything else is left to pydantic."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(sep) if part.strip()]
    return value


def _env_text(value: Any) -> Any:
    """A YAML scalar as an environment value (``true``/``false`` for booleans, ``""`` for null)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return value


def parse_slot(text: str) -> dict[str, Any]:
    """Parse ``hostRegex[:n]`` into ``{"host_regex": ..., "count": n}`` (n defaults to 1)."""
    text = text.strip()
    match = _SLOT.fullmatch(text)
    if match is None:
        return {"host_regex": text, "count": 1}
    count = match["count"]
    if not re.fullmatch(r"[+-]?\d+", count):
        raise ValueError(f"slot {text!r}: count {count!r} is not an integer (expected hostRegex[:n])")
    if int(count) < 1:
        raise ValueError(f"slot {text!r}: count must be at least 1")
    return {"host_regex": match["regex"].strip(), "count": int(count)}


class SlotSpec(BaseModel):
    """``count`` slots on every host whose name fully matches ``host_regex``."""

    model_config = _CONFIG

    host_regex: str
    count: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        return parse_slot(data) if isinstance(data, str) else data

    @field_validator("host_regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        if not value:
            raise ValueError("empty host regex (use '.*' for any host)")
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid host regex {value!r}: {exc}") from None
        return value

    def __str__(self) -> str:
        return f"{self.host_regex}:{self.count}"


class ModuleArguments(BaseModel):
    """How the launcher runs a module's slots; also exported to its scripts (:meth:`as_env`)."""

    model_config = _CONFIG

    task_max_seconds: float | None = Field(default=None, gt=0)
    max_idle_polls: int = Field(default=30, ge=0)
    sleep_interval_seconds: float = Field(default=1.0, gt=0)
    slot_options: list[str] = Field(default_factory=list)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    conflict_action: ConflictAction = ConflictAction.FAIL
    max_messages: int = Field(default=100_000, ge=1)
    """Messages one task may emit; more makes the task fail with -102 and emit none (split the work)."""
    # stored now, implemented by later issues
    dir_limit_gb: dict[str, float] | None = None
    free_space_gb: float | None = Field(default=None, ge=0)
    max_pending: int | None = Field(default=None, ge=1)
    semaphore: str | None = None
    task_dist_mode: Literal["HOST-BOUND", "SLOT-BOUND"] | None = None
    locality_wait_seconds: float | None = Field(default=None, ge=0)
    """How long a task waits for the host holding its inputs before any host may take it (default 10)."""
    input_regex: str | None = None
    """Inputs from the body when a task has no ``inputs`` header: PostgreSQL regex, group 1 or the match."""
    runtime: Literal["local", "apptainer", "podman", "docker", "auto"] | None = None
    """The container engine (None: the host's SCALEBOX_RUNTIME when the module has a base_image)."""

    @field_validator("runtime", mode="before")
    @classmethod
    def _runtime_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("conflict_action", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return _upper(value)

    @field_validator("task_dist_mode", mode="before")
    @classmethod
    def _dist_mode(cls, value: Any) -> Any:
        value = _upper(value)
        return value.replace("_", "-") if isinstance(value, str) else value

    @field_validator("slot_options", mode="before")
    @classmethod
    def _options(cls, value: Any) -> Any:
        value = _str_list(value)
        return [v.strip().lower() if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @property
    def always_running(self) -> bool:
        """Slots keep polling instead of exiting after ``max_idle_polls`` empty polls."""
        return "always_running" in self.slot_options

    def as_env(self) -> dict[str, str]:
        """Every set argument as ``UPPER_CASE=value`` (lists and dicts as JSON, ``60.0`` as ``60``)."""
        return {name.upper(): _env_value(v) for name, v in self.model_dump(mode="json").items() if v is not None}


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


class ModuleParameters(BaseModel):
    """Per-module parameters: a start task and retry rules (``code[:times]`` or ``*``)."""

    model_config = _CONFIG

    start_task: str | None = None
    retry_rules: list[str] = Field(default_factory=list)

    @field_validator("retry_rules", mode="before")
    @classmethod
    def _rules_text(cls, value: Any) -> Any:
        """Accept the Scalebox string form ``"['1','2:3','*']"``."""
        if isinstance(value, str):
            inner = value.strip()
            if inner.startswith("[") and inner.endswith("]"):
                inner = inner[1:-1]
            return [part.strip().strip("'\"").strip() for part in inner.split(",") if part.strip().strip("'\"")]
        return value

    @field_validator("retry_rules")
    @classmethod
    def _rules_syntax(cls, value: list[str]) -> list[str]:
        for rule in value:
            if not _RETRY_RULE.fullmatch(rule):
                raise ValueError(f"retry rule {rule!r} is not CODE, CODE:TIMES or *")
        return value


class AppParameters(BaseModel):
    """App-level parameters."""

    model_config = _CONFIG

    initial_status: Literal["RUNNING", "INITIAL"] = "RUNNING"
    start_task: str | None = None

    @field_validator("initial_status", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return _upper(value)


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


# -- variables ----------------------------------------------------------------------------------
_REFERENCE = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)(?P<close>\}?)")
_REFERENCE_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>.*))?", re.DOTALL)


class _ExpandError(ValueError):
    pass


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Replace ``${VAR}``, ``${VAR:-default}`` (unset or empty) and ``${VAR-default}`` (unset);
    ``$${`` is a literal ``${``. Raises ValueError for undefined or malformed references."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        body = match["body"]
        if not match["close"]:
            raise _ExpandError(f"unterminated variable reference '${{{body}'")
        ref = _REFERENCE_BODY.fullmatch(body)
        if ref is None:
            raise _ExpandError(f"malformed variable reference '${{{body}}}'")
        value = variables.get(ref["name"])
        if ref["op"] == ":-" and not value:
            return str(ref["default"])
        if ref["op"] == "-" and value is None:
            return str(ref["default"])
        if value is None:
            raise _ExpandError(f"undefined variable {ref['name']!r} (define it in {DEFAULT_ENV_FILE}, an -e file "
                               "or the environment, or write ${NAME:-default})")
        return value

    return _REFERENCE.sub(replace, text)


_ENV_LINE = re.compile(r"(?:export\s+)?(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?P<value>.*)", re.DOTALL)
_DOUBLE = re.compile(r'"(?P<text>(?:[^"\\]|\\.)*)"\s*(?:#.*)?', re.DOTALL)
_SINGLE = re.compile(r"'(?P<text>[^']*)'\s*(?:#.*)?", re.DOTALL)
_ESCAPE = re.compile(r"\\(.)")


def _env_value_text(raw: str, lookup: Mapping[str, str]) -> str | None:
    """The value of one ``KEY=VALUE`` line; None when its quoting is malformed."""
    if raw.startswith("'"):
        single = _SINGLE.fullmatch(raw)
        return None if single is None else single["text"]
    if raw.startswith('"'):
        double = _DOUBLE.fullmatch(raw)
        if double is None:
            return None
        text = expand(double["text"], lookup)
        return _ESCAPE.sub(lambda m: "\n" if m[1] == "n" else m[1], text)
    return expand(re.sub(r"\s+#.*$", "", raw).strip(), lookup)


def read_env_file(path: Path, environ: Mapping[str, str], known: Mapping[str, str] | None = None) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines (``#`` comments, quotes, ``export`` prefix, ``${VAR}`` from
    ``environ`` then ``known`` and earlier lines). Malformed lines raise PipelineError."""
    display = str(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read env file: {exc}", file=display) from exc
    found: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(stripped)
        lookup = {**(known or {}), **found, **environ}
        try:
            value = None if match is None else _env_value_text(match["value"], lookup)
        except _ExpandError as exc:
            raise PipelineError(str(exc), file=display, line=number, key=match["key"] if match else "") from None
        if match is None or value is None:
            raise PipelineError(f"expected KEY=VALUE, got {stripped!r}", file=display, line=number)
        found[match["key"]] = value
    return found


def _env_file_path(app_dir: Path, name: str | Path) -> Path:
    """``-e X``: a name without a slash means ``<app dir>/X.env`` (or ``<app dir>/X``), else a path."""
    text = str(name)
    candidates = [Path(text)]
    if "/" not in text:
        candidates = [app_dir / f"{text}.env", app_dir / text, Path(text)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise PipelineError(f"env file {text!r} not found (tried {tried})", file=text)


def _load_variables(
    app_dir: Path, env_files: Sequence[str | Path], environ: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(lookup for ``${VAR}``, the env-file variables to record with their effective values)."""
    paths = [app_dir / DEFAULT_ENV_FILE] if (app_dir / DEFAULT_ENV_FILE).is_file() else []
    paths += [_env_file_path(app_dir, name) for name in env_files]
    merged: dict[str, str] = {}
    for path in paths:
        merged.update(read_env_file(path, environ, merged))
        logger.debug("read env file %s", path)
    record = {key: environ.get(key, value) for key, value in merged.items()}
    return {**merged, **environ}, record


# -- YAML with line numbers ---------------------------------------------------------------------
_Key = str | int
_Path = tuple[_Key, ...]
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TYPED_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "null"))

_CLUSTER_SLURM_KEYS = frozenset({"cluster", "submit_via", "local_scratch", "data_root"})
"""Set from ``clusters:`` and the module's ``cluster:``, not under a ``slurm:``."""
_TOP_KEYS = frozenset({"name", "label", "cluster", "clusters", "parameters", "modules", "slurm"})
_ALLOWED: dict[str, frozenset[str]] = {
    "app": _TOP_KEYS,
    "app.parameters": frozenset(AppParameters.model_fields),
    "module": frozenset(ModuleSpec.model_fields),
    "module.parameters": frozenset(ModuleParameters.model_fields),
    "module.arguments": frozenset(ModuleArguments.model_fields),
    "app.slurm": frozenset(SlurmSpec.model_fields) - _CLUSTER_SLURM_KEYS,
    "module.slurm": frozenset(SlurmSpec.model_fields) - _CLUSTER_SLURM_KEYS,
    "module.mpi": frozenset(MpiSpec.model_fields),
    "cluster": frozenset(ClusterSpec.model_fields),
    "cluster.slurm": frozenset(SlurmSpec.model_fields) - _CLUSTER_SLURM_KEYS,
}
_ALIASES: dict[str, dict[str, str]] = {
    "app": {"jobs": "modules"},
    "app.parameters": {"start_message": "start_task"},
    "module": {"sink_jobs": "sink_modules", "variables": "environments", "paths": "volumes", "hosts": "slots"},
    "module.parameters": {"start_message": "start_task"},
    "module.arguments": {"task_timeout_seconds": "task_max_seconds"},
}


def _level(path: _Path) -> str | None:
    """Which schema level a mapping at ``path`` is (None: free-form, e.g. environments)."""
    match path:
        case ():
            return "app"
        case ("parameters" | "slurm" as sub,):
            return f"app.{sub}"
        case ("modules", _):
            return "module"
        case ("modules", _, "parameters" | "arguments" | "slurm" | "mpi" as sub):
            return f"module.{sub}"
        case ("clusters", _):
            return "cluster"
        case ("clusters", _, "slurm"):
            return "cluster.slurm"
    return None


def _dotted(path: Iterable[_Key]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def did_you_mean(word: str, candidates: Mapping[str, str] | Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``. A mapping maps a candidate to
    the name to suggest (aliases suggest their canonical name)."""
    targets = dict(candidates) if isinstance(candidates, Mapping) else {c: c for c in candidates}
    lower = {c.lower(): target for c, target in targets.items()}
    close = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.6)
    return f" (did you mean {lower[close[0]]!r}?)" if close else ""


class _Reader:
    """Turns a composed node tree into plain data, recording the line of every key and item."""

    def __init__(self, file: str, variables: Mapping[str, str], *, located: bool = True) -> None:
        self.file = file
        self.variables = variables
        self.located = located
        """Errors name the line (False for data given as a mapping: its lines mean nothing)."""
        self.lines: dict[_Path, int] = {}
        self.nodes = 0
        """Nodes visited so far (each alias counts again for every node it expands to)."""
        self._open: set[int] = set()  # ids of the mappings and lists being built: an alias to one is a cycle
        self._via: _Path | None = None  # the outermost alias being expanded, where a too large file is reported
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, message: str, path: _Path, line: int | None) -> PipelineError:
        return PipelineError(message, file=self.file, line=line if self.located else None, key=_dotted(path))

    def _visit(self, path: _Path, line: int | None) -> None:
        """Count one node; refuse a file that expands to more than MAX_YAML_NODES."""
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            where = path if self._via is None else self._via
            raise self.error(f"the file expands to more than {MAX_YAML_NODES} nodes (YAML aliases?)", where,
                             self.lines.get(where, line))

    def value(self, node: yaml.Node, path: _Path, alias: bool = False) -> Any:
        """Plain data of ``node`` at ``path`` (``alias``: the node is written elsewhere, an alias or a merge)."""
        line = self.lines.setdefault(path, node.start_mark.line + 1)
        self._visit(path, line)
        if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            return self.scalar(node, path)
        if id(node) in self._open:
            raise self.error("a YAML alias refers to a mapping or list that contains it (a recursive anchor)",
                             path, line)
        if len(path) > MAX_YAML_DEPTH:  # nesting within the limit, but aliases of aliases go deeper
            raise self.error(f"the file expands deeper than {MAX_YAML_DEPTH} levels (YAML aliases?)", path, line)
        outermost = alias and self._via is None
        if outermost:
            self._via = path
        self._open.add(id(node))
        try:
            return self.mapping(node, path) if isinstance(node, yaml.MappingNode) else self.sequence(node, path)
        finally:
            self._open.discard(id(node))
            if outermost:
                self._via = None

    def sequence(self, node: yaml.SequenceNode, path: _Path) -> list[Any]:
        items = []
        for index, item in enumerate(node.value):
            alias = not _within(item, node)
            # an alias item's own mark is its anchor's: the list's line says where it is used
            self.lines[(*path, index)] = self.lines[path] if alias else item.start_mark.line + 1
            items.append(self.value(item, (*path, index), alias))
        return items

    def scalar(self, node: yaml.Node, path: _Path) -> Any:
        if node.tag in _TYPED_TAGS:
            return self._constructor.construct_object(node)
        try:
            return expand(str(node.value), self.variables)
        except _ExpandError as exc:
            raise self.error(str(exc), path, node.start_mark.line + 1) from None

    def mapping(self, node: yaml.MappingNode, path: _Path) -> dict[str, Any]:
        level = _level(path)
        aliases = _ALIASES.get(level or "", {})
        allowed = _ALLOWED.get(level or "")
        out: dict[str, Any] = {}
        given: dict[str, tuple[str, int]] = {}
        for key_node, value_node, explicit in self.entries(node, path):
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error("mapping keys must be plain scalars", path, line)
            raw = str(key_node.value)
            key = aliases.get(raw, raw)
            if allowed is not None and key not in allowed:
                hint = did_you_mean(raw, {**{k: k for k in allowed}, **aliases})
                raise self.error(f"unknown key {raw!r}{hint}", path, line)
            if key in out:
                if not explicit:
                    continue
                raise self.error(self._duplicate(path, raw, key, given[key]), path, line)
            given[key] = (raw, line)
            self.lines[(*path, key)] = line
            out[key] = self.value(value_node, (*path, key), not _within(value_node, node))
        return out

    def entries(self, node: yaml.MappingNode, path: _Path, explicit: bool = True,
                chain: tuple[int, ...] = ()) -> Iterator[tuple[yaml.Node, yaml.Node, bool]]:
        """A mapping's (key, value, explicit) pairs: its own, then those of ``<<`` merge sources
        (``chain``: the mappings whose merges led here, to refuse a mapping merged into itself)."""
        chain = (*chain, id(node))
        merges: list[tuple[yaml.Node, int]] = []
        for key, value in node.value:
            line = key.start_mark.line + 1
            self._visit(path, line)  # merged keys count too: repeated merges multiply like aliases
            if key.tag == _MERGE_TAG:
                merges.append((value, line))
            else:
                yield key, value, explicit
        for merge, line in merges:
            sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            for source in sources:
                self._visit(path, line)
                if not isinstance(source, yaml.MappingNode):
                    raise self.error("a merge key '<<' needs a mapping or a list of mappings", path, line)
                if id(source) in chain:
                    raise self.error("a merge key '<<' merges a mapping into itself (a recursive anchor)", path, line)
                if len(chain) > MAX_YAML_DEPTH:
                    raise self.error(f"merge keys '<<' nest deeper than {MAX_YAML_DEPTH} levels", path, line)
                yield from self.entries(source, path, explicit=False, chain=chain)

    @staticmethod
    def _duplicate(path: _Path, raw: str, key: str, first: tuple[str, int]) -> str:
        what = "module name" if path == ("modules",) else "key"
        also = f" (given as {first[0]!r} and {raw!r})" if first[0] != raw else ""
        return f"duplicate {what} {key!r}{also}; first at line {first[1]}"


def _within(child: yaml.Node, parent: yaml.Node) -> bool:
    """Whether ``child`` is written inside ``parent`` (not an alias of a node written elsewhere)."""
    return bool(parent.start_mark.index <= child.start_mark.index <= parent.end_mark.index)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses to nest deeper than MAX_YAML_DEPTH: it recurses once per
    level, and thousands of ``[`` would end in a RecursionError instead of a PipelineError.

    Its scanner also takes a TAB between tokens on a line as white space, as YAML 1.2 does (and
    Scalebox's Go loader did): ``key:<TAB>value``. A TAB in indentation (before the first token of
    a line) is still an error; quoted and block scalars are scanned as before."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def scan_to_next_token(self) -> None:
        while True:
            super().scan_to_next_token()
            if self.peek() != "\t" or not self._after_content():
                return
            while self.peek() in " \t":
                self.forward()

    def _after_content(self) -> bool:
        """Whether something other than white space precedes the reading position on its line."""
        line_start = self.pointer - self.column  # the whole text is the buffer (a str stream)
        return bool(self.buffer[max(0, line_start):self.pointer].strip())

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self._depth >= MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            raise yaml.composer.ComposerError(None, None, f"mappings and lists nested deeper than {MAX_YAML_DEPTH}"
                                              " levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(text: str, file: str) -> yaml.Node:
    """The composed root node; malformed YAML becomes a PipelineError at the YAML mark's line."""
    try:
        root = yaml.compose(text, Loader=_BoundedLoader)
    except yaml.MarkedYAMLError as exc:
        line = _mark_line(exc, text)
        message = _yaml_message(exc, text)
        source = text.splitlines()
        if line is not None and line <= len(source) and "${" in source[line - 1] and "flow" in str(exc.context):
            message += "; quote values with ${...} inside [...] or {...}, or use a block list"
        raise PipelineError(message, file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"invalid YAML: {' '.join(str(exc).split())}", file=file) from None
    if root is None:
        raise PipelineError("the pipeline file is empty (expected a mapping with name and modules)", file=file)
    if not isinstance(root, yaml.MappingNode):
        raise PipelineError("the top level must be a mapping (name: ..., modules: ...)", file=file,
                            line=root.start_mark.line + 1)
    return root


def _yaml_message(exc: yaml.MarkedYAMLError, text: str) -> str:
    problem = " ".join(str(exc.problem or "syntax error").split())
    if exc.context:
        context = " ".join(str(exc.context).split())
        where = f" at line {_clamp(exc.context_mark, text)}" if exc.context_mark is not None else ""
        return f"invalid YAML: {problem} ({context}{where})"
    return f"invalid YAML: {problem}"


def _clamp(mark: yaml.Mark, text: str) -> int:
    """A mark's 1-based line; a mark at the end of the file points at its last line."""
    return min(mark.line + 1, max(1, len(text.splitlines())))


def _mark_line(exc: yaml.MarkedYAMLError, text: str) -> int | None:
    mark = exc.problem_mark or exc.context_mark
    return None if mark is None else _clamp(mark, text)


# -- from data to spec ----------------------------------------------------------------------------
def _rekey(lines: dict[_Path, int], old: _Path, new: _Path) -> None:
    size = len(old)
    for path in [p for p in lines if p[:size] == old]:
        lines[new + path[size:]] = lines.pop(path)


class _Loader:
    """One load: the data, its line map and the checks that need both."""

    def __init__(self, reader: _Reader, data: dict[str, Any], app_dir: Path) -> None:
        self.reader = reader
        self.lines = reader.lines
        self.data = data
        self.app_dir = app_dir
        self.names: list[str] = []

    def line(self, path: _Path) -> int | None:
        """The line of ``path`` or of its nearest recorded ancestor."""
        for size in range(len(path), -1, -1):
            if path[:size] in self.lines:
                return self.lines[path[:size]]
        return None

    def error(self, message: str, path: _Path) -> PipelineError:
        return self.reader.error(message, path, self.line(path))

    def modules(self) -> Any:
        """The modules as a list of dicts with ``name``, from the mapping or the list form
        (None when absent, for pydantic to report)."""
        raw = self.data.get("modules")
        if isinstance(raw, dict):
            modules = [self._named(name, body) for name, body in raw.items()]
        elif isinstance(raw, list):
            modules = [self._listed(index, item) for index, item in enumerate(raw)]
        elif raw is not None:
            raise self.error("modules must be a mapping of module name to settings (or a list)", ("modules",))
        else:
            return raw
        self.names = [m["name"] for m in modules]
        return modules

    def _named(self, name: str, body: Any) -> dict[str, Any]:
        path: _Path = ("modules", name)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise self.error("a module must be a mapping of its settings (or empty)", path)
        if "name" in body and str(body["name"]) != name:
            raise self.error(f"name {body['name']!r} differs from the module key {name!r}", (*path, "name"))
        return {**body, "name": name}

    def _listed(self, index: int, item: Any) -> dict[str, Any]:
        path: _Path = ("modules", index)
        if not isinstance(item, dict):
            raise self.error("a module must be a mapping with a name", path)
        name = item.get("name")
        if not isinstance(name, str | int) or isinstance(name, bool) or not str(name):
            raise self.error("a module in a list needs a name", path)
        name = str(name)
        if name in self.names:
            raise self.error(f"duplicate module name {name!r}; first at line {self.lines[('modules', name)]}", path)
        self.names.append(name)
        _rekey(self.lines, path, ("modules", name))
        return {**item, "name": name}

    def resolve(self, module: dict[str, Any]) -> dict[str, Any]:
        """Absolute code_path (default: ``<app dir>/<name>/``, else the app dir if it holds run.sh
        or the module names a handler);
        ``schedule_mode: HEAD`` means one slot."""
        name = module["name"]
        code_path = module.get("code_path")
        if isinstance(code_path, str) and code_path.startswith(STANDARD_PREFIX):
            module["code_path"] = self._standard(name, code_path[len(STANDARD_PREFIX):])
        elif isinstance(code_path, str):
            module["code_path"] = Path(os.path.normpath(self.app_dir / code_path))
        elif code_path is None:
            own = self.app_dir / name
            # a one-file app: run.sh (or the handler's file) next to app.yaml
            use_app_dir = not own.is_dir() and ((self.app_dir / "run.sh").is_file() or bool(module.get("handler")))
            module["code_path"] = self.app_dir if use_app_dir else own
        defaults, own = self.data.get("slurm"), module.get("slurm")
        base, access = self._cluster(module)
        if own is None or isinstance(own, dict):
            # app defaults < the cluster's defaults < the module's own keys; then how to reach the cluster
            app = defaults if isinstance(defaults, dict) else {}
            if app or base or access:
                module["slurm"] = {**app, **base, **(own or {}), **access}
        mode = module.get("schedule_mode")
        if isinstance(mode, str) and mode.strip().upper() == "HEAD":
            if "slots" in module:
                logger.warning("module %s: schedule_mode HEAD ignores slots %s", name, module["slots"])
            module["slots"] = [{"host_regex": ".*", "count": 1}]
            own_slurm = module.get("slurm")
            slurm: dict[str, Any] = own_slurm if isinstance(own_slurm, dict) else {}
            # one slot in the whole app: one stage job on one node
            module["slurm"] = {**slurm, "nodes": 1, "slots_per_node": 1, "max_jobs": 1,
                               "min_jobs": min(_int_or(slurm.get("min_jobs"), 0), 1)}
        return module

    def _cluster(self, module: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The module's cluster (its ``cluster:``, else the app's when declared under ``clusters:``):
        (that cluster's ``slurm:`` defaults, how to reach it: ``cluster``, ``submit_via``, scratch and
        data root for the module's ``slurm``). Both empty without a declared cluster: the app's
        ``cluster`` alone only labels the app (its Slurm call budget), as before."""
        clusters = self.data.get("clusters")
        declared = clusters if isinstance(clusters, dict) else {}
        name = module.get("cluster")
        if name is None:
            name = self.data.get("cluster")
            if name is None or str(name) not in declared:
                return {}, {}
        elif str(name) not in declared:
            raise self.error(f"unknown cluster {name!r}{did_you_mean(str(name), list(declared))}; declare it "
                             "under clusters: (clusters: {NAME: {slurm: {...}}})",
                             ("modules", module["name"], "cluster"))
        cluster = declared[str(name)]
        if not isinstance(cluster, dict):
            return {}, {}  # pydantic reports the bad clusters entry
        base = cluster.get("slurm")
        return (base if isinstance(base, dict) else {}), {
            "cluster": str(name), "submit_via": cluster.get("submit_via") or [],
            "local_scratch": cluster.get("local_scratch"), "data_root": cluster.get("data_root")}

    def _standard(self, module: str, name: str) -> Path:
        """``code_path: scalebox:NAME``: the standard module shipped in ``scalebox_hpc/modules/NAME``."""
        available = sorted(p.name for p in STANDARD_MODULES.iterdir() if (p / "run.sh").is_file())
        if name not in available:
            raise self.error(f"unknown standard module {STANDARD_PREFIX}{name}{did_you_mean(name, available)};"
                             f" available: {', '.join(available)}", ("modules", module, "code_path"))
        return STANDARD_MODULES / name

    def from_validation(self, exc: ValidationError) -> PipelineError:
        """The first (by line) pydantic error, located in the file."""
        errors = exc.errors(include_url=False)
        located = sorted(((self._locate(err), err) for err in errors), key=lambda pair: pair[0][1] or 0)
        (path, line), err = located[0]
        message = _pydantic_message(err)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return self.reader.error(message, path, line)

    def _locate(self, err: Any) -> tuple[_Path, int | None]:
        loc: list[_Key] = list(err["loc"])
        if len(loc) > 1 and loc[0] == "modules" and isinstance(loc[1], int) and loc[1] < len(self.names):
            loc[1] = self.names[loc[1]]
        path = tuple(loc)
        for size in range(len(path), -1, -1):
            if path[:size] in self.lines:
                shown = path if err["type"] == "missing" and size == len(path) - 1 else path[:size]
                return shown, self.lines[path[:size]]
        return path, None

    def check(self, spec: AppSpec) -> None:
        """Checks that need the whole app or the filesystem: sink names and run.sh."""
        names = [m.name for m in spec.modules]
        for module in spec.modules:
            for index, sink in enumerate(module.sink_modules):
                if sink not in names:
                    path: _Path = ("modules", module.name, "sink_modules")
                    raise self.reader.error(f"unknown module {sink!r}{did_you_mean(sink, names)}", path,
                                            self.line((*path, index)))
        for module in spec.modules:
            if module.mpi.mode == "collective":  # a Python handler instead of run.sh
                continue
            if module.handler is not None:  # an in-slot Python handler instead of run.sh
                self._check_handler(module)
                continue
            if module.script("run.sh") is None:
                where: _Path = ("modules", module.name, "code_path")
                raise self.reader.error(f"no run.sh in {module.code_path}", ("modules", module.name),
                                        self.line(where))

    def _check_handler(self, module: ModuleSpec) -> None:
        """A ``handler``: its file exists under code_path (or its module can be found), and
        the module runs bare (the worker is the launcher's own Python)."""
        key: _Path = ("modules", module.name, "handler")
        where = cast(str, module.handler).rpartition(":")[0]
        if module.base_image is not None or module.arguments.runtime not in (None, "local"):
            raise self.error("handlers run bare (no base_image, runtime local) in this release; "
                             "use run.sh for a containerised module", key)
        if where.endswith(".py"):
            if not (module.code_path / where).is_file():
                raise self.error(f"no handler file {where} in {module.code_path}", key)
            return
        top = where.partition(".")[0]
        if (module.code_path / f"{top}.py").is_file() or (module.code_path / top).is_dir():
            return  # the worker appends code_path to sys.path
        try:  # finds the module without running it (its parent packages are imported)
            found = importlib.util.find_spec(where)
        except (ImportError, ValueError) as exc:
            raise self.error(f"handler module {where!r} cannot be found: {exc}", key) from None
        if found is None:
            raise self.error(f"handler module {where!r} is not importable (not on sys.path)", key)


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _pydantic_message(err: Any) -> str:
    kind = err["type"]
    message = str(err["msg"])
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        return "unknown key"
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix):]
    value = err.get("input")
    if value is None or isinstance(value, str | int | float | bool):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        message += f" (got {shown})"
    return message


def load_pipeline(
    path: str | Path, env_files: Sequence[str | Path] = (), environ: Mapping[str, str] | None = None
) -> AppSpec:
    """Load, substitute and validate a pipeline file; every problem is a PipelineError naming
    ``file:line: key``. ``env_files`` (``-e``) override ``scalebox.env`` next to the file;
    ``environ`` (default ``os.environ``) overrides both."""
    file = Path(path)
    if file.is_dir():
        file = file / "app.yaml"
    display = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read pipeline file: {exc}", file=display) from exc
    return _load_text(text, display, Path(os.path.abspath(file)).parent, env_files, environ, located=True)


DATA_SOURCE = "<pipeline data>"
"""How errors name a pipeline given as a mapping (:func:`load_pipeline_data`)."""


def load_pipeline_data(
    data: Mapping[str, Any], *, app_dir: str | Path | None = None, env_files: Sequence[str | Path] = (),
    environ: Mapping[str, str] | None = None, source: str = DATA_SOURCE,
) -> AppSpec:
    """A pipeline given as data, as ``yaml.safe_load`` of a pipeline file gives it, loaded by the
    same rules as :func:`load_pipeline`: ``${VAR}`` substitution (``scalebox.env`` in ``app_dir``,
    ``env_files``, ``environ``), the 2023 aliases, the key checks, code paths relative to
    ``app_dir`` (default: the current directory). A problem is a PipelineError naming
    ``source: key.path`` (no line: data has none)."""
    if not isinstance(data, Mapping):
        raise PipelineError("the top level must be a mapping (name: ..., modules: ...)", file=source)
    try:  # one loader for files and data: the data goes through the same node reader
        text = yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True)
    except yaml.YAMLError as exc:
        raise PipelineError(f"not plain data (text, numbers, booleans, lists, mappings): {exc}",
                            file=source) from None
    base = Path(app_dir) if app_dir is not None else Path.cwd()
    return _load_text(text, source, Path(os.path.abspath(base)), env_files, environ, located=False)


def _load_text(
    text: str, display: str, app_dir: Path, env_files: Sequence[str | Path], environ: Mapping[str, str] | None,
    *, located: bool,
) -> AppSpec:
    env = dict(os.environ if environ is None else environ)
    lookup, record = _load_variables(app_dir, env_files, env)
    reader = _Reader(display, lookup, located=located)
    root = _compose(text, display)
    try:
        data = reader.value(root, ())
    except yaml.MarkedYAMLError as exc:  # an unconstructable scalar (e.g. a bad !!int)
        line = _mark_line(exc, text) if located else None
        raise PipelineError(_yaml_message(exc, text), file=display, line=line) from None
    loader = _Loader(reader, data, app_dir)
    modules = loader.modules()
    if isinstance(modules, list):
        data["modules"] = [loader.resolve(module) for module in modules]
    try:
        spec = AppSpec.model_validate({**data, "app_dir": app_dir, "variables": record})
    except ValidationError as exc:
        raise loader.from_validation(exc) from None
    loader.check(spec)
    logger.debug("loaded pipeline %s from %s (%d modules)", spec.name, display, len(spec.modules))
    return spec

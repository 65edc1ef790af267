"""The per-module and app-level parameter models of a pipeline file: slots, arguments, retry rules."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scalebox_hpc.models import ConflictAction

_CONFIG = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)
_SLOT = re.compile(r"(?P<regex>.*):\s*(?P<count>[+-]?\w+)\s*", re.DOTALL)
_RETRY_RULE = re.compile(r"(\*|-?\d+)(:\d+)?")


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _str_list(value: Any, sep: str = ",") -> Any:
    """A single string becomes a list (split on ``sep``); anything else is left to pydantic."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(sep) if part.strip()]
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


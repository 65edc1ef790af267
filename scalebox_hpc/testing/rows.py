"""The in-memory queue's tables (apps, modules, slots, tasks) and the pure helpers that mirror its SQL."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from scalebox_hpc.errors import InvalidValueError
from scalebox_hpc.models import (
    ConflictAction,
    ModuleRef,
    Task,
    TaskResult,
    TaskStatus,
    storable_text,
    usage_columns,
)

OUTPUT_TAIL_BYTES = 64 * 1024
"""Stdout/stderr kept per execution (as PgQueue keeps them)."""
SLOT_STATUSES = frozenset({"STARTING", "READY", "RUNNING", "ERROR", "EXITED", "LOST"})
LIVE_SLOT_STATUSES = frozenset({"STARTING", "READY", "RUNNING"})


# -- rows ---------------------------------------------------------------------------------------
@dataclass
class _App:
    id: int
    name: str
    status: str
    spec: dict[str, Any]
    uid: str
    result: str | None = None
    cancelled: bool = False
    finished_at: datetime | None = None
    semaphores: dict[str, int] = field(default_factory=dict)
    recovered_at: datetime | None = None


@dataclass
class _Module:
    id: int
    app_id: int
    name: str
    seq: int
    sink_modules: tuple[str, ...]
    conflict_action: ConflictAction
    stall_retries: int
    max_pending: int | None
    spec: dict[str, Any]
    locality_wait_seconds: float
    input_regex: str | None
    dist_mode: str | None

    def ref(self) -> ModuleRef:
        return ModuleRef(self.id, self.name, self.sink_modules, self.conflict_action, self.dist_mode)


@dataclass
class _Slot:
    id: int
    module_id: int
    host: str
    seq: int
    pid: int
    work_dir: str
    heartbeat_seconds: float
    started_at: datetime
    heartbeat_at: datetime
    status: str = "STARTING"
    message: str | None = None
    tasks_done: int = 0
    ended_at: datetime | None = None
    waiting: str | None = None
    live_output: dict[str, Any] | None = None
    # (0033) the lease of every RUNNING task the slot knows it holds, renewed by its beats
    lease_expires_at: datetime | None = None

    def holds_lease(self, now: datetime) -> bool:
        """Its beats keep its tasks alive: it has not ended and its lease has not expired."""
        return self.status not in ("ERROR", "EXITED") and self.lease_expires_at is not None \
            and self.lease_expires_at >= now


@dataclass
class _Task:
    id: int
    app_id: int
    module_id: int
    body: str
    headers: dict[str, Any]
    status: int
    created_at: datetime
    to_host: str | None = None
    to_slot: int | None = None
    pref_host: str | None = None
    pref_until: datetime | None = None
    pref_partial: bool = False
    attempts: int = 0
    retry_base: int = 0
    slot_id: int | None = None
    host: str | None = None
    heartbeat_at: datetime | None = None
    lease_expires_at: datetime | None = None
    from_task_id: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def as_task(self) -> Task:
        return Task(id=self.id, app_id=self.app_id, module_id=self.module_id, body=self.body,
                    headers=dict(self.headers), status=int(self.status), attempts=self.attempts,
                    retry_base=self.retry_base)

    def release(self) -> None:
        """Back to READY, the attempt not counted (release_tasks / the stray release)."""
        self.status, self.slot_id, self.host = TaskStatus.READY, None, None
        self.heartbeat_at = self.lease_expires_at = self.started_at = None
        self.attempts = max(self.attempts - 1, 0)


@dataclass
class _State:
    """Every table; copied whole to roll a hand-off back."""

    apps: dict[int, _App] = field(default_factory=dict)
    modules: dict[int, _Module] = field(default_factory=dict)
    slots: dict[int, _Slot] = field(default_factory=dict)
    tasks: dict[int, _Task] = field(default_factory=dict)
    by_body: dict[tuple[int, str], int] = field(default_factory=dict)
    """(module id, body) → task id: the unique (module_id, body_sha) index."""
    execs: list[dict[str, Any]] = field(default_factory=list)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    scratch: dict[tuple[str, str], int] = field(default_factory=dict)
    """(key, host) → bytes."""
    ids: dict[str, int] = field(default_factory=dict)

    def next_id(self, table: str) -> int:
        self.ids[table] = self.ids.get(table, 0) + 1
        return self.ids[table]


def _check_slot_status(status: str) -> None:
    if status not in SLOT_STATUSES:  # the CHECK constraint of sbx_slots.status
        raise InvalidValueError(f"slot status {status!r} is not one of {sorted(SLOT_STATUSES)}")


def _inputs(headers: Mapping[str, Any], body: str, input_regex: str | None) -> list[str]:
    """sbx_task_inputs_v1: the ``inputs`` header, else what ``input_regex`` matches in the body
    (group 1, or the whole match)."""
    named = headers.get("inputs")
    if isinstance(named, list):
        return [v if isinstance(v, str) else _json_text(v) for v in named]
    if input_regex is None:
        return []
    match = re.search(input_regex, body)
    if match is None:
        return []
    found = match.group(1) if match.re.groups else match.group(0)
    return [] if found is None else [found]


def _json_text(value: Any) -> str:
    return json.dumps(value)


def _tail(text: str) -> str:
    data = text.encode("utf-8", "replace")
    if len(data) <= OUTPUT_TAIL_BYTES:
        return text
    return data[-OUTPUT_TAIL_BYTES:].decode("utf-8", "ignore")


def _exec_record(exec_id: int, t: _Task, slot_id: int, host: str, result: TaskResult) -> dict[str, Any]:
    return {
        "id": exec_id, "task_id": t.id, "attempt": t.attempts, "slot_id": slot_id, "host": host,
        "status": result.status, "started_at": result.started_at, "finished_at": result.finished_at,
        "stdout": storable_text(_tail(result.stdout)), "stderr": storable_text(_tail(result.stderr)),
        "input_bytes": result.input_bytes, "output_bytes": result.output_bytes,
        "input_files": list(result.input_files), "output_files": list(result.output_files),
        "user_text": None if result.user_text is None else storable_text(result.user_text),
        "timestamps": copy.deepcopy(result.timestamps), **usage_columns(result.usage),
    }


def _emit_failed(result: TaskResult, reason: str) -> TaskResult:
    """The result recorded instead when the emitted messages are rejected (as PgQueue does)."""
    stderr = (result.stderr + f"\nscalebox: emitted messages rejected: {reason}\n").lstrip("\n")
    return TaskResult(
        status=TaskStatus.EMIT_FAILED, started_at=result.started_at, finished_at=result.finished_at,
        stdout=result.stdout, stderr=stderr, input_bytes=result.input_bytes, output_bytes=result.output_bytes,
        input_files=result.input_files, output_files=result.output_files, user_text=result.user_text,
        timestamps=result.timestamps, usage=result.usage,
    )



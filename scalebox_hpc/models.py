"""Plain data shared by every layer: status codes, tasks, messages, execution results."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from scalebox_hpc.errors import InvalidMessageError, ScaleboxError

# A body is passed to run.sh as ONE argv element; Linux caps one argument at 128 KiB
# (MAX_ARG_STRLEN), so larger bodies could be stored but never delivered.
MAX_BODY_BYTES = 128 * 1024 - 1
MAX_HEADERS_BYTES = 64 * 1024


class TaskStatus(enum.IntEnum):
    """Task status codes kept from Scalebox; 1..255 are run.sh exit codes."""

    INITIAL = -9
    """Waits for activation (not claimable yet)."""
    READY = -1
    """Claimable."""
    RUNNING = -3
    """Claimed by a slot; carries a lease."""
    OK = 0
    """run.sh exited 0."""
    STALLED = 123
    """The slot running it died and its retries are spent."""
    TIMEOUT = 124
    """run.sh exceeded task_max_seconds."""
    SYSTEM_ERROR = -101
    """The launcher could not run the task at all (e.g. run.sh missing)."""
    EMIT_FAILED = -102
    """run.sh finished but its emitted messages were rejected (unknown sink, duplicate body,
    a malformed line, more messages than ``arguments.max_messages``)."""
    OUTPUT_INVALID = -103
    """The run's output could not be recorded: a task-exec file of the wrong shape, type, size
    or kind (FIFO, symlink), a ``statusCode`` outside 0..255, or a result the database refused."""

    @staticmethod
    def describe(code: int) -> str:
        """Human name for any status code, including plain exit codes."""
        try:
            return TaskStatus(code).name
        except ValueError:
            return f"EXIT_{code}" if code > 0 else f"SYSTEM_{code}"

    @staticmethod
    def is_failure(code: int) -> bool:
        """True for terminal non-OK codes (exit codes, timeouts, system errors)."""
        return code > 0 or code < -100


class AppStatus(enum.StrEnum):
    """Lifecycle of an app; launchers claim only while RUNNING."""

    INITIAL = "INITIAL"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    FINISHED = "FINISHED"


class ConflictAction(enum.StrEnum):
    """What happens when a message body already exists in its module."""

    FAIL = "FAIL"
    IGNORE = "IGNORE"
    OVERWRITE = "OVERWRITE"


UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""What PostgreSQL cannot store in text or jsonb: NUL and lone surrogates."""


def storable_text(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD, so PostgreSQL can store it
    (jsonb and text refuse both)."""
    return UNSTORABLE.sub("\ufffd", text)


def validate_body(body: str) -> str:
    """Return ``body`` if it can be stored and passed to run.sh, else raise InvalidMessageError."""
    if "\x00" in body:
        raise InvalidMessageError("task body contains a NUL byte")
    try:
        size = len(body.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidMessageError("task body is not valid UTF-8") from exc
    if size > MAX_BODY_BYTES:
        raise InvalidMessageError(
            f"task body is {size} bytes; the limit is {MAX_BODY_BYTES} (one argv element of run.sh)"
        )
    return body


def validate_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Return headers as a JSON-safe dict, or raise InvalidMessageError."""
    if not isinstance(headers, Mapping):
        raise InvalidMessageError("task headers must be a JSON object")
    try:
        text = json.dumps(dict(headers), ensure_ascii=False)
        text.encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise InvalidMessageError(f"task headers are not valid JSON text: {exc}") from exc
    if "\\u0000" in text:
        raise InvalidMessageError("task headers contain a NUL character")
    to_slot = headers.get("to_slot")
    if to_slot not in (None, "") and not _is_int32(to_slot):
        raise InvalidMessageError(f"header to_slot must be an integer slot number, not {to_slot!r}")
    if len(text) > MAX_HEADERS_BYTES:
        raise InvalidMessageError(f"task headers exceed {MAX_HEADERS_BYTES} bytes")
    return dict(headers)


def _is_int32(value: object) -> bool:
    """An int (or integer text) that fits a PostgreSQL integer."""
    if isinstance(value, bool):
        return False
    if not isinstance(value, int):
        text = str(value).strip()
        if not text.lstrip("-").isdigit():
            return False
        value = int(text)
    return -(2**31) <= value < 2**31


@dataclass(frozen=True)
class Message:
    """A message to become a task: for ``module`` (None = the sender's first sink)."""

    body: str
    headers: dict[str, Any] = field(default_factory=dict)
    module: str | None = None

    def __post_init__(self) -> None:
        validate_body(self.body)
        validate_headers(self.headers)


@dataclass(frozen=True)
class Task:
    """A claimed (or listed) task."""

    id: int
    app_id: int
    module_id: int
    body: str
    headers: dict[str, Any]
    status: int
    attempts: int = 0
    retry_base: int = 0
    """Attempts made before the last manual retry (``scalebox task retry``)."""

    @property
    def tries(self) -> int:
        """Attempts that count against the retry rules: those since the last manual retry."""
        return self.attempts - self.retry_base

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Task:
        """Build from a database row (dict row factory)."""
        return cls(
            id=row["id"],
            app_id=row["app_id"],
            module_id=row["module_id"],
            body=row["body"],
            headers=dict(row["headers"] or {}),
            status=row["status"],
            attempts=row.get("attempts", 0),
            retry_base=row.get("retry_base", 0) or 0,
        )


@dataclass(frozen=True)
class Usage:
    """What one run used, as the kernel accounts it for the run's process tree: CPU seconds in
    user and kernel mode of the run's main process and every descendant that was waited for (a
    process that leaves the tree — ``setsid`` and a double fork, a daemon — is not counted), and
    the peak resident set of the largest single process among them, in KiB (None: not measured,
    or not above the launcher's own peak, which the kernel counts in a forked child's)."""

    cpu_user_s: float
    cpu_system_s: float
    max_rss_kb: int | None = None

    @property
    def cpu_s(self) -> float:
        """User plus system CPU seconds."""
        return self.cpu_user_s + self.cpu_system_s


def usage_columns(usage: Usage | None) -> dict[str, float | int | None]:
    """An execution's usage columns (``cpu_user_s``, ``cpu_system_s``, ``max_rss_kb``), each
    None when not measured (a peak RSS a bigint cannot hold too)."""
    if usage is None:
        return {"cpu_user_s": None, "cpu_system_s": None, "max_rss_kb": None}
    rss = usage.max_rss_kb if usage.max_rss_kb is not None and 0 < usage.max_rss_kb < 2**63 else None
    return {"cpu_user_s": usage.cpu_user_s, "cpu_system_s": usage.cpu_system_s, "max_rss_kb": rss}


@dataclass
class TaskResult:
    """What one run of a task produced; recorded with its emitted messages in one transaction."""

    status: int
    started_at: datetime
    finished_at: datetime
    stdout: str = ""
    stderr: str = ""
    input_bytes: int | None = None
    output_bytes: int | None = None
    input_files: list[str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)
    user_text: str | None = None
    timestamps: list[dict[str, Any]] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    finish_text: str | None = None
    """Set when run.sh called ``scalebox app set-finished TEXT``."""
    usage: Usage | None = None
    """CPU time and peak RSS of the run's process tree; None where it cannot be measured (a
    Podman/Docker container's processes, the remote ranks of an ``srun`` step)."""


DEFAULT_STALL_RETRIES = 2
"""Extra attempts for a task whose slot died (123) when no retry rule names 123 or ``*``."""


def parse_retry_rule(rule: str) -> tuple[int | None, int]:
    """``'C'`` → (C, 1), ``'C:N'`` → (C, N), ``'*'`` / ``'*:N'`` → (None, 1 / N); None matches any failure."""
    code, _, times = rule.strip().partition(":")
    extra = int(times) if times else 1
    return (None if code == "*" else int(code)), extra


def extra_attempts(rules: list[str], status: int) -> int:
    """How many extra attempts a run that ended with ``status`` gets: an exact rule wins over ``*``."""
    wildcard = 0
    for rule in rules:
        code, extra = parse_retry_rule(rule)
        if code == status:
            return extra
        if code is None and TaskStatus.is_failure(status):
            wildcard = extra
    return wildcard


def stall_retries(rules: list[str]) -> int:
    """Extra attempts for status 123 (slot died): the rules' answer, else DEFAULT_STALL_RETRIES."""
    named = any(parse_retry_rule(r)[0] in (None, TaskStatus.STALLED) for r in rules)
    return extra_attempts(rules, TaskStatus.STALLED) if named else DEFAULT_STALL_RETRIES


# -- routing: what the queue and the launcher share ------------------------------------------
@dataclass(frozen=True)
class ModuleRef:
    """What the queue needs to know of a module to route messages to it."""

    id: int
    name: str
    sink_modules: tuple[str, ...]
    conflict_action: ConflictAction
    dist_mode: str | None = None
    """HOST-BOUND / SLOT-BOUND: messages to this module go to the sender's host / slot."""
    remote: str | None = None
    """A module of another app in another database (its REMOTE_SERVER): messages to it go to
    the outbox (``remote_app_id`` is the app there; ``id`` is 0)."""
    remote_app_id: int | None = None


@dataclass(frozen=True)
class Completion:
    """One finished task of a batch hand-off (the MPI farm and the node's dispatcher record
    many at once); ``slot_id`` and ``sender``, when set, override the batch's for this item
    (a dispatcher's batch mixes the slots and modules of one node)."""

    task: Task
    result: TaskResult
    host: str
    requeue: bool = False
    slot_id: int | None = None
    sender: ModuleRef | None = None


RECOVER_LIMIT = 1000
"""Expired leases recovered (and bound tasks unbound) per recovery call, as in the SQL."""


HAND_OFF_BUSY = -1
"""What a batch hand-off (``complete_many``) answers for an item whose task row another
transaction holds right now, nothing recorded: try it again shortly. The holder may only be a
claim statement that looked at the row (migration 0030); a second try records the result, or
finds the lease lost when the holder was recovering the task."""

BUSY_RETRY_SECONDS = 0.05
"""A hand-off whose task row another transaction held (HAND_OFF_BUSY) is tried again after
this, doubling per try up to BUSY_RETRY_MAX_SECONDS; the holder is mostly a claim statement
of another node, done within its batch."""
BUSY_RETRY_MAX_SECONDS = 1.0


def busy_delay(tries: int) -> float:
    """Seconds before the next try of a call found busy ``tries`` times before (0: the first
    retry): BUSY_RETRY_SECONDS, doubling, at most BUSY_RETRY_MAX_SECONDS."""
    return min(BUSY_RETRY_MAX_SECONDS, BUSY_RETRY_SECONDS * 2.0 ** tries)


BUSY_GIVE_UP_SECONDS = 60.0
"""A hand-off found busy for this long is given up as a lost lease (no lock on a task row
lasts that long but a stuck transaction's; the task's lease has run out meanwhile)."""


class Released(int):
    """How many RUNNING tasks a release gave back to READY (an int, as before 0030), and
    ``busy``: the ids it could not give back because another transaction held their rows right
    now (not released; see :data:`HAND_OFF_BUSY`): the caller tries them again shortly."""

    busy: tuple[int, ...]

    def __new__(cls, count: int, busy: Sequence[int] = ()) -> Released:
        self = super().__new__(cls, count)
        self.busy = tuple(busy)
        return self

class LeaseLostError(ScaleboxError):
    """The slot no longer holds the task (its lease expired and someone else took it, or its
    result was recorded already); ``task_id`` names the task."""

    def __init__(self, task_id: int) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id}: lease lost")


def route(
    modules: dict[str, ModuleRef], sender: ModuleRef | None, messages: Sequence[Message]
) -> list[tuple[ModuleRef, Message]]:
    """Resolve each message's target module (None = the sender's first sink)."""
    routed = []
    for msg in messages:
        name = msg.module
        if name is None:
            if sender is None or not sender.sink_modules:
                raise InvalidMessageError(
                    f"module {sender.name if sender else '?'} has no sink_modules to send to"
                )
            name = sender.sink_modules[0]
        target = modules.get(name)
        if target is None:
            raise InvalidMessageError(f"unknown sink module {name!r}")
        routed.append((target, bind(target, msg)))
    return routed


def bind(target: ModuleRef, msg: Message) -> Message:
    """Scalebox's HOST-BOUND / SLOT-BOUND dispatch: pin the message to the host (and slot) it
    came from, unless it names its own ``to_host`` / ``to_slot``."""
    headers = dict(msg.headers)
    if target.dist_mode in ("HOST-BOUND", "SLOT-BOUND") and "from_host" in headers:
        headers.setdefault("to_host", headers["from_host"])
    if target.dist_mode == "SLOT-BOUND" and "from_slot" in headers:
        headers.setdefault("to_slot", headers["from_slot"])
    return msg if headers == msg.headers else Message(body=msg.body, headers=headers, module=msg.module)


def headers_for(msg_headers: dict[str, Any], *, from_module: str, from_host: str, from_slot: int) -> dict[str, Any]:
    """Headers of an emitted message: the sender's, plus where it came from (for HOST-BOUND routing)."""
    # stamped last: a message cannot pass itself off as another host's or slot's (it may still
    # name its own to_host / to_slot)
    merged = {**msg_headers, "from_module": from_module, "from_host": from_host, "from_slot": from_slot}
    return validate_headers(merged)


@dataclass(frozen=True)
class SlotWant:
    """One slot's share of a batched claim: up to ``want`` tasks for the slot ``slot_id``
    (its ``slot_seq`` decides which SLOT-BOUND tasks it may take)."""

    slot_id: int
    slot_seq: int
    want: int


@dataclass(frozen=True)
class Beat:
    """One slot's part of the node's single heartbeat statement: the slot's status, and the
    tasks it holds (running or prefetched) whose leases are renewed; ``task_ids`` None: all of
    the slot's RUNNING tasks."""

    slot_id: int
    status: str
    lease_seconds: float
    task_ids: tuple[int, ...] | None = None
    waiting: str | None = None
    """Why the slot claims nothing now (check.sh said "not now", a disk gate is closed); None:
    its gates are open. Stored in the slot's row with every beat (no write of its own)."""
    output: Mapping[str, Any] | None = None
    """A bounded tail of the running task's output (``{"task_id", "stdout": {"end", "text"},
    "stderr": ...}``, see :mod:`scalebox_hpc.launcher.livetail`); None: unchanged since the last
    beat (the row keeps what it has)."""


def unrecordable(result: TaskResult, reason: str) -> TaskResult:
    """What is recorded when the database refused a run's result: status -103, no messages,
    a short tail of its output and the reason (small enough to be stored whatever happened)."""
    tail = 4096
    return TaskResult(
        status=TaskStatus.OUTPUT_INVALID, started_at=result.started_at, finished_at=result.finished_at,
        stdout=result.stdout[-tail:],
        stderr=result.stderr[-tail:] + f"\nscalebox: the result could not be recorded: {reason[:2000]}\n",
        usage=result.usage,
    )

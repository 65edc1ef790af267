"""What a running task may ask of the system, and how: the launcher's task-services socket.

A task's scripts get no database credentials (audit F5). What they may still do beyond emitting
messages (the emit buffer) goes through the launcher that runs them: semaphores, variables, an
immediate delivery of messages (the cron module), the app's state. The launcher listens on a
unix socket in its private directory (0700, the socket 0600, the peer's uid checked) whose path
is ``$SCALEBOX_SERVICES``; a call is one JSON object on one line, the answer one JSON object on
one line. Every call acts on the launcher's own app only, and only for a task that is running in
one of its slots now (``TASK_ID``): a process left behind by an ended task is refused.

This module is the protocol (requests and answers, parsed strictly: the socket is fed by user
code) and the client (stdlib only: ``scalebox semaphore increment`` inside run.sh must start fast).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

from scalebox_hpc.errors import InvalidValueError, ScaleboxError

SERVICES_ENV: Final = "SCALEBOX_SERVICES"
"""The socket's path in a task's environment (absent: no launcher to ask)."""

MAX_REQUEST_BYTES: Final = 1 << 20
"""One call's line; a delivery's bodies are bounded by this (the emit buffer carries more)."""

MAX_NAME_CHARS: Final = 200
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

Op = Literal[
    "semaphore.create", "semaphore.get", "semaphore.add", "semaphore.list",
    "variable.set", "variable.get", "variable.list", "tasks.deliver", "app.state",
]
OPS: Final[frozenset[str]] = frozenset(Op.__args__)  # type: ignore[attr-defined]

NOT_UTF8: Final = "a name or value is not UTF-8 text (semaphores and variables hold text only)"
"""The error for an argument with bytes that are not UTF-8, the same on the socket and the directory."""

RESERVED_PREFIX: Final = "_"
"""Variable names the system keeps for itself (``_stage.*``): no task or user writes them."""


class ServiceError(ScaleboxError):
    """The launcher refused a task-services call (``kind`` says why, see :class:`Reply`), or
    could not be reached (``kind`` ``unreachable``)."""

    hint = "inside a task, only `task add`, `app set-finished`, semaphores and variables of the task's own app work"

    def __init__(self, message: str, *, hint: str | None = None, kind: str = "") -> None:
        super().__init__(message, hint=hint)
        self.kind = kind


@dataclass(frozen=True)
class Request:
    """One call: ``op`` and its arguments (those it does not use are their defaults)."""

    op: Op
    task_id: int
    name: str = ""
    value: int | str | None = None
    module: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    bodies: tuple[str, ...] = ()

    def encode(self) -> bytes:
        """The request's line (what :func:`parse_request` reads back)."""
        doc: dict[str, Any] = {"op": self.op, "task_id": self.task_id}
        if self.name:
            doc["name"] = self.name
        if self.value is not None:
            doc["value"] = self.value
        if self.module:
            doc["module"] = self.module
        if self.headers:
            doc["headers"] = self.headers
        if self.bodies:
            doc["bodies"] = list(self.bodies)
        return json.dumps(doc, ensure_ascii=False).encode() + b"\n"


@dataclass(frozen=True)
class Reply:
    """The answer: ``ok`` with a ``value`` (int, str, a mapping), else an ``error`` and a ``hint``."""

    ok: bool
    value: Any = None
    error: str = ""
    hint: str = ""
    kind: str = ""
    """What refused: ``outage`` (the database is away: try again), ``not-running`` (the task
    does not run in this launcher), else the error's class name."""

    def encode(self) -> bytes:
        """The answer's line."""
        doc: dict[str, Any] = {"ok": self.ok, "value": self.value} if self.ok else {
            "ok": False, "error": self.error, "hint": self.hint, "kind": self.kind}
        return json.dumps(doc, ensure_ascii=False, default=str).encode() + b"\n"


def _text(doc: dict[str, Any], key: str, *, required: bool) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str):
        raise InvalidValueError(f"{key}: expected text, got {type(value).__name__}")
    if required and not value:
        raise InvalidValueError(f"{key}: missing")
    if len(value) > MAX_NAME_CHARS or "\x00" in value:
        raise InvalidValueError(f"{key}: longer than {MAX_NAME_CHARS} characters or with a NUL byte")
    return value


def _int32(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not INT32_MIN <= value <= INT32_MAX:
        raise InvalidValueError(f"{key}: expected a 32-bit integer")
    return value


def check_variable_name(name: str) -> str:
    """``name`` when a task or a user may write it; reserved names (``_stage.python``...) raise."""
    if name.startswith(RESERVED_PREFIX):
        raise InvalidValueError(
            f"variable {name!r} is reserved (names starting with {RESERVED_PREFIX!r} belong to scalebox)",
            hint="choose a name without the leading underscore")
    return name


def _value(op: str, doc: dict[str, Any]) -> int | str | None:
    value = doc.get("value")
    if op in ("semaphore.create", "semaphore.add"):
        return _int32(value, "value")
    if op == "variable.set":
        if not isinstance(value, str) or "\x00" in value:
            raise InvalidValueError("value: expected text without NUL bytes")
        return value
    if value is not None:
        raise InvalidValueError(f"{op} takes no value")
    return None


def _delivery(doc: dict[str, Any]) -> tuple[dict[str, str], tuple[str, ...]]:
    headers = doc.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in headers.items()):
        raise InvalidValueError("headers: expected an object of texts")
    bodies = doc.get("bodies", [])
    if not isinstance(bodies, list) or not bodies or not all(isinstance(b, str) and b for b in bodies):
        raise InvalidValueError("bodies: expected a non-empty list of non-empty texts")
    return cast(dict[str, str], headers), tuple(bodies)


def parse_request(line: bytes) -> Request:
    """The request in ``line`` (one JSON object), checked field by field; anything else raises
    :class:`~scalebox_hpc.errors.InvalidValueError` with a one-line reason."""
    if len(line) > MAX_REQUEST_BYTES:
        raise InvalidValueError(f"request longer than {MAX_REQUEST_BYTES} bytes")
    try:
        doc = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidValueError(f"request is not one JSON object: {type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise InvalidValueError("request is not one JSON object")
    op = doc.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise InvalidValueError(f"unknown op {str(op)[:40]!r}")
    task_id = doc.get("task_id")
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id <= 0:
        raise InvalidValueError("task_id: expected a positive integer")
    name = _text(doc, "name", required=op not in ("semaphore.list", "variable.list", "tasks.deliver", "app.state"))
    if op == "variable.set":
        check_variable_name(name)
    headers: dict[str, str] = {}
    bodies: tuple[str, ...] = ()
    module = ""
    if op == "tasks.deliver":
        module = _text(doc, "module", required=True)
        headers, bodies = _delivery(doc)
    return Request(cast(Op, op), task_id, name, _value(str(op), doc), module, headers, bodies)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_reply(line: bytes) -> Reply:
    """The launcher's answer; a garbled one raises :class:`ServiceError`."""
    try:
        doc = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ServiceError("the launcher's task services gave an unreadable answer") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise ServiceError("the launcher's task services gave an unreadable answer")
    if doc["ok"]:
        return Reply(True, doc.get("value"))
    return Reply(False, error=str(doc.get("error", "")), hint=str(doc.get("hint", "")), kind=str(doc.get("kind", "")))


def call(path: str, request: Request, *, timeout: float = 60.0) -> Any:
    """Send ``request`` to the launcher at ``path``; its value, or :class:`ServiceError`."""
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidValueError("timeout must be positive")
    try:
        line = request.encode()
    except UnicodeEncodeError:  # an argument of bytes that are not UTF-8 (argv's surrogate escapes)
        raise InvalidValueError(NOT_UTF8) from None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(line)
            sock.shutdown(socket.SHUT_WR)
            data = read_line(sock)
    except OSError as exc:
        kind = "outage" if isinstance(exc, TimeoutError) else "unreachable"
        raise ServiceError(f"cannot reach the launcher's task services at {path}: {exc.strerror or exc}",
                           hint="the launcher that ran this task has ended; this call only works while the "
                                "task runs", kind=kind) from None
    reply = parse_reply(data)
    if not reply.ok:
        raise ServiceError(reply.error, hint=reply.hint or None, kind=reply.kind)
    return reply.value


def read_line(sock: socket.socket, limit: int = MAX_REQUEST_BYTES) -> bytes:
    """The first line a peer sends (up to ``limit`` bytes), without its newline."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk or size > limit:
            break
    data = b"".join(chunks)
    return data.split(b"\n", 1)[0]


# -- the request directory: the same calls for a task whose scripts cannot reach the socket -------
# Inside a container the socket is not there (not bound in, and busybox has no unix-socket
# client), nor in an MPI rank on another node. The in-container helper (POSIX sh) writes a request
# file into a per-task directory of the slot's private dir (bound in, 0700) and waits for its
# reply files; the launcher turns the request into the same :class:`Request` and sends it down
# the same socket (same handler, same app limit, same running check, through the dispatcher),
# then writes what the Python CLI would have printed and its exit status. Files, not a FIFO: a
# FIFO blocks both ends until the other opens it (a killed caller would hang the launcher's side)
# and sh cannot wait on one with a deadline; a file can be polled with a bound, left behind by a
# killed caller and swept with its directory.

SERVICES_DIR_ENV: Final = "SCALEBOX_SERVICES_DIR"
"""The request directory's path in a task's environment (inside a container: its container path)."""

MAX_FILE_REQUEST_BYTES: Final = 2 * MAX_REQUEST_BYTES
"""A request file: one argv element of run.sh (128 KiB) escaped as JSON (at most 6 bytes a byte)
fits under this."""

COMMANDS: Final[dict[str, Op]] = {
    "semaphore create": "semaphore.create", "semaphore get": "semaphore.get",
    "semaphore increment": "semaphore.add", "semaphore decrement": "semaphore.add",
    "semaphore list": "semaphore.list", "variable set": "variable.set", "variable get": "variable.get",
    "variable list": "variable.list",
}
"""The CLI commands the request directory serves, and the socket op each one is."""

_FILE_KEYS: Final = frozenset({"task_id", "cmd", "name", "value", "app", "json"})
_NAMELESS: Final = frozenset({"semaphore list", "variable list"})
_INT_ARGUMENT: Final = {"semaphore create": ("[VALUE]", 0), "semaphore increment": ("[DELTA]", 1),
                        "semaphore decrement": ("[DELTA]", 1)}


@dataclass(frozen=True)
class FileCall:
    """One request file: a CLI command (``semaphore get``...) and its arguments as the caller
    typed them (texts: the host converts them as click would)."""

    task_id: int
    cmd: str
    name: str = ""
    value: str | None = None
    app: str | None = None
    as_json: bool = False


@dataclass(frozen=True)
class Rendered:
    """What the Python CLI would have done: its exit status, stdout and stderr."""

    status: int
    stdout: str = ""
    stderr: str = ""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key given twice")
    return dict(pairs)


def parse_file_call(data: bytes) -> FileCall:
    """The request file ``data`` (one JSON object of texts, written by user code: checked key by
    key); anything else raises :class:`~scalebox_hpc.errors.InvalidValueError`."""
    if len(data) > MAX_FILE_REQUEST_BYTES:
        raise InvalidValueError(f"request longer than {MAX_FILE_REQUEST_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise InvalidValueError(NOT_UTF8) from None
    except (ValueError, RecursionError) as exc:
        raise InvalidValueError(f"request is not one JSON object: {type(exc).__name__}") from None
    if not isinstance(doc, dict) or not set(doc) <= _FILE_KEYS or not all(isinstance(v, str) for v in doc.values()):
        raise InvalidValueError(f"request is not one JSON object of texts with keys {sorted(_FILE_KEYS)}")
    cmd = doc.get("cmd", "")
    if cmd not in COMMANDS:
        raise InvalidValueError(f"unknown command {cmd[:40]!r}")
    task_id = doc.get("task_id", "")
    if not (task_id.isascii() and task_id.isdigit()) or len(task_id) > 19 or int(task_id) <= 0:
        raise InvalidValueError("task_id: expected a positive integer")
    if ("name" in doc) == (cmd in _NAMELESS):
        raise InvalidValueError(f"{cmd}: " + ("takes no NAME" if cmd in _NAMELESS else "needs a NAME"))
    if ("value" in doc and cmd not in _INT_ARGUMENT and cmd != "variable set") or \
            (cmd == "variable set" and "value" not in doc):
        raise InvalidValueError(f"{cmd}: wrong number of arguments")
    if doc.get("json", "") not in ("", "1") or ("json" in doc and cmd not in _NAMELESS):
        raise InvalidValueError("json: only '1', and only for a list")
    return FileCall(int(task_id), cmd, doc.get("name", ""), doc.get("value"), doc.get("app"), doc.get("json") == "1")


def _usage(cmd: str, message: str) -> Rendered:
    """A click usage error: nothing on stdout, exit status 2."""
    return Rendered(2, "", f"Usage: scalebox {cmd} [OPTIONS] ...\nTry 'scalebox {cmd} -h' for help.\n\n"
                           f"Error: {message}\n")


def _click_int(text: str, low: int, high: int) -> int | str:
    """``text`` as click's integer types read it (``int()``), or the usage error's message."""
    try:
        number = int(text)
    except ValueError:
        return f"{text!r} is not a valid integer."
    return number if low <= number <= high else f"{number} is not in the range {low}<=x<={high}."


def render_error(exc: ScaleboxError) -> Rendered:
    """The Python CLI's one line for an error, exit status 1."""
    hint = getattr(exc, "hint", "")
    return Rendered(1, "", f"scalebox: error: {exc}" + (f" (hint: {hint})" if hint else "") + "\n")


def file_call_request(call: FileCall, own_app: str) -> Request | Rendered:
    """The socket request the call is, or what the CLI would have said without asking: the
    checks in the CLI's order (click's conversions, a reserved name, another app's ``--app``)."""
    if call.app is not None:
        app = _click_int(call.app, 1, 2**63 - 1)
        if isinstance(app, str):
            return _usage(call.cmd, f"Invalid value for '--app': {app}")
    value: int | str | None = call.value
    if call.cmd in _INT_ARGUMENT:
        label, default = _INT_ARGUMENT[call.cmd]
        got = default if call.value is None else _click_int(call.value, INT32_MIN, INT32_MAX)
        if isinstance(got, str):
            return _usage(call.cmd, f"Invalid value for '{label}': {got}")
        value = -got if call.cmd == "semaphore decrement" else got
    try:
        if call.cmd == "variable set":
            check_variable_name(call.name)
        if call.app is not None and str(int(call.app)) != own_app:
            raise ServiceError(f"a task may only use its own app's semaphores and variables (app {own_app})")
    except ScaleboxError as exc:
        return render_error(exc)
    return Request(COMMANDS[call.cmd], call.task_id, call.name, value)


def render_value(call: FileCall, value: Any) -> Rendered:
    """What the Python CLI prints for the call's answer ``value`` (click.echo to a file strips
    ANSI colour codes; a listing is one terminal-safe line per entry, or JSON)."""
    import click  # the host's side only: the task's own client stays stdlib

    from scalebox_hpc.text import terminal_safe

    def one_line(text: str) -> str:
        return terminal_safe(text).replace("\n", " ").replace("\t", " ")

    if call.cmd == "variable set":
        return Rendered(0)
    if call.cmd in _NAMELESS:
        if call.as_json:
            return Rendered(0, click.unstyle(json.dumps(value, default=str, ensure_ascii=False, indent=2)) + "\n")
        mapping = value if isinstance(value, dict) else {}
        return Rendered(0, "".join(f"{one_line(str(k))}\t{one_line(str(v))}\n" for k, v in mapping.items()))
    return Rendered(0, click.unstyle(str(value)) + "\n")


def answer_file(data: bytes, ask: Callable[[Request], Any], task_id: int, own_app: str) -> Rendered:
    """The reply to one request file of task ``task_id`` (app ``own_app``): parsed, refused when
    it names another task (a request left by an earlier task of the slot), else ``ask``-ed (the
    socket: its value, or a :class:`ServiceError`) and rendered as the Python CLI would."""
    try:
        call = parse_file_call(data)
    except InvalidValueError as exc:
        if str(exc) == NOT_UTF8:  # an argument of other bytes: the error the Python CLI gives
            return render_error(exc)
        return Rendered(2, "", f"scalebox: {exc}\n")  # not what the helper writes
    if call.task_id != task_id:
        return render_error(ServiceError(f"task {call.task_id} is not running in this launcher",
                                         hint="the calls work only while the task that makes them runs"))
    request = file_call_request(call, own_app)
    if isinstance(request, Rendered):
        return request
    try:
        return render_value(call, ask(request))
    except ScaleboxError as exc:
        return render_error(exc)


_file_seq = itertools.count(1)


def call_dir(directory: str, call: FileCall, *, timeout: float = 120.0) -> Rendered:
    """``call`` through the request directory ``directory``, as the in-container helper makes it,
    for a Python caller without the socket (an MPI collective's handler on any rank): the
    request written whole then renamed, the reply waited for (a directory not made yet, by a
    rank 0 that starts the task a moment later, is waited for too); :class:`ServiceError` when
    no answer comes within ``timeout`` seconds."""
    doc = {"task_id": str(call.task_id), "cmd": call.cmd}
    if call.cmd not in _NAMELESS:
        doc["name"] = call.name
    for key, value in (("value", call.value), ("app", call.app), ("json", "1" if call.as_json else None)):
        if value is not None:
            doc[key] = value
    stem = f"{os.getpid()}.{next(_file_seq)}"
    base = Path(directory)
    deadline = time.monotonic() + timeout
    data = (json.dumps(doc, ensure_ascii=False) + "\n").encode()
    while True:
        try:
            (base / f".{stem}.tmp").write_bytes(data)
            os.replace(base / f".{stem}.tmp", base / f"{stem}.req")
            break
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise ServiceError(f"no request directory {directory} (has the task ended?)",
                                   kind="unreachable") from None
            time.sleep(0.01)
    rc = base / f"{stem}.rc"
    while not rc.exists():
        if time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                (base / f"{stem}.req").unlink()
            raise ServiceError(f"the launcher did not answer within {timeout:g}s", kind="outage")
        time.sleep(0.01)
    try:
        out, err = (base / f"{stem}.out").read_text(), (base / f"{stem}.err").read_text()
        status = int(rc.read_text().strip() or 1)
    finally:
        for suffix in (".rc", ".out", ".err"):
            with contextlib.suppress(OSError):
                (base / f"{stem}{suffix}").unlink()
    return Rendered(status, out, err)


def service(cmd: str, name: str = "", value: str | int | None = None) -> str:
    """A semaphore or variable call of the running task (``cmd`` as the CLI names it:
    ``semaphore increment``, ``variable get``...), through ``$SCALEBOX_SERVICES_DIR``: what the
    CLI would print (a list as JSON), or :class:`ServiceError` with its error.

    In a collective handler, on any rank: ``int(service("semaphore increment", "tokens"))``.
    """
    directory, task = os.environ.get(SERVICES_DIR_ENV, ""), os.environ.get("TASK_ID", "")
    if not directory or not task.isdigit():
        raise ServiceError(f"no task services here (no {SERVICES_DIR_ENV} or TASK_ID: not inside a task)")
    if cmd not in COMMANDS:
        raise InvalidValueError(f"unknown command {cmd!r}; one of {', '.join(COMMANDS)}")
    call = FileCall(int(task), cmd, name, None if value is None else str(value), None, cmd in _NAMELESS)
    reply = call_dir(directory, call)
    if reply.status != 0:
        raise ServiceError(reply.stderr.strip().removeprefix("scalebox: error: ") or f"{cmd} failed ({reply.status})",
                           kind="refused")
    return reply.stdout.removesuffix("\n")

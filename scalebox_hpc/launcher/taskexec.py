"""The task-exec files a run leaves in its work dir, read (then removed) after every run.

- ``task-exec.json``: ``statusCode``, ``inputBytes``, ``outputBytes``, ``inputFiles``, ``outputFiles``
  (sizes computed), ``userText``, ``timestamps``, ``sinkJob`` + ``messageBody``;
- ``timestamps.txt``: ``time[,label]`` per line;
- ``user-file.txt``: free text kept with the execution;
- ``sink-tasks.txt``: ``body`` | ``body,{headers}`` | ``module,body[,{headers}]`` per line;
- ``output-files.txt`` / ``removed-files.txt``: one path per line, files the run created in /
  removed from the node-local scratch (kept in the scratch index for location-aware dispatch);
- the emit buffer (JSON lines) that ``scalebox task add`` / ``send-message`` /
  ``scalebox app set-finished`` write while run.sh runs: ``{"kind": "task", "body", "headers",
  "module"}`` and ``{"kind": "finish", "text"}``, written by the Python CLI or, for the same
  calls, by the POSIX-sh helper (``runtime/container_bin/scalebox``, in containers and bare runs
  alike), which passes ``--headers-json`` on unparsed as a string, ``"headers_json"``.

Everything in these files is written by user code (or by whatever it unpacked into its work dir),
so the collector trusts nothing: it opens only regular files, never follows a symlink, never
blocks on a FIFO, reads bounded amounts (the message files line by line), validates every field
and cleans every text it keeps so that PostgreSQL can store it. What it cannot use is reported
in ``ExecReport.invalid`` (the output is of the wrong shape, type, size or kind) or
``ExecReport.problems`` (the messages the run emitted); ``collect`` itself never raises.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import stat
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.models import MAX_BODY_BYTES, MAX_HEADERS_BYTES, UNSTORABLE, Message, storable_text

logger = logging.getLogger(__name__)

TASK_EXEC = "task-exec.json"
TIMESTAMPS = "timestamps.txt"
USER_FILE = "user-file.txt"
SINK_TASKS = "sink-tasks.txt"
OUTPUT_FILES = "output-files.txt"
REMOVED_FILES = "removed-files.txt"
EMIT_BUFFER_ENV = "SCALEBOX_EMIT_FILE"

MAX_TASK_EXEC_BYTES = 16 * 1024 * 1024
"""A larger task-exec.json is not read: ``json.loads`` holds the GIL (about 9 s per GB, which
starves the heartbeat) and needs several times the file's size in memory."""
MAX_TASK_EXEC_VALUES = 1_000_000
"""A task-exec.json with more JSON values than this (counted as commas, '[' and '{', so an
over-estimate) is not parsed: 16 MiB of ``[[],[],...`` would be 5.6 M lists, about 450 MB and
2 s with the GIL held. The largest valid file (two full file lists, full timestamps) has far fewer."""
MAX_USER_TEXT_BYTES = 1024 * 1024
"""user-file.txt and ``userText`` are kept up to this many UTF-8 bytes, then cut with a marker."""
MAX_TIMESTAMPS = 10_000
"""Timestamps kept per run (task-exec.json and timestamps.txt together)."""
MAX_FILE_ENTRIES = 100_000
"""Entries kept per file list (inputFiles, outputFiles + output-files.txt, removed-files.txt)."""
MAX_LINE_BYTES = MAX_BODY_BYTES + 1 + MAX_HEADERS_BYTES + 8 * 1024
"""Longest line of sink-tasks.txt or the emit buffer (200 KiB): room for one maximal body and
maximal headers plus a module name and JSON quoting; a longer line cannot be a valid message."""
MAX_ENTRY_BYTES = 4096
"""Longest line of timestamps.txt / output-files.txt / removed-files.txt (PATH_MAX)."""
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
"""Message lines (sink-tasks.txt and the emit buffer) read per run, in bytes: half of PostgreSQL's
256 MiB limit on the one jsonb array the hand-off sends, which more could never fit into."""
MAX_JSON_DEPTH = 64
"""Deepest nesting kept in headers and timestamp objects (deeper JSON kills recursive code)."""
MAX_NOTES = 100
"""Notes kept in ``problems`` and in ``invalid`` each; the rest are counted in a last note."""
MAX_NOTE_BYTES = 500
"""Longest note (UTF-8 bytes); longer ones are cut with a marker."""

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MAX_INT64 = 2**63 - 1


@dataclass
class ExecReport:
    """What the task-exec files said about one run.

    Every text in it is valid UTF-8 without NUL, so it can be stored as it is."""

    status: int | None = None
    """``statusCode`` from task-exec.json (always 0..255), None when absent or invalid."""
    input_bytes: int | None = None
    output_bytes: int | None = None
    input_files: list[str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)
    user_text: str | None = None
    timestamps: list[dict[str, Any]] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    """All the messages the run emitted, or none at all when there were more than allowed."""
    finish_text: str | None = None
    problems: list[str] = field(default_factory=list)
    """One line per rejected message: a malformed sink-tasks.txt or emit-buffer line, a message
    that cannot be stored, more than ``max_messages`` messages. The slot reports them in the
    execution's stderr and fails the run with -102 (EMIT_FAILED), never dropping them silently."""
    invalid: list[str] = field(default_factory=list)
    """One line per task-exec output of the wrong shape, type, size or kind: a file that is a
    FIFO, symlink or directory, task-exec.json that is not a JSON object or too large, a field
    of the wrong type (e.g. ``statusCode`` outside 0..255), a list with too many entries. What
    was wrong is ignored, the rest is used. The slot reports them in stderr and fails the run
    with -103 (OUTPUT_INVALID)."""


# -- text and JSON ------------------------------------------------------------------------------

def _decode(raw: bytes) -> str:
    # invalid UTF-8 becomes U+FFFD (never a surrogate), which leaves NUL to replace
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")


def _cap_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, marker included, when longer."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    marker = f"\n[scalebox: cut to {limit} bytes]"
    return data[:limit - len(marker)].decode("utf-8", "ignore") + marker  # ignore: a split last character


def _describe(value: object) -> str:
    """A short, safe rendering of a value from user JSON for a note (no deep repr)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "…")
    return type(value).__name__


def _no_constant(name: str) -> Any:
    # Python's json reads NaN/Infinity, which jsonb refuses: not JSON, not stored
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object hook refusing duplicate keys (an injected ``"kind"`` must not win silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_describe(key)}")
        out[key] = value
    return out


# Shared decoders are safe across slot threads, as json's own default decoder is.
_JSON = json.JSONDecoder(parse_constant=_no_constant)
_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant, object_pairs_hook=_unique_keys)
_JSON_ERRORS = (ValueError, TypeError, OverflowError, MemoryError)


class _Unstorable(ValueError):
    """A JSON value that cannot be kept: too deep, or a number out of range."""


def _clean_json(value: Any, depth: int = 1) -> Any:
    """A parsed JSON value with its texts cleaned; _Unstorable when too deep or not finite."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _Unstorable("number out of range")  # 1e999 parses as inf, which jsonb refuses
    if isinstance(value, dict | list):
        if depth > MAX_JSON_DEPTH:
            raise _Unstorable(f"nested deeper than {MAX_JSON_DEPTH}")
        if isinstance(value, list):
            return [_clean_json(v, depth + 1) for v in value]
        return {storable_text(k): _clean_json(v, depth + 1) for k, v in value.items()}
    return value


def _check_headers(headers: dict[str, Any]) -> None:
    """Refuse headers PostgreSQL cannot store or that recursive code cannot walk."""
    try:
        _clean_json(headers)
    except _Unstorable as exc:
        raise InvalidMessageError(f"task headers: {exc}") from None


# -- sink-tasks.txt lines -----------------------------------------------------------------------

def _split_headers(line: str) -> tuple[str, dict[str, Any] | None]:
    """Split a trailing ``,{json}`` headers object off a line, when it parses as an object."""
    pos = line.rfind(",{")
    while pos >= 0:
        try:
            # raw_decode parses in place: slicing the tail at every ",{" would be quadratic
            headers, end = _JSON.raw_decode(line, pos + 1)
        except RecursionError:
            raise InvalidMessageError("task headers are nested too deeply") from None
        except _JSON_ERRORS:
            headers, end = None, -1
        if isinstance(headers, dict) and not line[end:].strip(" \t\r\n"):
            _check_headers(headers)
            return line[:pos], headers
        pos = line.rfind(",{", 0, pos)
    return line, None


def parse_sink_line(line: str, modules: Collection[str]) -> Message:
    """One sink-tasks.txt line; the module form applies when the first field names a module.

    Total: for any string it returns a Message or raises InvalidMessageError."""
    text, headers = _split_headers(line)
    module: str | None = None
    head, sep, rest = text.partition(",")
    if sep and head in modules:
        module, text = head, rest
    return Message(body=text, headers=headers or {}, module=module)


# -- emit-buffer records ------------------------------------------------------------------------

_TASK_KEYS = frozenset({"kind", "body", "headers", "module", "headers_json"})
_FINISH_KEYS = frozenset({"kind", "text"})
_SURROGATE = re.compile("[\ud800-\udfff]")
"""In a decoded emit record: a byte that was not UTF-8 (kept by surrogateescape), or an escaped lone surrogate."""


def _unknown_keys(item: dict[str, Any], allowed: frozenset[str]) -> None:
    extra = [k for k in item if k not in allowed]
    if extra:
        shown = ", ".join(_describe(k) for k in extra[:5])
        raise InvalidMessageError(f"unknown key(s) {shown}")


def _headers_json(text: object, pairs: dict[str, Any]) -> dict[str, Any]:
    """The headers of ``--headers-json TEXT`` under the ``-H`` ``pairs``, as the Python CLI makes
    them (cli.tasks._parse_headers): the in-run sh helper cannot parse JSON, so it passes the
    text on as a string and the host judges it here, its errors becoming the run's problems."""
    if not isinstance(text, str):
        raise InvalidMessageError(f"headers_json must be a string, not {_describe(text)}")
    try:
        loaded = _JSON.decode(text)  # json.loads: white space around, a repeated key's last value
    except RecursionError:
        raise InvalidMessageError("--headers-json is nested too deeply") from None
    except _JSON_ERRORS as exc:
        raise InvalidMessageError(f"--headers-json is not JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise InvalidMessageError("--headers-json must be a JSON object")
    return {**loaded, **pairs}


def _emitted_task(item: object) -> Message:
    """``{"kind": "task", "body": str, "headers": {...}?, "module": str|null?, "headers_json": str?}``
    → Message; a parse error (an InvalidMessageError in place of the item) is raised."""
    if isinstance(item, InvalidMessageError):
        raise item
    if not isinstance(item, dict):
        raise InvalidMessageError("not a JSON object")
    if item.get("kind", "task") != "task":
        raise InvalidMessageError(f"unknown kind {_describe(item.get('kind'))}")
    _unknown_keys(item, _TASK_KEYS)
    body, headers, module = item.get("body"), item.get("headers", {}), item.get("module")
    if not isinstance(body, str):
        raise InvalidMessageError(f"body must be a string, not {_describe(body)}")
    if not isinstance(headers, dict):
        raise InvalidMessageError(f"headers must be a JSON object, not {_describe(headers)}")
    if module is not None and not isinstance(module, str):
        raise InvalidMessageError(f"module must be a string or null, not {_describe(module)}")
    if module is not None and UNSTORABLE.search(module):
        raise InvalidMessageError("module name contains NUL or an invalid character")
    if "headers_json" in item:
        headers = _headers_json(item["headers_json"], headers)
    _check_headers(headers)
    return Message(body=body, headers=headers, module=module)


def _finish_text(item: dict[str, Any]) -> str:
    """``{"kind": "finish", "text": str}`` → the text, cleaned."""
    _unknown_keys(item, _FINISH_KEYS)
    text = item.get("text")
    if not isinstance(text, str):
        raise InvalidMessageError(f"finish text must be a string, not {_describe(text)}")
    if _SURROGATE.search(text):
        raise InvalidMessageError("finish text is not valid UTF-8")
    return storable_text(text)


# -- task-exec.json -----------------------------------------------------------------------------

def _text_or_number(value: Any) -> Any:
    """userText may be a number (kept as its text); anything else must be a string."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


_FileList = list[str] | None


class _TaskExecJson(BaseModel):
    """The fields of task-exec.json; strict: ``true`` is no status, ``"0"`` no number."""

    model_config = ConfigDict(strict=True, extra="ignore")

    status_code: Annotated[int, Field(ge=0, le=255)] | None = Field(None, alias="statusCode")
    input_bytes: Annotated[int, Field(ge=0, le=_MAX_INT64)] | None = Field(None, alias="inputBytes")
    output_bytes: Annotated[int, Field(ge=0, le=_MAX_INT64)] | None = Field(None, alias="outputBytes")
    input_files: _FileList = Field(None, alias="inputFiles")
    output_files: _FileList = Field(None, alias="outputFiles")
    user_text: Annotated[str | None, BeforeValidator(_text_or_number)] = Field(None, alias="userText")
    timestamps: list[Any] | None = Field(None, alias="timestamps")
    sink_job: str | None = Field(None, alias="sinkJob")
    message_body: str | None = Field(None, alias="messageBody")


_LIST_CAPS = {"inputFiles": MAX_FILE_ENTRIES, "outputFiles": MAX_FILE_ENTRIES, "timestamps": MAX_TIMESTAMPS}


def _validate_task_exec(data: dict[str, Any]) -> tuple[_TaskExecJson, list[str]]:
    """The valid fields of ``data`` and one note per invalid field (which is left out)."""
    notes: list[str] = []
    for key, cap in _LIST_CAPS.items():
        value = data.get(key)
        if isinstance(value, list) and len(value) > cap:
            notes.append(f"{TASK_EXEC}: {key}: {len(value)} entries, more than {cap}; the rest is ignored")
            data[key] = value[:cap]  # also bounds the number of validation errors below
    try:
        return _TaskExecJson.model_validate(data), notes
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first: dict[object, tuple[int, str]] = {}
    for err in errors:
        name: object = err["loc"][0] if err["loc"] else ""
        count, text = first.get(name, (0, ""))
        where = ".".join(str(p) for p in err["loc"])
        first[name] = (count + 1, text or f"{where}: {err['msg']}")
    for count, text in first.values():
        more = f" (and {count - 1} more errors)" if count > 1 else ""
        notes.append(f"{TASK_EXEC}: {text}{more}; ignored")
    rest = {k: v for k, v in data.items() if k not in first}
    try:
        return _TaskExecJson.model_validate(rest), notes
    except ValidationError as exc:  # fields are independent, so this should not happen
        notes.append(f"{TASK_EXEC}: {exc.error_count()} errors; ignored")
        return _TaskExecJson.model_validate({}), notes


HostPath = Callable[[str], str | None]
"""A reported path → its host path (None: only the container has it); see ``Session.host_path``."""


def _sizes(work_dir: Path, files: list[str], host_path: HostPath | None) -> int:
    """Total size of the files that exist on this host; the others count nothing."""
    total = 0
    for name in files:
        if "\x00" in name:  # names no file; os.stat would raise "embedded null byte"
            continue
        try:
            where = host_path(name) if host_path is not None else name
            if where is None:
                continue
            total += os.stat(where if os.path.isabs(where) else work_dir / where).st_size
        except (OSError, ValueError):  # missing, unreadable, not encodable: no size, as before
            continue
    return min(total, _MAX_INT64)


# -- opening and reading ------------------------------------------------------------------------

_KINDS = ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _remove(path: str | Path, mode: int | None) -> None:
    """Remove ``path`` itself: a symlink, never its target; a directory with its contents."""
    try:
        if mode is not None and stat.S_ISDIR(mode):
            # rmtree refuses a symlink and does not follow the links inside (fd-based on Linux)
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        _remove(path, stat.S_IFDIR)
    except OSError as exc:
        logger.warning("cannot remove %s: %s", path, _reason(exc))


def _take(path: str | Path, label: str, invalid: Callable[[str], None]) -> IO[bytes] | None:
    """Open ``path`` if it is a regular file, remove its name, and return the open stream.

    Anything else (symlink, FIFO, directory, device) is removed unopened and noted: opening a
    FIFO blocks, a device may act on open, and a link (say from an unpacked tarball) would make
    the collector read a file the run does not own."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        invalid(f"{label}: cannot be read ({_reason(exc)})")
        return None
    if not stat.S_ISREG(mode):
        invalid(f"{label}: is a {_kind(mode)}, not a regular file; removed unread")
        _remove(path, mode)
        return None
    try:  # O_NOFOLLOW / O_NONBLOCK: the name may have been swapped since the lstat
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        invalid(f"{label}: cannot be opened ({_reason(exc)}); removed")
        _remove(path, None)
        return None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            _remove(path, mode)  # read from the fd; the name is free for the next run
            return os.fdopen(fd, "rb", buffering=1 << 16)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    invalid(f"{label}: is a {_kind(mode)}, not a regular file; removed unread")
    _remove(path, mode)
    return None


def _lines(stream: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line without its end of line), or None for a line over ``limit`` bytes,
    which is skipped without ever being held whole."""
    number = 0
    while raw := stream.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = stream.readline(1 << 16)
            yield number, None
        else:
            yield number, raw.removesuffix(b"\n").removesuffix(b"\r")


# -- the collector ------------------------------------------------------------------------------

class _Collector:
    """One collect() call: the report and the budgets shared by the files."""

    def __init__(self, work_dir: Path, modules: Collection[str], host_path: HostPath | None,
                 max_messages: int) -> None:
        self.work_dir = work_dir
        self.modules = modules
        self.host_path = host_path
        self.max_messages = max(0, max_messages)
        self.report = ExecReport()
        self.seen = 0
        """Messages the run tried to emit (valid or not)."""
        self.message_bytes = 0
        self.overflow = False
        """More messages than allowed: stop reading them and emit none."""
        self.dropped = {"problems": 0, "invalid": 0}

    # notes
    def _note(self, kind: str, into: list[str], note: str) -> None:
        if len(into) >= MAX_NOTES:
            self.dropped[kind] += 1
            return
        into.append(_cap_text(storable_text(" ".join(note.split())), MAX_NOTE_BYTES))

    def problem(self, note: str) -> None:
        self._note("problems", self.report.problems, note)

    def invalid(self, note: str) -> None:
        self._note("invalid", self.report.invalid, note)

    def _count(self, nbytes: int) -> bool:
        """Count one more message; False (and no messages at all) once over a budget."""
        self.seen += 1
        self.message_bytes += nbytes
        if self.seen > self.max_messages:
            self._overflow(f"more than {self.max_messages} messages (arguments.max_messages); "
                           "emit fewer per task or split the work")
        elif self.message_bytes > MAX_MESSAGE_BYTES:
            self._overflow(f"messages of more than {MAX_MESSAGE_BYTES} bytes in all; "
                           "pass large payloads as file paths or split the work")
        return not self.overflow

    def _overflow(self, note: str) -> None:
        self.overflow = True
        self.report.messages = []  # a task emits all or nothing
        self.report.problems.insert(0, note)  # the one that matters: first, and never dropped

    # files
    def read(self, path: str | Path, label: str, reader: Callable[[IO[bytes]], None]) -> None:
        """Take ``path`` and give it to ``reader``; whatever happens, the name is gone after."""
        try:
            stream = _take(path, label, self.invalid)
            if stream is None:
                return
            with stream:
                reader(stream)
        except OSError as exc:
            self.invalid(f"{label}: cannot be read ({_reason(exc)})")
        except Exception as exc:  # a bug here must cost this run, not the slot (audit F1)
            logger.exception("reading %s", path)
            self.invalid(f"{label}: could not be read (internal error {type(exc).__name__}; see the launcher log)")
            _remove(path, None)

    def task_exec(self, stream: IO[bytes]) -> None:
        size = os.fstat(stream.fileno()).st_size
        raw = stream.read(MAX_TASK_EXEC_BYTES + 1) if size <= MAX_TASK_EXEC_BYTES else b""
        if size > MAX_TASK_EXEC_BYTES or len(raw) > MAX_TASK_EXEC_BYTES:
            self.invalid(f"{TASK_EXEC}: more than {MAX_TASK_EXEC_BYTES} bytes; not read")
            return
        if raw.count(b",") + raw.count(b"[") + raw.count(b"{") > MAX_TASK_EXEC_VALUES:
            self.invalid(f"{TASK_EXEC}: more than {MAX_TASK_EXEC_VALUES} JSON values; not read")
            return
        try:
            data = _JSON.decode(raw.decode("utf-8", "replace").removeprefix("\ufeff"))
        except RecursionError:
            self.invalid(f"{TASK_EXEC}: nested too deeply")
            return
        except _JSON_ERRORS as exc:
            self.invalid(f"{TASK_EXEC}: not JSON ({exc})")
            return
        if not isinstance(data, dict):
            self.invalid(f"{TASK_EXEC}: not a JSON object")
            return
        fields, notes = _validate_task_exec(data)
        for note in notes:
            self.invalid(note)
        self._use(fields)

    def _use(self, fields: _TaskExecJson) -> None:
        report = self.report
        report.status = fields.status_code
        raw_inputs, raw_outputs = fields.input_files or [], fields.output_files or []
        # extended, not replaced: output-files.txt is read into the same list later
        report.input_files.extend(storable_text(f) for f in raw_inputs)
        report.output_files.extend(storable_text(f) for f in raw_outputs)
        report.input_bytes = fields.input_bytes
        if report.input_bytes is None:
            report.input_bytes = _sizes(self.work_dir, raw_inputs, self.host_path) or None
        report.output_bytes = fields.output_bytes
        if report.output_bytes is None:
            report.output_bytes = _sizes(self.work_dir, raw_outputs, self.host_path) or None
        if fields.user_text is not None:
            report.user_text = _cap_text(storable_text(fields.user_text), MAX_USER_TEXT_BYTES)
        for n, stamp in enumerate(fields.timestamps or []):
            self._json_stamp(n, stamp)
        if fields.message_body is not None:
            self._json_message(fields.message_body, fields.sink_job)

    def _json_stamp(self, n: int, stamp: Any) -> None:
        where = f"{TASK_EXEC}: timestamps.{n}"
        if isinstance(stamp, dict):
            try:
                self.report.timestamps.append(_clean_json(stamp))
            except _Unstorable as exc:
                self.invalid(f"{where}: {exc}; ignored")
        elif isinstance(stamp, str | int | float):
            self.report.timestamps.append({"time": storable_text(str(stamp))})
        else:
            self.invalid(f"{where}: a {_describe(stamp)}, not an object, text or number; ignored")

    def _json_message(self, body: str, sink_job: str | None) -> None:
        if not self._count(len(body)):
            return
        try:
            if sink_job is not None and UNSTORABLE.search(sink_job):
                raise InvalidMessageError("sinkJob contains NUL or an invalid character")
            self.report.messages.append(Message(body=body, module=sink_job or None))
        except InvalidMessageError as exc:
            self.problem(f"{TASK_EXEC}: messageBody: {exc}")

    def timestamps_txt(self, stream: IO[bytes]) -> None:
        for n, raw in _lines(stream, MAX_ENTRY_BYTES):
            if raw is None:
                self.invalid(f"{TIMESTAMPS}:{n}: longer than {MAX_ENTRY_BYTES} bytes; ignored")
                continue
            line = _decode(raw).strip()
            if not line:
                continue
            if len(self.report.timestamps) >= MAX_TIMESTAMPS:
                self.invalid(f"timestamps: more than {MAX_TIMESTAMPS}; the rest is ignored")
                return
            time, _, label = line.partition(",")
            self.report.timestamps.append({"time": time, "label": label} if label else {"time": time})

    def user_file(self, stream: IO[bytes]) -> None:
        text = _decode(stream.read(MAX_USER_TEXT_BYTES + 1))  # never more: the cap cuts it anyway
        joined = (self.report.user_text + "\n" + text) if self.report.user_text else text
        self.report.user_text = _cap_text(joined, MAX_USER_TEXT_BYTES)

    def sink_tasks(self, stream: IO[bytes]) -> None:
        for n, raw in _lines(stream, MAX_LINE_BYTES):
            if self.overflow:
                return
            if raw is None:
                if self._count(MAX_LINE_BYTES):
                    self.problem(f"{SINK_TASKS}:{n}: longer than {MAX_LINE_BYTES} bytes; skipped")
                continue
            line = raw.decode("utf-8", "replace")  # NUL kept: Message refuses it, as a problem
            if not line.strip():
                continue
            if not self._count(len(raw)):
                return
            try:
                self.report.messages.append(parse_sink_line(line, self.modules))
            except InvalidMessageError as exc:
                self.problem(f"{SINK_TASKS}:{n}: {exc}")

    def emit_buffer(self, stream: IO[bytes]) -> None:
        for n, raw in _lines(stream, MAX_LINE_BYTES):
            if self.overflow:
                return
            if raw is None:
                if self._count(MAX_LINE_BYTES):
                    self.problem(f"emitted message {n}: longer than {MAX_LINE_BYTES} bytes; skipped")
                continue
            if raw.strip():
                self._emit_record(n, raw)

    def _emit_record(self, n: int, raw: bytes) -> None:
        # surrogateescape, not replace: a byte that is not UTF-8 (the sh helper writes argv
        # bytes as they are) stays visible, and the body, module or text it is in is refused
        # as the Python CLI refuses it, never turned into U+FFFD silently
        try:
            item: object = _STRICT_JSON.decode(raw.decode("utf-8", "surrogateescape"))
        except RecursionError:
            item = InvalidMessageError("nested too deeply")
        except _JSON_ERRORS as exc:
            item = InvalidMessageError(f"not JSON ({exc})")
        try:
            if isinstance(item, dict) and item.get("kind") == "finish":
                self.report.finish_text = _finish_text(item)
            elif self._count(len(raw)):
                self.report.messages.append(_emitted_task(item))
        except InvalidMessageError as exc:
            self.problem(f"emitted message {n}: {exc}")

    def file_list(self, label: str, into: list[str]) -> Callable[[IO[bytes]], None]:
        def reader(stream: IO[bytes]) -> None:
            for n, raw in _lines(stream, MAX_ENTRY_BYTES):
                if raw is None:
                    self.invalid(f"{label}:{n}: longer than {MAX_ENTRY_BYTES} bytes; ignored")
                    continue
                entry = _decode(raw).strip()
                if not entry:
                    continue
                if len(into) >= MAX_FILE_ENTRIES:
                    self.invalid(f"{label}: more than {MAX_FILE_ENTRIES} entries; the rest is ignored")
                    return
                into.append(entry)
        return reader

    def finish(self) -> ExecReport:
        for kind, into in (("problems", self.report.problems), ("invalid", self.report.invalid)):
            if self.dropped[kind]:
                into.append(f"... and {self.dropped[kind]} more")
        return self.report


def collect(
    work_dir: Path, emit_file: str | Path, modules: Collection[str], host_path: HostPath | None = None,
    *, max_messages: int = 100_000,
) -> ExecReport:
    """Read and remove the task-exec files of the run that just ended; never raises.

    ``host_path`` maps the paths a containerised run wrote (``/work/x``, ``/local/x``) to the host,
    for the sizes; the file lists are kept as the run wrote them (cleaned). More than
    ``max_messages`` messages (``arguments.max_messages``) give one problem and no messages.

    The caller turns a non-empty ``report.invalid`` into status -103 (OUTPUT_INVALID) and a
    non-empty ``report.problems`` into -102 (EMIT_FAILED), and shows both in the run's stderr."""
    c = _Collector(work_dir, modules, host_path, max_messages)
    task_exec, timestamps, user_file, sink_tasks, output_files, removed_files = _exec_paths(work_dir)
    c.read(task_exec, TASK_EXEC, c.task_exec)
    c.read(timestamps, TIMESTAMPS, c.timestamps_txt)
    c.read(user_file, USER_FILE, c.user_file)
    c.read(sink_tasks, SINK_TASKS, c.sink_tasks)
    c.read(emit_file, "emit buffer", c.emit_buffer)
    c.read(output_files, OUTPUT_FILES, c.file_list(OUTPUT_FILES, c.report.output_files))
    c.read(removed_files, REMOVED_FILES, c.file_list(REMOVED_FILES, c.report.removed_files))
    return c.finish()


@functools.lru_cache(maxsize=1024)
def _exec_paths(work_dir: Path) -> tuple[str, ...]:
    """The task-exec files' paths in ``work_dir``, as text: joined once per slot's work dir, not
    once per task (pathlib's joins and conversions were a sixth of a 32-slot node's Python time)."""
    return tuple(os.path.join(work_dir, name)
                 for name in (TASK_EXEC, TIMESTAMPS, USER_FILE, SINK_TASKS, OUTPUT_FILES, REMOVED_FILES))

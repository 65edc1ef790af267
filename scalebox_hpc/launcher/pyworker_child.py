"""The worker process of an in-slot Python handler (``handler: file.py:function`` on a module).

Started by :mod:`scalebox_hpc.launcher.pyworker` (``python -u -P -c BOOT PACKAGE_ROOT REQ_FD
REPLY_FD HANDLER CODE_PATH PARENT_PID``, BOOT calling :func:`main`) with the slot's environment
and its work dir as the current directory; it loads the handler once, then runs it for every
task it is sent, in this one process::

    from scalebox_hpc.launcher.pyworker_child import HandlerTask

    def handle(task: HandlerTask) -> int | None:
        n = int(task.body)
        print("working on", n)                        # the task's stdout
        task.send_message(str(n * n), headers={"square": True})   # to the first sink
        return 0                                        # None means 0

What the handler gets (:class:`HandlerTask`, also :func:`task` inside it): ``task_id``, ``body``,
``headers``, ``attempt``, ``module``, ``work_dir``, ``env`` (the environment run.sh would get:
``os.environ`` holds the same, ``TASK_ID`` included), ``send_message(body, module=None,
headers=None)`` and ``set_finished(text)``, as on :class:`scalebox_hpc.mpi.MpiTask`.

The status is what the function returns: None → 0, an int 0..255 → that code; another value is
-103 (OUTPUT_INVALID). An exception is status 1 with its traceback in the task's stderr,
``sys.exit(N)`` is status N (the worker goes on). What the handler prints — Python prints, C
code, child processes — goes straight to files the launcher reads as the task's stdout/stderr
tails (``python -u``: nothing waits in a buffer when the worker is killed).

Wire protocol (both directions): a 4-byte big-endian length, then that many bytes of UTF-8
JSON. After the start the worker sends ``{"ready": true}`` (or ``{"ready": false, "error":
TEXT}`` when the handler cannot be loaded, then exits); per request (``ID NUL ATTEMPT NUL
EMIT_PATH NUL HEADERS_JSON NUL BODY``, see :func:`encode_request`) it replies ``{"status":
int|null, "messages": [[body, module, headers], ...], "finish": text, "files": bool, "notes":
[text, ...], "usage": [user_us, system_us, max_rss_kb|null], "hold": true}`` (keys other than status omitted
when empty), or, when there is nothing else, the status and the usage packed as
:data:`USAGE_REPLY` (``>Bqqq``: status, user µs, system µs, peak RSS KiB or -1). End of file on
the request pipe ends the worker.

Several requests may wait in the pipe (the launcher sends a batch of tasks in one write); they
run in order, one reply each. A task that printed (its stdout or stderr file is not empty after
it: the launcher empties both before a batch) replies with ``"hold": true`` and runs nothing
more until the launcher has read that output and emptied the files, which it says with an
empty frame (GO, a zero length); the requests read meanwhile wait their turn. So each task's
output files hold its output only, as with one task at a time, and most tasks (which print
nothing) cost the launcher no file operation at all.

The usage is what the task cost the worker (``getrusage`` of itself and of the children it
reaped, from the end of the previous task to the end of this one: the handler and the framing):
CPU exactly; the peak RSS only when the worker's (or its children's, above the worker's)
high-water mark rose during this task, when it is this task's peak — otherwise unknown (-1),
as a process's peak cannot be reset between tasks.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import os
import resource
import signal
import struct
import sys
import time
import traceback
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalebox_hpc.models import Message
from scalebox_hpc.mpi import load_handler

HEADER = struct.Struct(">I")
"""The frame header: the payload's length in bytes."""
TASK_EXEC_NAMES = ("task-exec.json", "timestamps.txt", "user-file.txt", "sink-tasks.txt",
                   "output-files.txt", "removed-files.txt")
"""The task-exec files (:mod:`scalebox_hpc.launcher.taskexec`, not imported: it needs pydantic,
which would add to every worker start). Only when one exists does the launcher collect them."""
_PR_SET_PDEATHSIG = 1
SETTLED_NS = 50_000_000
"""A directory's mtime this old (50 ms) is trusted to change with its next entry: file systems
stamp with a coarse clock (a jiffy, 1-10 ms), so an mtime taken within that tick could repeat."""


class DirWatch:
    """Whether any of ``names`` exists in ``directory``, for one ``stat`` of the directory while
    its entries have not changed (instead of one ``lstat`` per name per task): creating,
    removing or renaming an entry changes a directory's mtime."""

    def __init__(self, directory: Path, names: tuple[str, ...]) -> None:
        self.directory = str(directory)
        self.paths = [str(directory / name) for name in names]
        self._settled: int | None = None
        """The mtime at which none of the names existed, once old enough to be trusted."""

    def any(self) -> bool:
        """True when one of the names exists (or the directory cannot be looked at)."""
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except OSError:
            return True  # let the launcher's collector say what is wrong
        if mtime == self._settled:
            return False
        found = any(os.path.lexists(path) for path in self.paths)
        self._settled = mtime if not found and time.time_ns() - mtime > SETTLED_NS else None
        return found


@dataclass
class HandlerTask:
    """One task as an in-slot Python handler sees it."""

    task_id: int
    body: str
    headers: dict[str, Any]
    attempt: int
    """1 for the first attempt, 2 for the first retry, ..."""
    module: str
    work_dir: Path
    messages: list[Message] = field(default_factory=list)
    finish_text: str | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment run.sh would get (a copy of ``os.environ``)."""
        return dict(os.environ)

    def send_message(self, body: str, module: str | None = None, headers: Mapping[str, Any] | None = None) -> None:
        """Emit a message (to ``module``, default the module's first sink), handed off with this
        task's result if it ends with status 0; an invalid body or headers raise here."""
        self.messages.append(Message(body=body, headers=dict(headers or {}), module=module))

    def set_finished(self, text: str) -> None:
        """Finish the app with ``text`` as its result once this task is recorded."""
        self.finish_text = text


_current: HandlerTask | None = None


def task() -> HandlerTask:
    """The task the handler in this worker is running now."""
    if _current is None:
        raise RuntimeError("no task is running (task() works inside an in-slot handler)")
    return _current


def _die_with_parent(parent: int) -> None:
    """Get SIGKILL when the launcher (the slot thread that started us) dies, e.g. kill -9: an
    orphaned worker must not go on writing into a work dir the next launcher uses."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


class FrameReader:
    """Frames from a descriptor, read in large chunks (one read per request, usually)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()

    def next(self) -> bytes | None:
        """The next frame's payload; None at end of file."""
        buf = self.buf
        while True:
            if len(buf) >= HEADER.size:
                end = HEADER.size + HEADER.unpack_from(buf)[0]
                if len(buf) >= end:
                    payload = bytes(buf[HEADER.size:end])
                    del buf[:end]
                    return payload
            data = os.read(self.fd, 1 << 16)
            if not data:
                return None
            buf += data


def encode_request(task_id: int, body: str, headers: dict[str, Any], attempt: int, emit: str) -> bytes:
    """A request's payload: id, attempt, emit path, headers (JSON) and body, NUL-separated
    (none of them holds a NUL; cheaper than one JSON document: the common task is tiny)."""
    head = json.dumps(headers) if headers else "{}"
    return f"{task_id}\0{attempt}\0{emit}\0{head}\0{body}".encode("utf-8", "surrogatepass")


def decode_request(payload: bytes) -> dict[str, Any]:
    """The request :func:`encode_request` made (from the launcher: trusted)."""
    task_id, attempt, emit, head, body = payload.decode("utf-8", "surrogatepass").split("\0", 4)
    return {"id": int(task_id), "attempt": int(attempt), "emit": emit,
            "headers": {} if head == "{}" else json.loads(head), "body": body}


PLAIN_FRAMES = [HEADER.pack(1) + bytes([code]) for code in range(256)]
"""The reply of a task that only has a status: a one-byte payload (a JSON reply is longer)."""
USAGE_REPLY = struct.Struct(">Bqqq")
"""A reply with only a status and the task's usage: status, user and system CPU in
microseconds, peak RSS in KiB (-1: not known)."""


@dataclass(frozen=True)
class Meter:
    """``getrusage`` of the worker and of its reaped children at one moment."""

    own: Any
    children: Any

    @classmethod
    def now(cls) -> Meter:
        """The worker's counters now."""
        return cls(resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))

    def since(self, before: Meter) -> list[int | None]:
        """[user µs, system µs, peak RSS KiB or None] used between ``before`` and this moment."""
        user = sum(after.ru_utime - was.ru_utime for after, was in ((self.own, before.own),
                                                                    (self.children, before.children)))
        system = sum(after.ru_stime - was.ru_stime for after, was in ((self.own, before.own),
                                                                      (self.children, before.children)))
        # a peak counts when it rose during the task (the worker's cannot be reset between tasks),
        # a child's only above the worker's own peak: a forked child's ru_maxrss starts with its
        # copy of the worker (see runtime.local.usage_of)
        own, kids = self.own.ru_maxrss, self.children.ru_maxrss
        rose = [own] if own > before.own.ru_maxrss else []
        if kids > max(before.children.ru_maxrss, own):
            rose.append(kids)
        return [max(0, round(user * 1e6)), max(0, round(system * 1e6)), max(rose) if rose else None]


def _send(fd: int, obj: object) -> None:
    data = json.dumps(obj).encode()  # ensure_ascii: lone surrogates travel as escapes
    view = memoryview(HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _status(code: object, notes: list[str]) -> int | None:
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        if 0 <= code <= 255:
            return code
        notes.append(f"the handler returned status {code}, outside 0..255")
        return None
    notes.append(f"the handler returned a {type(code).__name__}, not an int status or None")
    return None


def _exit_status(exc: SystemExit) -> object:
    """sys.exit's code as run.sh's would be: None → 0, a text → printed, 1."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def run_one(handler: Any, request: dict[str, Any], work_dir: Path, module: str,
            watch: DirWatch | None = None) -> dict[str, Any]:
    """Run the handler on one request; the reply (never raises for what the handler does).
    ``watch`` looks for the task-exec files (default: a new one on ``work_dir``)."""
    global _current
    current = HandlerTask(task_id=request["id"], body=request["body"], headers=request["headers"],
                          attempt=request["attempt"], module=module, work_dir=work_dir)
    emit = request["emit"]
    os.environ["TASK_ID"] = str(current.task_id)
    os.environ["SCALEBOX_EMIT_FILE"] = emit  # for `send-message` run from the handler's child processes
    notes: list[str] = []
    _current = current
    try:
        code = handler(current)
    except SystemExit as exc:
        code = _exit_status(exc)
    except BaseException:  # the user's code failed (KeyboardInterrupt too): its traceback is the task's stderr
        traceback.print_exc()
        code = 1
    finally:
        _current = None
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    reply: dict[str, Any] = {"status": _status(code, notes)}
    if current.messages:
        reply["messages"] = [[m.body, m.module, m.headers] for m in current.messages]
    if current.finish_text is not None:
        reply["finish"] = str(current.finish_text)
    if watch is None:
        watch = DirWatch(work_dir, TASK_EXEC_NAMES)
    if watch.any() or os.path.lexists(emit):
        reply["files"] = True
    if notes:
        reply["notes"] = notes
    return reply


def printed() -> bool:
    """Whether the task's output files (the worker's stdout and stderr) hold anything."""
    try:
        return os.fstat(1).st_size > 0 or os.fstat(2).st_size > 0
    except OSError:  # the handler closed them: nothing of it can be read anyway
        return False


def wait_for_go(requests: FrameReader, queued: deque[bytes]) -> bool:
    """Read frames up to the launcher's GO (an empty one), keeping the requests among them in
    ``queued``; False at end of file."""
    while True:
        frame = requests.next()
        if frame is None:
            return False
        if not frame:
            return True
        queued.append(frame)


def main(argv: list[str]) -> int:
    """The worker's loop; returns its exit code."""
    req_fd, reply_fd, spec, code_path, parent = int(argv[0]), int(argv[1]), argv[2], Path(argv[3]), int(argv[4])
    _die_with_parent(parent)
    for fd in (req_fd, reply_fd):  # not for the handler's own child processes
        os.set_inheritable(fd, False)
    faulthandler.enable()  # a segfault prints the Python stack into the task's stderr
    sys.path.append(str(code_path))  # helper modules next to the handler's file (appended: shadows nothing)
    try:
        handler = load_handler(spec, code_path)
    except BaseException as exc:
        cause = exc.__cause__
        detail = "".join(traceback.format_exception(cause)) if cause is not None else ""
        _send(reply_fd, {"ready": False, "error": f"{exc}\n{detail}"})
        return 0
    _send(reply_fd, {"ready": True})
    work_dir = Path.cwd()
    module = os.environ.get("MODULE_NAME", "")
    watch = DirWatch(work_dir, TASK_EXEC_NAMES)
    requests = FrameReader(req_fd)
    queued: deque[bytes] = deque()
    """Requests read while waiting for GO after a task that printed: run next, in order."""
    # one reading per task: a task's usage runs from the previous task's end (so it includes
    # the framing of the previous reply and of its own request: microseconds; the wait between
    # tasks is a blocking read, no CPU), which halves the meter's cost (~3 us a reading)
    before = Meter.now()
    while True:
        payload = queued.popleft() if queued else requests.next()
        if payload is None:
            return 0
        if not payload:  # a GO nothing waits for
            continue
        reply = run_one(handler, decode_request(payload), work_dir, module, watch)
        hold = printed()
        if hold:
            reply["hold"] = True
        after = Meter.now()
        usage, before = after.since(before), after
        try:
            status = reply["status"]
            if len(reply) == 1 and status is not None:
                rss = usage[2]
                frame = USAGE_REPLY.pack(status, usage[0] or 0, usage[1] or 0, -1 if rss is None else rss)
                os.write(reply_fd, HEADER.pack(USAGE_REPLY.size) + frame)  # 29 bytes: always written whole
            else:
                _send(reply_fd, {**reply, "usage": usage})
        except (TypeError, ValueError) as exc:  # should not happen: every value was checked
            _send(reply_fd, {"status": None, "notes": [f"the reply could not be encoded: {exc}"]})
        except BrokenPipeError:
            return 0
        if hold and not wait_for_go(requests, queued):
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

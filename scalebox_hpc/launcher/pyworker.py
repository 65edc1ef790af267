"""In-slot Python handlers, the launcher's side: one worker process per slot, tasks sent in batches.

A module that names ``handler: file.py:function`` (or ``package.module:function``) runs no
run.sh: its slot starts one Python worker (:mod:`scalebox_hpc.launcher.pyworker_child`, the
launcher's own interpreter) on its first task and sends it every task over a pipe: the tasks
a slot holds (its prefetched ones, see :meth:`Worker.run_many`) go in one write, their replies
come back one per task as each ends (usually several in one read) — no process, thread or file
per task. The worker's stdout and stderr are the slot's ``run.out`` / ``run.err``; a task that
printed holds the worker until the launcher has read them and emptied both (the ``hold`` / GO
handshake of :mod:`~scalebox_hpc.launcher.pyworker_child`), so what a handler prints is read as
the task's output tails exactly as run.sh's is, capped the same way, and a task that printed
nothing costs no file operation.

Everything run.sh has is kept: ``task_max_seconds`` per task (the worker's whole process group
gets TERM, then KILL; status 124, and a new worker for the next task; the tasks of the batch
after it never ran and are sent again to the new worker, their attempt unchanged), a worker
that dies (``os._exit``, a segfault: the exit code or 128+signal, with a note in stderr;
restarted, the rest of the batch sent again), aborts and drains
(the worker is killed, the task given back), task-exec files, retries and the hand-off. A handler
that cannot be imported makes each task -101 with the import error in its stderr, as an
unstartable run.sh does (and, as for run.sh, 5 such runs in a row end the slot in ERROR).

The worker's replies are parsed as untrusted input (:func:`decode_reply` is total): a handler
may write anything onto any descriptor it finds.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalebox_hpc.errors import InvalidMessageError, ScaleboxError
from scalebox_hpc.launcher import taskexec
from scalebox_hpc.launcher.outputs import CappedOutputs
from scalebox_hpc.launcher.pyworker_child import HEADER, USAGE_REPLY, encode_request
from scalebox_hpc.models import Message, Usage, storable_text
from scalebox_hpc.runtime.base import Outcome
from scalebox_hpc.runtime.paths import open_new_file

logger = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The directory holding this scalebox_hpc package: appended to the worker's sys.path, so that a
launcher run from a source checkout (not installed) starts workers too; an installed copy,
found first, is the same code."""
_BOOT = ("import sys; sys.path.append(sys.argv.pop(1)); "
         "from scalebox_hpc.launcher.pyworker_child import main; sys.exit(main(sys.argv[1:]))")
MAX_FRAME_BYTES = taskexec.MAX_MESSAGE_BYTES + 16 * 2**20
"""Largest reply accepted: the messages one run may emit (128 MiB, as for run.sh) plus room for
JSON quoting; a larger frame ends the worker and fails the task with -103."""
MAX_NOTES = 20
"""Notes kept from one reply."""
KILL_GRACE = 2.0
"""Seconds between TERM and KILL when a worker is ended (timeout, abort, close)."""
_POLL_SECONDS = 0.2
"""How often a waiting slot looks at its abort flag and the output files' sizes."""
_MAX_DEPTH = taskexec.MAX_JSON_DEPTH
BATCH_BYTES = 32 * 2**10
"""Requests sent in one write at most (one at least): less than a pipe holds (64 KiB), so the
write never waits for the worker — which may be writing replies nobody reads yet."""
GO_FRAME = HEADER.pack(0)
"""The empty frame that lets a worker holding after a task that printed go on."""


class _Cut(enum.Enum):
    """Why a wait for the worker ended without a frame."""

    ABORT = "abort"
    TIMEOUT = "timeout"


class ProtocolError(ScaleboxError):
    """A worker's reply is not what the protocol says (garbage on the pipe, wrong types)."""


@dataclass(frozen=True)
class Reply:
    """A worker's validated answer for one task."""

    status: int | None
    """The handler's status (0..255); None when it returned something else (see ``notes``)."""
    messages: list[tuple[str, str | None, Any]] = field(default_factory=list)
    """(body, module, headers) as sent: checked by :func:`add_reply`, where a bad one is -102."""
    finish_text: str | None = None
    files: bool = False
    """Task-exec files (or an emit buffer) exist: the slot collects them."""
    notes: list[str] = field(default_factory=list)
    usage: Usage | None = field(default=None, compare=False)
    """What the task cost the worker (see :mod:`scalebox_hpc.launcher.pyworker_child`); a
    measurement, not what the handler said: two replies saying the same are equal."""
    hold: bool = field(default=False, compare=False)
    """The task printed: the worker waits for GO (its output read, the files emptied); the
    protocol's, not what the handler said."""


_MAX_MICROS = 10**15
"""More CPU microseconds than this (31 years) in one reply is not a measurement."""


def _usage(user_us: object, system_us: object, rss_kb: object) -> Usage:
    """The reply's usage fields → Usage; ProtocolError for anything but counts in range."""
    if not (_count(user_us) and _count(system_us)):
        raise ProtocolError("the worker's reply has no valid usage")
    assert isinstance(user_us, int) and isinstance(system_us, int)
    if rss_kb is None or rss_kb == -1:
        rss = None
    elif _count(rss_kb) and isinstance(rss_kb, int) and rss_kb > 0:
        rss = rss_kb
    else:
        raise ProtocolError("the worker's reply has no valid peak RSS")
    return Usage(cpu_user_s=user_us / 1e6, cpu_system_s=system_us / 1e6, max_rss_kb=rss)


def _count(value: object) -> bool:
    """An int (not a bool) in 0.._MAX_MICROS."""
    return type(value) is int and 0 <= value <= _MAX_MICROS


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_JSON = json.JSONDecoder(parse_constant=_no_constant)


def _depth(value: Any, limit: int) -> bool:
    """True when ``value`` nests no deeper than ``limit`` (iterative: any depth is safe)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def decode_reply(data: bytes) -> Reply:
    """One reply frame's payload → Reply; ProtocolError for anything else. Total for any bytes."""
    if len(data) == 1:  # only a status, as one byte
        return _PLAIN[data[0]]
    if len(data) == USAGE_REPLY.size:  # the common case: a status and the usage (never JSON: too short)
        status, user_us, system_us, rss_kb = USAGE_REPLY.unpack(data)
        return Reply(status=status, usage=_usage(user_us, system_us, rss_kb))
    try:
        obj = _JSON.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError) as exc:
        raise ProtocolError(f"the worker's reply is not JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("the worker's reply is not a JSON object")
    unknown = set(obj) - {"status", "messages", "finish", "files", "notes", "usage", "hold"}
    if unknown:
        raise ProtocolError(f"the worker's reply has unknown keys {sorted(map(repr, unknown))[:3]}")
    status = obj.get("status")
    if status is not None and (type(status) is not int or not 0 <= status <= 255):
        raise ProtocolError("the worker's reply has no valid status")
    messages = obj.get("messages", [])
    if not isinstance(messages, list):
        raise ProtocolError("the worker's reply: messages is not a list")
    checked: list[tuple[str, str | None, Any]] = []
    for item in messages:
        if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                or not (item[1] is None or isinstance(item[1], str)) or not _depth(item[2], _MAX_DEPTH)):
            raise ProtocolError("the worker's reply: a message is not [body, module, headers]")
        checked.append((item[0], item[1], item[2]))
    finish = obj.get("finish")
    if finish is not None and not isinstance(finish, str):
        raise ProtocolError("the worker's reply: finish is not a text")
    files = obj.get("files", False)
    if not isinstance(files, bool):
        raise ProtocolError("the worker's reply: files is not a boolean")
    notes = obj.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise ProtocolError("the worker's reply: notes is not a list of texts")
    usage = obj.get("usage")
    if usage is not None and not (isinstance(usage, list) and len(usage) == 3):
        raise ProtocolError("the worker's reply: usage is not [user_us, system_us, max_rss_kb]")
    hold = obj.get("hold", False)
    if not isinstance(hold, bool):
        raise ProtocolError("the worker's reply: hold is not a boolean")
    return Reply(status=status, messages=checked, finish_text=None if finish is None else storable_text(finish),
                 files=files, notes=[storable_text(n[:500]) for n in notes[:MAX_NOTES]],
                 usage=None if usage is None else _usage(*usage), hold=hold)


_PLAIN = [Reply(status=code) for code in range(256)]


def add_reply(report: taskexec.ExecReport, reply: Reply, max_messages: int) -> None:
    """Merge what the handler emitted into ``report`` (the task-exec files', when collected):
    messages after the files' ones, within ``max_messages`` and the collector's byte budget; a
    message that cannot be stored becomes a problem (the slot makes the task -102)."""
    report.invalid.extend(reply.notes)
    if reply.finish_text is not None:
        report.finish_text = reply.finish_text
    if not reply.messages:
        return
    if len(report.messages) + len(reply.messages) > max(0, max_messages):
        report.messages = []  # a task emits all or nothing
        report.problems.insert(0, f"more than {max_messages} messages (arguments.max_messages); "
                                  "emit fewer per task or split the work")
        return
    size = 0
    for n, (body, module, headers) in enumerate(reply.messages, 1):
        size += len(body) + (len(module) if module else 0)
        if size > taskexec.MAX_MESSAGE_BYTES:
            report.messages = []
            report.problems.insert(0, f"messages of more than {taskexec.MAX_MESSAGE_BYTES} bytes in all; "
                                      "pass large payloads as file paths or split the work")
            return
        try:
            if not isinstance(headers, dict):
                raise InvalidMessageError("headers must be a JSON object")
            if module is not None and storable_text(module) != module:
                raise InvalidMessageError("module name contains NUL or an invalid character")
            report.messages.append(Message(body=body, headers=headers, module=module))
        except InvalidMessageError as exc:
            report.problems.append(f"handler message {n}: {exc}")


@dataclass
class WorkerOutputs(CappedOutputs):
    """The worker's run.out / run.err during one task: :meth:`tail` of a file the task left
    empty costs no open (most handlers print nothing)."""

    empty: frozenset[Path] = frozenset()

    def tail(self, path: Path) -> str:
        """As :meth:`CappedOutputs.tail`; "" at once for a file known empty."""
        if path in self.empty:
            return ""
        return super().tail(path)

    def was_cut(self, path: Path) -> bool:
        """Whether :meth:`check` truncated ``path`` during this task."""
        return path in self._streams


@dataclass
class HandlerRun:
    """How one task's round trip ended."""

    reply: Reply | None = None
    start_error: str | None = None
    """The worker could not be started or the handler not loaded: -101, this is why."""
    timed_out: bool = False
    aborted: bool = False
    returncode: int | None = None
    """Exit code of a worker that died during the task (negative: the signal)."""
    notes: list[str] = field(default_factory=list)

    @property
    def died(self) -> bool:
        """The worker ended (killed or exited) while the task ran."""
        return self.returncode is not None and not self.timed_out

    def outcome(self) -> Outcome:
        """The run as run.sh's would be: the handler's status, 124, or the dead worker's code."""
        if self.timed_out:
            return Outcome(returncode=-signal.SIGKILL, timed_out=True)
        if self.reply is not None:
            return Outcome(returncode=self.reply.status or 0, usage=self.reply.usage)
        return Outcome(returncode=self.returncode or 0)  # 0: the output note makes it -103

    def report(self, collected: taskexec.ExecReport | None, max_messages: int) -> taskexec.ExecReport:
        """The task-exec report (``collected``, else empty) with the handler's messages and
        finish text, and every note of this run in ``invalid`` (printed in stderr; -103 when
        nothing else failed the task)."""
        report = collected if collected is not None else taskexec.ExecReport()
        if self.reply is not None:
            add_reply(report, self.reply, max_messages)
        report.invalid.extend(self.notes)
        return report


class Worker:
    """One slot's handler worker process; start lazily with :meth:`run`, end with :meth:`close`.
    Not thread-safe: one slot thread uses it."""

    def __init__(self, handler: str, code_path: Path, *, cwd: Path, env: dict[str, str], private: Path) -> None:
        self.handler = handler
        self.code_path = code_path
        self.cwd = cwd
        self.env = env
        self.out_path = private / "run.out"
        self.err_path = private / "run.err"
        self.outputs = WorkerOutputs((self.out_path, self.err_path))
        """The output files of the task going on (or that just ended)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        """Workers started so far (1 + the restarts)."""
        self._req = -1
        self._rep = -1
        self._out = -1
        self._err = -1
        self._buf = bytearray()
        self._poller = select.poll()
        self._dirty = True  # output files may hold the previous worker's or task's output
        self._held = False  # the worker waits for GO (its last task printed)

    # -- tasks -----------------------------------------------------------------------------------
    def run(self, request: bytes, *, timeout: float | None, abort: threading.Event) -> HandlerRun:
        """Send one task (:func:`request_for`) and wait for its reply, at most ``timeout``
        seconds (and the start, when the worker is not up, as long again); never raises for
        what the handler does."""
        return next(self.run_many([request], timeout=timeout, abort=abort))

    def run_many(
        self, requests: Sequence[bytes], *, timeout: float | None, abort: threading.Event,
    ) -> Generator[HandlerRun, None, None]:
        """Send several tasks at once (up to :data:`BATCH_BYTES` a write) and yield each one's
        run, in order, as its reply comes: ``timeout`` counts for each task from the end of the
        one before. The caller reads a yielded run's output (:attr:`outputs`) before it asks for
        the next (a task that printed holds the worker until then). When the worker ends during
        a task (timeout, death, a bad reply), the tasks after it never ran: they go to a new
        worker. After an abort every task left is yielded as aborted."""
        left = list(requests)
        while left:
            chunk = _chunk(left)
            failed = self._begin(b"".join(HEADER.pack(len(r)) + r for r in chunk), timeout, abort)
            if failed is not None:  # this task cannot run: the next one tries a new worker
                left.pop(0)
                yield failed
                if failed.aborted:
                    yield from (HandlerRun(aborted=True) for _ in left)
                    return
                continue
            for n in range(len(chunk)):
                if n:  # the previous task's output is read: the worker may go on
                    self._release_hold()
                    self.outputs = WorkerOutputs((self.out_path, self.err_path))
                run = self._wait(timeout, abort)
                self._account_outputs(run.reply)
                left.pop(0)
                yield run
                if run.aborted:
                    yield from (HandlerRun(aborted=True) for _ in left)
                    return
                if run.reply is None:  # the worker is gone: what it had not run goes to a new one
                    break

    def _begin(self, frames: bytes, timeout: float | None, abort: threading.Event) -> HandlerRun | None:
        """Make sure a worker runs, empty the output files and send ``frames``; None when sent,
        else the run of the first task, failed (-101) or aborted."""
        if self.proc is not None and self.proc.poll() is not None:  # it died between tasks
            logger.warning("handler worker of %s exited between tasks; starting a new one", self.cwd.name)
            self._reap(0.0)
        if self.proc is None:
            failed = self._start(timeout, abort)
            if failed is not None:
                return failed
        self._release_hold()
        self._clear_outputs()
        try:
            self._send(frames)
        except OSError:  # the worker died between tasks (a thread of the handler exiting it): a new one
            logger.warning("handler worker of %s died between tasks; starting a new one", self.cwd.name)
            self._reap(KILL_GRACE)
            failed = self._start(timeout, abort)
            if failed is not None:
                return failed
            self._clear_outputs()
            try:
                self._send(frames)
            except OSError as exc:
                self._reap(KILL_GRACE)
                return HandlerRun(start_error=f"the handler's worker does not take tasks: {exc}")
        return None

    def _release_hold(self) -> None:
        """After a task that printed: empty the output files, then let the worker go on."""
        if not self._held:
            return
        self._held = False
        self._clear_outputs()
        with contextlib.suppress(OSError):  # gone: the next wait sees it
            self._send(GO_FRAME)

    def _wait(self, timeout: float | None, abort: threading.Event) -> HandlerRun:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            frame = self._receive(deadline, abort)
        except ProtocolError as exc:
            self._reap(0.0)
            return HandlerRun(notes=[f"{exc}; the worker was ended and is restarted for the next task"])
        if frame is _Cut.ABORT:
            self._reap(KILL_GRACE)
            return HandlerRun(aborted=True)
        if frame is _Cut.TIMEOUT:
            self._reap(KILL_GRACE)
            return HandlerRun(timed_out=True, returncode=-signal.SIGKILL,
                              notes=[f"the handler ran over task_max_seconds ({timeout:g} s); its worker was "
                                     "killed and is restarted for the next task"])
        if frame is None:  # end of file: the worker died during the task
            code = self._reap(KILL_GRACE)
            return HandlerRun(returncode=code, notes=[_death_note(code)])
        try:
            return HandlerRun(reply=decode_reply(frame))
        except ProtocolError as exc:
            self._reap(0.0)
            return HandlerRun(notes=[f"{exc}; the worker was ended and is restarted for the next task"])

    def _receive(self, deadline: float | None, abort: threading.Event | None) -> bytes | _Cut | None:
        """The next frame's payload; None at end of file (or the worker gone); a _Cut when the
        wait was cut short."""
        while True:
            if len(self._buf) >= HEADER.size:
                size = HEADER.unpack_from(self._buf)[0]
                if size > MAX_FRAME_BYTES:
                    raise ProtocolError(f"the worker's reply is {size} bytes, more than {MAX_FRAME_BYTES}")
                if len(self._buf) >= HEADER.size + size:
                    payload = bytes(self._buf[HEADER.size:HEADER.size + size])
                    del self._buf[:HEADER.size + size]
                    return payload
            wait = _POLL_SECONDS if deadline is None else max(0.0, min(_POLL_SECONDS, deadline - time.monotonic()))
            if self._poller.poll(math.ceil(wait * 1000)):
                data = os.read(self._rep, 1 << 20)
                if not data:
                    return None
                self._buf += data
                continue
            self.outputs.check()  # a handler printing without end must not fill the work root
            if self.proc is not None and self.proc.poll() is not None:
                return None  # exited, though a process it forked may still hold the pipe open
            if abort is not None and abort.is_set():
                return _Cut.ABORT
            if deadline is not None and time.monotonic() >= deadline:
                return _Cut.TIMEOUT

    def _send(self, frame: bytes) -> None:
        view = memoryview(frame)
        while view:
            view = view[os.write(self._req, view):]

    # -- output files ----------------------------------------------------------------------------
    def _clear_outputs(self) -> None:
        if self._dirty:  # O_APPEND: the worker's next write lands at the new end, 0
            os.ftruncate(self._out, 0)
            os.ftruncate(self._err, 0)
            self._dirty = False
        self.outputs = WorkerOutputs((self.out_path, self.err_path))

    def _account_outputs(self, reply: Reply | None) -> None:
        if (reply is not None and not reply.hold and not self._dirty
                and not self.outputs.was_cut(self.out_path) and not self.outputs.was_cut(self.err_path)):
            # it printed nothing (the worker looked): both files are still empty, no fstat needed
            self.outputs.empty = frozenset((self.out_path, self.err_path))
            return
        self._held = reply is not None and reply.hold and self.proc is not None
        empty = set()
        for path, fd in ((self.out_path, self._out), (self.err_path, self._err)):
            if os.fstat(fd).st_size == 0 and not self.outputs.was_cut(path):
                empty.add(path)
            else:
                self._dirty = True
        self.outputs.empty = frozenset(empty)

    # -- the process -----------------------------------------------------------------------------
    def _start(self, timeout: float | None, abort: threading.Event) -> HandlerRun | None:
        """Start a worker and wait for its hello; None when it is ready, else the failed run."""
        self._open_outputs()
        self._clear_outputs()
        req_r, self._req = os.pipe()
        self._rep, rep_w = os.pipe()
        self._buf.clear()
        # -u: nothing waits in a buffer when the worker is killed; -P: the work dir (task data) is
        # not put first on sys.path, where a file named like a module would shadow it
        argv = [sys.executable, "-u", "-P", "-c", _BOOT, str(PACKAGE_ROOT), str(req_r), str(rep_w), self.handler,
                str(self.code_path), str(os.getpid())]
        try:
            self.proc = subprocess.Popen(
                argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                pass_fds=(req_r, rep_w), start_new_session=True,  # its own group: killed as a whole
            )
        except OSError as exc:
            self._close_pipes()
            return HandlerRun(start_error=f"cannot start the handler's worker ({sys.executable}): {exc}")
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.starts += 1
        self._poller = select.poll()
        self._poller.register(self._rep, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        frame: bytes | _Cut | None
        try:
            frame = self._receive(deadline, abort)
            hello = _JSON.decode(frame.decode()) if isinstance(frame, bytes) else None
        except (ProtocolError, ValueError, UnicodeDecodeError, RecursionError):
            frame, hello = b"", None
        if frame is _Cut.ABORT:
            self._reap(KILL_GRACE)
            return HandlerRun(aborted=True)
        if isinstance(hello, dict) and hello.get("ready") is True:
            logger.debug("handler worker %s started for %s (pid %s)", self.handler, self.cwd.name, self.proc.pid)
            return None
        if isinstance(hello, dict) and isinstance(hello.get("error"), str):
            why = f"the handler cannot be loaded: {storable_text(hello['error'][:20000])}"
        elif frame is _Cut.TIMEOUT:
            why = f"the handler's worker did not start within task_max_seconds ({timeout:g} s)"
        else:
            why = "the handler's worker did not start"
        code = self._reap(KILL_GRACE)
        if code not in (None, 0) and not isinstance(hello, dict):
            why += f" ({_exit_text(code)}); its stderr:\n{self.outputs.tail(self.err_path)}"
        self._dirty = True
        return HandlerRun(start_error=why)

    def _open_outputs(self) -> None:
        if self._out < 0:
            self._out = open_new_file(self.out_path, append=True)  # no symlink followed, owner only
            self._err = open_new_file(self.err_path, append=True)

    def _close_pipes(self) -> None:
        for fd in (self._req, self._rep):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._req = self._rep = -1

    def _reap(self, grace: float) -> int | None:
        """End the worker and everything in its process group; its exit code (None if none).
        An exited worker's group still gets KILL: what the handler started must not outlive it."""
        proc, self.proc = self.proc, None
        self._held = False
        self._close_pipes()  # a live worker reads end of file and leaves its loop
        if proc is None:
            return None
        code = proc.poll()
        if code is None and grace > 0:
            _signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(grace)
        _signal_group(proc.pid, signal.SIGKILL)
        return proc.wait() if code is None else code

    def close(self) -> None:
        """End the worker (it leaves its loop on end of file; killed after a grace) and close
        the output files."""
        proc = self.proc
        if proc is not None:
            self._close_pipes()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(KILL_GRACE)
            self._reap(0.0)
        for fd in (self._out, self._err):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._out = self._err = -1
        self._dirty = True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def _death_note(code: int | None) -> str:
    how = "ended" if code is None else _exit_text(code)
    return (f"the handler's worker process died ({how}) before it reported this task's result; "
            "a new worker runs the next task")


def _chunk(requests: Sequence[bytes]) -> Sequence[bytes]:
    """The first requests of ``requests`` that fit in :data:`BATCH_BYTES` (the first always)."""
    size = 0
    for n, request in enumerate(requests):
        size += HEADER.size + len(request)
        if n and size > BATCH_BYTES:
            return requests[:n]
    return requests


def request_for(task_id: int, body: str, headers: dict[str, Any], attempt: int, emit: Path | str) -> bytes:
    """The request for one task, as :meth:`Worker.run` takes it."""
    return encode_request(task_id, body, headers, attempt, str(emit))

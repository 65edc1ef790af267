"""The launcher's task-services socket (see :mod:`scalebox_hpc.taskapi` for the protocol).

One listening unix socket per launcher, in a directory only its user can enter; each connection
carries one call and gets one answer. The calls are handled one connection per short thread, so
a client that connects and says nothing holds only its own thread (until ``READ_TIMEOUT``), and
reach the database through the node's dispatcher, like every other statement of the launcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scalebox_hpc import taskapi
from scalebox_hpc.errors import DatabaseError, ScaleboxError

logger = logging.getLogger(__name__)

READ_TIMEOUT = 10.0
"""How long a connection may take to send its request."""
ACCEPT_POLL = 0.5
"""How often the accept loop looks whether it should stop."""

Handler = Callable[[taskapi.Request], Any]
"""Answers one checked request (the app is the launcher's): the value, or a ScaleboxError."""


def peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's uid (SO_PEERCRED, Linux); None where the kernel cannot say."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def answer(line: bytes, handle: Handler, running: Callable[[int], bool]) -> taskapi.Reply:
    """The reply to one request line: parsed, refused unless its task runs here now, handled."""
    try:
        request = taskapi.parse_request(line)
        if not running(request.task_id):
            return taskapi.Reply(False, error=f"task {request.task_id} is not running in this launcher",
                                 hint="the calls work only while the task that makes them runs", kind="not-running")
        return taskapi.Reply(True, handle(request))
    except DatabaseError as exc:
        return taskapi.Reply(False, error=str(exc), hint=exc.hint, kind="outage")
    except ScaleboxError as exc:
        return taskapi.Reply(False, error=str(exc), hint=exc.hint, kind=type(exc).__name__)
    except Exception as exc:  # a bug must not kill the socket thread: the caller gets the reason
        logger.exception("task services: %s failed", type(exc).__name__)
        return taskapi.Reply(False, error=f"the launcher failed: {type(exc).__name__}: {exc}")


def _check_private(directory: Path) -> None:
    """Refuse a socket directory another user could enter: the socket is chmod-ed after its bind."""
    info = directory.lstat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise ScaleboxError(
            f"task services: {directory} is not a private directory (mode {info.st_mode & 0o7777:o}, "
            f"owner uid {info.st_uid})", hint="the launcher makes it with mkdtemp: is the umask or TMPDIR odd?")


class TaskServices:
    """The socket at ``path``: started by the launcher before its slots, stopped after them."""

    def __init__(self, path: Path, handle: Handler, running: Callable[[int], bool]) -> None:
        self.path = path
        self.handle = handle
        self.running = running
        self.calls = 0
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (the directory must be the caller's, 0700: see workdirs.private_dir) and listen."""
        _check_private(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a killed launcher of this directory
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Not os.umask around the bind: the umask is the process's, and launchers start in
        # threads; two overlapping starts left it at 0177 for good (every later directory
        # 0600). The 0700 directory keeps others out until the chmod.
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.listen(64)
        sock.settimeout(ACCEPT_POLL)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="task-services", daemon=True)
        self._thread.start()
        logger.info("task services listening on %s", self.path)

    def stop(self) -> None:
        """Stop accepting and remove the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(ACCEPT_POLL * 4)
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            threading.Thread(target=self._serve, args=(conn,), name="task-services-call", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            uid = peer_uid(conn)
            if uid is not None and uid != os.geteuid():
                logger.warning("task services: refused a connection from uid %d", uid)
                return
            conn.settimeout(READ_TIMEOUT)
            try:
                line = taskapi.read_line(conn)
            except OSError:
                return
            reply = answer(line, self.handle, self.running)
            self.calls += 1
            with contextlib.suppress(OSError):
                conn.sendall(reply.encode())

"""The launcher's side of a task's request directory (see :mod:`scalebox_hpc.taskapi`): one per
run of a task whose scripts cannot reach the task-services socket (a container; an MPI rank).

The directory is made fresh for each run (``svc-TASK-RANDOM`` in the slot's private dir, 0700)
and removed when the run ends, with whatever a killed caller left in it; those a killed launcher
left are swept when the next run of the slot starts. So a request of an earlier task is never
read for a later one, and one that names another task is refused.

Polled, not watched: a scan of a directory that is almost always empty costs a few microseconds,
every :data:`POLL_SECONDS` while the run lives (no inotify binding in the standard library, and a
missed event cannot lose a call). Each request is answered in its own short thread, so a slow
call (the database away) does not hold the others back; at most :data:`MAX_INFLIGHT` at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scalebox_hpc import taskapi
from scalebox_hpc.runtime.paths import open_regular, write_fresh

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.02
"""How often the directory is looked at (the caller polls for its reply as often)."""
MAX_INFLIGHT = 8
DRAIN_SECONDS = 10.0
"""How long the end of a run waits for its calls in flight (a semaphore a killed task was
incrementing is incremented or not before the slot's next task runs, never after)."""
REQUEST_NAME = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,20})?\.req\Z")
"""``PID[.START].req``: the caller's pid and its start time (unique while the run lives)."""
PREFIX = "svc-"
FARM_IDLE_POLL_SECONDS = 0.2
"""The longest pause between two scans of an MPI farm task's directory while no call comes: rank 0
serves one per worker rank, on the shared file system, so a quiet task costs 5 scans a second,
not 50; a call resets the pause (a burst of calls is answered at the full rate)."""


def next_wait(wait: float, started: int, *, base: float = POLL_SECONDS, cap: float = POLL_SECONDS) -> float:
    """The pause before the next scan: ``base`` after a scan that found a request, else half as
    long again as ``wait``, up to ``cap``."""
    return base if started else min(cap, wait * 1.5)

Ask = Callable[[taskapi.Request], Any]


def socket_asker(path: str) -> Ask:
    """Requests sent down the launcher's task-services socket at ``path``."""
    return lambda request: taskapi.call(path, request)


def sweep(private_dir: Path) -> None:
    """Remove the request directories earlier runs of the slot left (a killed launcher's)."""
    with contextlib.suppress(FileNotFoundError), os.scandir(private_dir) as entries:
        for entry in entries:
            if entry.name.startswith(PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)


class RequestDir:
    """The request directory of one run of task ``task_id`` of app ``app_id``."""

    def __init__(self, parent: Path, ask: Ask, task_id: int, app_id: str, *, name: str | None = None,
                 idle_poll: float = POLL_SECONDS) -> None:
        self.path = parent / (name or f"{PREFIX}{task_id}-{secrets.token_hex(6)}")
        self.idle_poll = idle_poll
        """The longest pause between scans while no call comes (see :func:`next_wait`)."""
        self.ask = ask
        self.task_id = task_id
        self.app_id = app_id
        self.calls = 0
        self._stop = threading.Event()
        self._taken: set[str] = set()
        self._slots = threading.BoundedSemaphore(MAX_INFLIGHT)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._calls: set[threading.Thread] = set()

    def start(self) -> RequestDir:
        """Make the directory (0700, never one that exists) and start answering."""
        sweep(self.path.parent)
        self.path.mkdir(mode=0o700)
        self._thread = threading.Thread(target=self._loop, name=f"svc-dir-{self.task_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and remove the directory with what is left in it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(POLL_SECONDS * 50)
        deadline = time.monotonic() + DRAIN_SECONDS
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.join(max(0.0, deadline - time.monotonic()))
        if any(call.is_alive() for call in calls):
            logger.warning("task %s: %d task-service call(s) still in flight after its run ended",
                           self.task_id, sum(call.is_alive() for call in calls))
        shutil.rmtree(self.path, ignore_errors=True)

    def _loop(self) -> None:
        wait = POLL_SECONDS
        while not self._stop.wait(wait):
            try:
                wait = next_wait(wait, self.scan(), cap=self.idle_poll)
            except OSError as exc:  # the directory removed under us (the run ended): stop quietly
                if not self._stop.is_set():
                    logger.warning("task %s: request dir %s: %s", self.task_id, self.path, exc)
                return

    def scan(self) -> int:
        """Start answering every new request; how many were started."""
        started = 0
        with os.scandir(self.path) as entries:
            names = [e.name for e in entries if REQUEST_NAME.match(e.name)]
        for name in names:
            with self._lock:
                if name in self._taken:
                    continue
                if not self._slots.acquire(blocking=False):
                    break  # the next scan takes it
                self._taken.add(name)
                call = threading.Thread(target=self._serve, args=(name,), name="svc-dir-call", daemon=True)
                self._calls.add(call)
            call.start()
            started += 1
        return started

    def _serve(self, name: str) -> None:
        try:
            data = self._take(name)
            if data is None:
                return
            try:
                reply = taskapi.answer_file(data, self.ask, self.task_id, self.app_id)
            except Exception as exc:  # a bug must not go unseen, nor leave the caller waiting
                logger.exception("task %s: request %s failed", self.task_id, name)
                reply = taskapi.Rendered(1, "", f"scalebox: error: the launcher failed: {type(exc).__name__}: {exc}\n")
            self.calls += 1
            self._reply(name.removesuffix(".req"), reply)
        finally:
            with self._lock:
                self._taken.discard(name)
                self._calls.discard(threading.current_thread())
            self._slots.release()

    def _take(self, name: str) -> bytes | None:
        """The request's bytes (a regular file, not followed if a link; one byte over the limit at
        most, so an oversized one is seen as such), removed; None if not one."""
        path = self.path / name
        try:
            with open_regular(path) as f:
                return f.read(taskapi.MAX_FILE_REQUEST_BYTES + 1)
        except OSError:
            return None
        finally:
            path.unlink(missing_ok=True)

    def _reply(self, stem: str, reply: taskapi.Rendered) -> None:
        """``STEM.out`` and ``STEM.err``, then ``STEM.rc`` renamed into place: the caller reads the
        first two once the third is there. Each is written beside its name and renamed onto it, so
        a file the task planted under that name is replaced, never followed."""
        try:
            write_fresh(self.path / f"{stem}.out", reply.stdout)
            write_fresh(self.path / f"{stem}.err", reply.stderr)
            write_fresh(self.path / f"{stem}.rc", f"{reply.status}\n")
        except OSError as exc:  # the run ended (directory gone), or the task planted something
            logger.info("task %s: no reply to %s: %s", self.task_id, stem, exc)

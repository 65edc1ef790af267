"""The bare-process runtime: scripts run directly on the host, each in its own process group."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil

from scalebox_hpc.errors import ScriptError
from scalebox_hpc.runtime.base import Outcome, RunSpec, SessionSpec

logger = logging.getLogger(__name__)


class LocalRun:
    """A script running as a local process group."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._poll: select.poll | None = None
        try:  # a pidfd wakes the waiter the moment the process exits (Linux >= 5.3)
            self._pidfd = os.pidfd_open(proc.pid)
            self._poll = select.poll()
            self._poll.register(self._pidfd, select.POLLIN)
        except (AttributeError, OSError):
            self._pidfd = -1

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Wait up to ``timeout`` seconds; None while still running."""
        if self._poll is not None and self.proc.returncode is None:
            # Popen.wait(timeout) polls with growing sleeps (up to 50 ms): a short script's
            # end would be noticed milliseconds late, which caps the task rate
            self._poll.poll(None if timeout is None else max(0, int(timeout * 1000)))
            code = self.proc.poll()
            if code is None:
                return None
            self._close()
            return Outcome(code)
        try:
            return Outcome(self.proc.wait(timeout))
        except subprocess.TimeoutExpired:
            return None

    def _close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
            self._poll = None

    def kill(self, grace: float = 5.0) -> Outcome:
        """TERM the process group and every descendant (also ones that left the group), then KILL."""
        procs = _tree(self.proc.pid)
        _signal_group(self.proc.pid, signal.SIGTERM)
        for p in procs:
            _quiet(p.terminate)
        _, alive = psutil.wait_procs(procs, timeout=grace)
        _signal_group(self.proc.pid, signal.SIGKILL)
        for p in alive:
            _quiet(p.kill)
        psutil.wait_procs(alive, timeout=grace)
        code = self.proc.wait()
        self._close()
        return Outcome(code, timed_out=True)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _quiet(fn: Callable[[], object]) -> None:
    with contextlib.suppress(psutil.Error):
        fn()


def popen(
    argv: list[str], *, cwd: Path, env: dict[str, str], stdout_path: Path, stderr_path: Path,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session (so a kill reaches its whole tree), output to the files."""
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        try:
            return subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True,
            )
        except OSError as exc:
            raise ScriptError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc


class LocalRuntime:
    """Runs scripts as plain processes (no container); ``base_image`` is ignored."""

    name = "local"

    def start(self, spec: RunSpec) -> LocalRun:
        """Start ``spec.argv`` in a new session so a kill reaches its whole tree."""
        return LocalRun(popen(spec.argv, cwd=spec.cwd, env=spec.env,
                              stdout_path=spec.stdout_path, stderr_path=spec.stderr_path))

    def open(self, spec: SessionSpec) -> LocalRuntime:
        """Bare processes need no per-slot state: the runtime is its own session."""
        return self

    def close(self) -> None:
        """Nothing to release."""

    def host_path(self, path: str) -> str | None:
        """A bare process sees the host's paths."""
        return path

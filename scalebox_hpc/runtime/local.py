"""The bare-process runtime: scripts run directly on the host, each in its own session.

A run's processes end with it: when its main process exits, whatever is left of its session
(background children, also re-parented ones) is ended before the run's outcome is returned
(see :mod:`scalebox_hpc.runtime.fence`). A slot's session (:class:`LocalSession`) also records
each live run in the slot's private dir, and ends the runs a killed launcher left there when it
opens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from scalebox_hpc.errors import ScriptError
from scalebox_hpc.models import Usage
from scalebox_hpc.runtime import fence, spawn
from scalebox_hpc.runtime.base import Outcome, RunSpec, SessionSpec
from scalebox_hpc.runtime.paths import open_new_file

logger = logging.getLogger(__name__)

Wait4 = Callable[[int, int], tuple[int, int, Any]]
"""``os.wait4``'s shape: (pid, options) -> (pid, wait status, struct rusage)."""


class Process(Protocol):
    """The part of ``subprocess.Popen`` a run uses (:class:`spawn.Spawned` has it too)."""

    pid: int
    returncode: Any
    args: Any

    def wait(self, timeout: float | None = None) -> int: ...


SPARE_RECORD = ".fence-spare"
"""A session's record file between its runs (not a record: no ``fence-*.json`` name)."""


class SpareRecord:
    """One session's run record file, reused run after run: written in place, renamed to the
    run's record name (:func:`fence.record_path`) when the run starts and back when it ends.

    A new file per run cost about 150 us of CPU (ext4 allocates an inode: more than the rest of
    the record); a rename costs about 15. What a sweep sees is the same: a whole record under
    the run's name while it runs (the content is written before the rename), none after. Used by
    one run at a time: while it is taken, :meth:`take` says None and the caller writes a record
    the general way (:func:`fence.write_record`)."""

    def __init__(self, private_dir: Path) -> None:
        self.private_dir = private_dir
        self.path = private_dir / SPARE_RECORD
        self._fd = -1
        self._size = 0
        self.taken: Path | None = None
        """The record name the file has now (a run is live), else None."""

    def take(self, roots: tuple[fence.Proc, ...], label: str) -> Path | None:
        """The record of the run whose processes are ``roots``, under its name; None when the
        spare is in use or cannot be used (then nothing was renamed)."""
        if self.taken is not None or not roots:
            return None
        try:
            fd = self._open()
            for p in roots:
                fence.arm(p.pid)
            data = fence.Record(fence.this_process(), roots, label).to_json().encode()
            if os.pwrite(fd, data, 0) != len(data):
                return None
            if self._size > len(data):
                os.ftruncate(fd, len(data))
            self._size = len(data)
            final = fence.record_path(self.private_dir, roots[0].pid)
            os.rename(self.path, final)
            if os.stat(final, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                # something else had been put at the spare's name (it now has the record's):
                # the record is not ours, so no record at all — the general way writes one
                fence.remove_record(final)
                self.close()
                return None
        except OSError as exc:
            logger.debug("%s: the spare run record is not usable (%s); writing a new one", self.path, exc)
            self.close()
            return None
        self.taken = final
        return final

    def give_back(self, path: Path) -> bool:
        """The run of the record ``path`` ended: the file is the spare again (False: ``path``
        is not the spare's, the caller removes it)."""
        if path != self.taken:
            return False
        self.taken = None
        try:
            os.rename(path, self.path)
        except OSError:
            fence.remove_record(path)
            self.close()
        return True

    def close(self) -> None:
        """Close the file (it stays, for the next session)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open(self) -> int:
        if self._fd < 0:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise OSError(f"{self.path} is not a regular file")
            self._fd, self._size = fd, st.st_size
        return self._fd


def own_peak_kb() -> int:
    """This process's peak RSS so far (KiB): what a child it spawns shows as its own peak at
    least (the kernel keeps the pre-exec copy of the parent in the child's ``ru_maxrss``)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def usage_of(rusage: Any, floor_kb: int = 0) -> Usage:
    """A ``struct rusage`` of a reaped child (its own use plus that of every descendant it
    waited for) as a Usage. ``ru_maxrss`` (KiB on Linux: the largest single process) is kept
    only above ``floor_kb``, the spawning process's own peak: at exec the kernel records the
    old address space's peak, which for a forked child is its parent's copy, so a peak not above
    the parent's may be the parent's, not the run's (None: not known)."""
    rss = int(rusage.ru_maxrss)
    return Usage(cpu_user_s=max(0.0, float(rusage.ru_utime)), cpu_system_s=max(0.0, float(rusage.ru_stime)),
                 max_rss_kb=rss if rss > max(0, floor_kb) else None)


class LocalRun:
    """A script running as a local session (its own process group)."""

    measures_usage = True
    """Whether the rusage of the reaped process is the run's (False for an engine client whose
    container runs elsewhere: Podman/Docker, where the client's own CPU is all wait4 sees)."""

    def __init__(self, proc: Process, label: str = "", *, wait4: Wait4 = os.wait4,
                 peak: Callable[[], int] = own_peak_kb) -> None:
        self.proc = proc
        self._wait4 = wait4
        self._peak = peak
        self.label = label or str(proc.args[0] if isinstance(proc.args, list | tuple) else proc.args)
        self.record_file: Path | None = None
        self._spare: SpareRecord | None = None
        self._outcome: Outcome | None = None
        self._poll: select.poll | None = None
        try:  # a pidfd wakes the waiter the moment the process exits (Linux >= 5.3)
            self._pidfd = os.pidfd_open(proc.pid)
            self._poll = select.poll()
            self._poll.register(self._pidfd, select.POLLIN)
        except (AttributeError, OSError):
            self._pidfd = -1

    def record(self, private_dir: Path, label: str, spare: SpareRecord | None = None) -> None:
        """Name this run in a record in ``private_dir`` until it ends, so that the session that
        opens there next (after a kill -9 of this launcher, say) can end what it left running;
        ``spare``: the session's reusable record file, when free."""
        self.label = label
        root = fence.Proc.of(self.proc.pid)  # also when it has already exited (a zombie until reaped)
        if root is None or self._outcome is not None:
            return
        self.record_file = spare.take((root,), label) if spare is not None else None
        if self.record_file is not None:
            self._spare = spare
        else:
            self.record_file = fence.write_record(private_dir, [root], label)

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Wait up to ``timeout`` seconds; None while still running. Once the main process has
        exited, what is left of its session is ended first."""
        if self._outcome is None:
            if not self._exited(timeout):
                return None
            self._finish(timed_out=False)
        assert self._outcome is not None
        return self._outcome

    def _exited(self, timeout: float | None) -> bool:
        """Whether the main process has exited within ``timeout`` (it is left unreaped)."""
        if self._poll is not None:
            # Popen.wait(timeout) polls with growing sleeps (up to 50 ms): a short script's
            # end would be noticed milliseconds late, which caps the task rate
            self._poll.poll(None if timeout is None else max(0, int(timeout * 1000)))
            return self._zombie()
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while not self._zombie():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.05)
        return True

    def _zombie(self) -> bool:
        """Exited, but not reaped: ``waitid(WNOWAIT)``, so the pid (the session id) stays taken."""
        if self.proc.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped already (by Popen)
            return True

    def _finish(self, *, timed_out: bool) -> None:
        """End the session's leftovers (the main process is a zombie: its session id cannot be
        reused meanwhile), then reap it and remove the run's record."""
        left = fence.end_session(self.proc.pid)
        if left:
            logger.warning("run %s (pid %d) ended leaving %d process(es) of its session running: %s; ended them "
                           "(a task's processes end with its run.sh)", self.label, self.proc.pid, len(left),
                           fence.describe(left))
        code, usage = self._reap()
        self._close()
        if self.record_file is not None and not (self._spare is not None and self._spare.give_back(self.record_file)):
            fence.remove_record(self.record_file)
        self.record_file, self._spare = None, None
        self._outcome = Outcome(code, timed_out=timed_out, usage=usage if self.measures_usage else None)

    def _reap(self) -> tuple[int, Usage | None]:
        """Reap the main process with ``wait4``: its exit code, and the CPU and peak RSS of its
        tree (the main process and the descendants it, or they, waited for). Popen is told the
        code, so it never waits for the pid again."""
        if self.proc.returncode is not None:  # reaped by Popen already: the rusage is gone
            return self.proc.returncode, None
        try:
            _, status, rusage = self._wait4(self.proc.pid, 0)
        except ChildProcessError:
            return self.proc.wait(), None
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return self.proc.returncode, usage_of(rusage, floor_kb=self._peak())

    def _close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
            self._poll = None

    def kill(self, grace: float = 5.0) -> Outcome:
        """TERM the process group, every descendant (also ones that left the group) and the
        sessions they lead, then KILL after ``grace``."""
        if self._outcome is None:
            root = fence.Proc.of(self.proc.pid)
            doomed = fence.tree_of(root) if root is not None else []
            fence.end(doomed, grace, group=self.proc.pid)
            self._finish(timed_out=True)
        assert self._outcome is not None
        return Outcome(self._outcome.returncode, timed_out=True, usage=self._outcome.usage)


@contextlib.contextmanager
def _output_files(argv: list[str], stdout_path: Path, stderr_path: Path) -> Iterator[tuple[int, int]]:
    """The run's stdout and stderr descriptors (closed once it started: the child has its own
    copies); a start that fails is the ScriptError naming ``argv[0]``."""
    out = open_new_file(stdout_path)
    try:
        err = open_new_file(stderr_path)
        try:
            yield out, err
        except OSError as exc:
            raise ScriptError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
        finally:
            os.close(err)
    finally:
        os.close(out)


def popen(
    argv: list[str], *, cwd: Path, env: dict[str, str], stdout_path: Path, stderr_path: Path,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session (so a kill reaches its whole tree), output to the files."""
    with _output_files(argv, stdout_path, stderr_path) as (out, err):
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)


def start_process(argv: list[str], *, cwd: Path, env: dict[str, str], stdout_path: Path, stderr_path: Path) -> Process:
    """:func:`popen`'s process, started with :func:`spawn.spawn` where the C library allows
    (the GIL released while the child starts, less work per run), else with :func:`popen`."""
    if not spawn.available():
        return popen(argv, cwd=cwd, env=env, stdout_path=stdout_path, stderr_path=stderr_path)
    with _output_files(argv, stdout_path, stderr_path) as (out, err):
        return spawn.spawn(argv, cwd=cwd, env=env, stdout_fd=out, stderr_fd=err)


class LocalRuntime:
    """Runs scripts as plain processes (no container); ``base_image`` is ignored.

    Used directly as a session it fences each run's leftovers when the run ends but keeps no
    records; :meth:`open` gives a slot a :class:`LocalSession`, which does."""

    name = "local"

    def start(self, spec: RunSpec) -> LocalRun:
        """Start ``spec.argv`` in a new session so a kill reaches its whole tree."""
        return LocalRun(start_process(spec.argv, cwd=spec.cwd, env=spec.env,
                                      stdout_path=spec.stdout_path, stderr_path=spec.stderr_path))

    def open(self, spec: SessionSpec) -> LocalSession:
        """The slot's session; first ends what a killed launcher's runs left in its private dir."""
        return LocalSession(spec)

    def close(self) -> None:
        """Nothing to release."""

    def host_path(self, path: str) -> str | None:
        """A bare process sees the host's paths."""
        return path


class LocalSession(LocalRuntime):
    """One slot's bare-process session: each live run is recorded in the slot's private dir.

    Opening it ends whatever the records there still name (runs of a launcher that was killed:
    its run.sh and the processes it left), removes leftover emit buffers, and only then returns;
    see :func:`scalebox_hpc.runtime.fence.sweep`."""

    def __init__(self, spec: SessionSpec) -> None:
        self.spec = spec
        fence.sweep(spec.private_dir, spec.name)
        self.spare = SpareRecord(spec.private_dir)

    def start(self, spec: RunSpec) -> LocalRun:
        """Start the run and record it until it ends."""
        run = super().start(spec)
        run.record(self.spec.private_dir, f"{spec.stdout_path.stem} of {self.spec.name}", self.spare)
        return run

    def close(self) -> None:
        """Close the spare record file."""
        self.spare.close()

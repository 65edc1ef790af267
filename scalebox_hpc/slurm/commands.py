"""Running Slurm's command-line tools: a ``CommandRunner`` seam and its subprocess implementation.

Everything that talks to Slurm goes through ``CommandRunner.run(argv, timeout=..., input=...)``:
argv lists only (never a shell string), a timeout on every call, and the result returned
as data. A non-zero exit is *not* an exception at this level (the client decides: ``squeue``
exits 1 for an unknown job id, ``sacct`` for disabled accounting); only a command that could
not run or did not finish in time raises ``SlurmCommandError``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from scalebox_hpc.errors import CommandError

logger = logging.getLogger(__name__)

SLURM_ENV: Mapping[str, str] = {"SLURM_TIME_FORMAT": "standard"}
"""Environment added to every Slurm command by default: ISO timestamps whatever the user's settings."""


class SlurmCommandError(CommandError):
    """A Slurm command failed, timed out (``returncode`` None) or could not be started."""

    hint = "check that the Slurm client tools work here (`sinfo`, `squeue`) and that slurmctld answers"


@dataclass(frozen=True)
class CommandResult:
    """What a finished command printed and how it exited."""

    stdout: str
    stderr: str
    returncode: int

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.returncode == 0


class CommandRunner(Protocol):
    """Runs one external command and returns its output; the seam faked in tests."""

    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None) -> CommandResult:
        """Run ``argv`` (no shell) with ``input`` on stdin; raise ``SlurmCommandError`` on timeout."""
        ...


def check(argv: Sequence[str], result: CommandResult) -> CommandResult:
    """Return ``result`` when the command exited 0, else raise ``SlurmCommandError`` carrying its stderr."""
    if not result.ok:
        raise SlurmCommandError(argv, result.returncode, result.stderr)
    return result


class SubprocessRunner:
    """A ``CommandRunner`` using ``subprocess.run`` with argv lists and a hard timeout.

    ``extra_env`` is added to a copy of the current environment for each child (the
    process's own environment is never changed); the default, ``SLURM_ENV``, pins
    ``SLURM_TIME_FORMAT=standard`` so timestamps parse. A ``PATH`` in ``extra_env`` is also
    used to find the executable. ``base_env`` replaces the current environment as the base
    (e.g. without the ``SLURM_*`` variables of an enclosing job, for sbatch inside a job).
    """

    def __init__(
        self, *, extra_env: Mapping[str, str] | None = None, base_env: Mapping[str, str] | None = None,
    ) -> None:
        self._extra_env = dict(SLURM_ENV if extra_env is None else extra_env)
        self._base_env = dict(base_env) if base_env is not None else None

    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None) -> CommandResult:
        """Run ``argv``; raise ``SlurmCommandError`` (returncode None) when it exceeds ``timeout`` seconds.

        The command runs in its own session, so a timeout kills its whole process group
        (site wrappers around sbatch/squeue are often shell scripts with children).
        """
        args = [str(a) for a in argv]
        base = self._base_env
        env = {**(os.environ if base is None else base), **self._extra_env} if self._extra_env or base else None
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
            )
        except OSError as exc:
            raise SlurmCommandError(args, 127, f"cannot run {args[0]}: {exc}") from exc
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _kill_group(proc)
            raise SlurmCommandError(args, None, _timeout_stderr(exc, timeout)) from exc
        seconds = round(time.monotonic() - started, 3)
        logger.debug("slurm command %s finished: exit %s in %.3f s", " ".join(args[:3]), proc.returncode, seconds,
                     extra={"action": "slurm_command", "argv": args[:3], "returncode": proc.returncode,
                            "seconds": seconds})
        return CommandResult(stdout, stderr, proc.returncode)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the command's process group and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=5)


def _timeout_stderr(exc: subprocess.TimeoutExpired, timeout: float) -> str:
    partial = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    return f"{partial.rstrip()}\ntimed out after {timeout:g} s".lstrip()

"""The ContainerRuntime seam: open a slot's session, start scripts in it, wait on or kill them.

A runtime's :meth:`ContainerRuntime.open` gives one slot a :class:`Session` (for a warm
container slot: the running container); the slot starts every script through it and closes it
when the slot ends. The bare-process runtime's session is stateless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from scalebox_hpc.models import Usage


@dataclass(frozen=True)
class RunSpec:
    """One script run: an argv (never a shell string), where, with what environment."""

    argv: list[str]
    cwd: Path
    env: dict[str, str]
    stdout_path: Path
    stderr_path: Path
    image: str | None = None
    binds: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SessionSpec:
    """What a slot asks of its runtime: the module's image and mounts, the slot's directories."""

    name: str
    """Unique and readable, e.g. ``app-3.calc.host1-slot0`` (container names derive from it)."""
    work_dir: Path
    """The slot's work dir, mounted at ``/work``."""
    private_dir: Path
    """The slot's private dir (captured output, emit buffers), mounted at ``/.scalebox/slot``."""
    code_path: Path
    """The module's scripts, mounted at ``/app/bin``."""
    image: str | None = None
    runtime: str | None = None
    """The module's ``runtime:`` argument (None: the host's default)."""
    volumes: list[str] = field(default_factory=list)
    """Extra binds ``host[:container[:ro|rw]]``."""
    options: list[str] = field(default_factory=list)
    """The module's ``slot_options`` (``container_per_task``, ``gpu``, ``containall``)."""


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its exit code (negative = killed by that signal), or timed out."""

    returncode: int
    timed_out: bool = False
    usage: Usage | None = None
    """What the run's process tree used (None: not measured by this runtime)."""


class Run(Protocol):
    """A started run."""

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Wait up to ``timeout`` seconds; None while still running."""
        ...

    def kill(self, grace: float = 5.0) -> Outcome:
        """Terminate the run's whole process tree (TERM, then KILL after ``grace``)."""
        ...


class Session(Protocol):
    """One slot's use of a runtime (for warm container slots: its running container)."""

    def start(self, spec: RunSpec) -> Run:
        """Start the run; raises ScriptError when it cannot start at all."""
        ...

    def close(self) -> None:
        """Release what the session holds (stops a warm container); idempotent."""
        ...

    def host_path(self, path: str) -> str | None:
        """The host path of a path a run reported (in ``output-files.txt``, say): absolute as the
        run saw it, or relative to its work dir (returned as it is). A container path under a
        mount is mapped back (``/local/x`` → the scratch root's ``x``); None for a path that
        exists only inside the container. Bare processes: the path itself."""
        ...


class ContainerRuntime(Protocol):
    """Opens slot sessions; one implementation per engine (or a chooser over several)."""

    name: str

    def open(self, spec: SessionSpec) -> Session:
        """The session of one slot; raises ContainerError for a missing engine or image."""
        ...

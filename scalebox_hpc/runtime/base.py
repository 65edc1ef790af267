"""The ContainerRuntime seam: start a script, get a handle to wait on or kill."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


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
class Outcome:
    """How a run ended: its exit code (negative = killed by that signal), or timed out."""

    returncode: int
    timed_out: bool = False


class Run(Protocol):
    """A started run."""

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Wait up to ``timeout`` seconds; None while still running."""
        ...

    def kill(self, grace: float = 5.0) -> Outcome:
        """Terminate the run's whole process tree (TERM, then KILL after ``grace``)."""
        ...


class ContainerRuntime(Protocol):
    """Starts runs; one implementation per engine."""

    name: str

    def start(self, spec: RunSpec) -> Run:
        """Start the run; raises ScriptError when it cannot start at all."""
        ...

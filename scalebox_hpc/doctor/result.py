"""What a doctor check says: a stable id, pass/warn/fail/skip, one line, a hint."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Status(enum.StrEnum):
    """How a check went. Only ``fail`` makes ``scalebox doctor`` exit 1."""

    PASS = "pass"  # noqa: S105 - a status, not a password
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"
    """Not applicable here (no pipeline image, ``--no-probe``, nothing to check)."""


@dataclass(frozen=True)
class Check:
    """One check's outcome. ``id`` is stable (scripts match on it in ``--json``); ``target`` names
    what was checked when a check runs for several things (a cluster, a partition, an engine)."""

    id: str
    status: Status
    summary: str
    hint: str = ""
    target: str = ""

    def as_dict(self) -> dict[str, str]:
        """The JSON form: id, status, target, summary, hint."""
        return {"id": self.id, "status": self.status.value, "target": self.target, "summary": self.summary,
                "hint": self.hint}


def passed(check_id: str, summary: str, *, target: str = "") -> Check:
    """A passing check."""
    return Check(check_id, Status.PASS, summary, target=target)


def warned(check_id: str, summary: str, hint: str, *, target: str = "") -> Check:
    """A check that found something to look at, but nothing that stops a pipeline."""
    return Check(check_id, Status.WARN, summary, hint, target)


def failed(check_id: str, summary: str, hint: str, *, target: str = "") -> Check:
    """A check that found something that stops a pipeline."""
    return Check(check_id, Status.FAIL, summary, hint, target)


def skipped(check_id: str, summary: str, *, target: str = "") -> Check:
    """A check that does not apply here."""
    return Check(check_id, Status.SKIP, summary, target=target)


def exit_code(checks: Iterable[Check]) -> int:
    """0 when nothing failed (warnings and skips included), else 1."""
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def clip(text: str, limit: int = 300) -> str:
    """``text`` on one line, white space squeezed, at most ``limit`` characters (an error
    message from a node or a command may be anything, and long)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"

"""``sdiag`` text: the controller's RPC counters, per message type and per user, and their deltas.

``sdiag`` prints (Slurm 22.05 to 24.x; rows start with a tab)::

    sdiag output at Tue Dec 01 23:33:58 2026 (1796168038)
    Data since      Tue Dec 01 23:24:04 2026 (1796167444)
    ...
    Remote Procedure Call statistics by message type
        REQUEST_PARTITION_INFO                  ( 2009) count:6      ave_time:322    total_time:1933
    Remote Procedure Call statistics by user
        root            (       0) count:16     ave_time:365    total_time:5851
    Pending RPC statistics
        No pending RPCs

The counters are the controller's since ``Data since`` (slurmctld's start, the daily reset at
midnight, or an admin's ``sdiag -r``); they are shared by every user, so a benchmark never
resets them: it diffs two snapshots (:func:`delta`), and a reset in between is reported, not
hidden. The per-user table has totals only (no split of a user's by type): what our user's RPCs were is
told by its total and by the commands our own adapter counted; the per-type table is everyone's.
``sacct`` talks to slurmdbd, not slurmctld: it never shows here.

The text is untrusted (user names come from the site's passwd, lines may be cut): anything the
parser does not understand is a :class:`~scalebox_hpc.slurm.parse.SlurmParseError`, never another
exception.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from scalebox_hpc.slurm.parse import SlurmParseError

_STAMP = re.compile(r"^\s*(sdiag output at|Data since)\b[^()\n]*\((\d{1,12})\)\s*$")
_SECTION_TYPE = "Remote Procedure Call statistics by message type"
_SECTION_USER = "Remote Procedure Call statistics by user"
_ROW = re.compile(r"^\s*(\S{1,200}?)\s*\(\s*(\d{1,10})\)\s+count:(\d{1,15})"
                  r"(?:\s+ave_time:(\d{1,20}))?(?:\s+total_time:(\d{1,20}))?\s*$")
_MAX_TEXT = 4 * 1024 * 1024
"""sdiag prints a few KiB; more is not sdiag."""

STATUS_TYPES = frozenset({
    "REQUEST_JOB_INFO", "REQUEST_JOB_INFO_SINGLE", "REQUEST_JOB_USER_INFO", "REQUEST_JOB_STATE",
    "REQUEST_PARTITION_INFO", "REQUEST_NODE_INFO", "REQUEST_NODE_INFO_SINGLE",
})
"""Status polling: what ``squeue``, ``sinfo`` and ``scontrol show job/node`` ask."""
SUBMIT_TYPES = frozenset({"REQUEST_SUBMIT_BATCH_JOB", "REQUEST_SUBMIT_BATCH_HET_JOB"})
"""``sbatch``."""
CANCEL_TYPES = frozenset({"REQUEST_KILL_JOB", "REQUEST_CANCEL_JOB_STEP", "REQUEST_CANCEL_JOB"})
"""``scancel`` (22.05+: REQUEST_KILL_JOB; older: REQUEST_CANCEL_JOB_STEP)."""
KINDS = ("status", "submit", "cancel", "other")


def kind(message_type: str) -> str:
    """``status``, ``submit``, ``cancel`` or ``other`` (job steps, completions, node traffic)."""
    if message_type in STATUS_TYPES:
        return "status"
    if message_type in SUBMIT_TYPES:
        return "submit"
    if message_type in CANCEL_TYPES:
        return "cancel"
    return "other"


@dataclass(frozen=True)
class RpcCount:
    """One row: the RPCs of a message type (or of a user), and their time in microseconds."""

    ident: int
    count: int
    total_time_us: int = 0


@dataclass(frozen=True)
class SdiagSnapshot:
    """One ``sdiag`` output: when, since when, and the two RPC tables."""

    taken_at: int
    """Epoch seconds of ``sdiag output at``."""
    data_since: int
    """Epoch seconds of ``Data since``: the counters' start."""
    by_type: Mapping[str, RpcCount] = field(default_factory=dict)
    by_user: Mapping[str, RpcCount] = field(default_factory=dict)


@dataclass(frozen=True)
class SdiagDelta:
    """What happened between two snapshots."""

    seconds: int
    by_type: dict[str, int]
    """Everyone's RPCs per message type (types with none left out)."""
    by_user: dict[str, int]
    """RPCs per user (users with none left out)."""
    reset: bool
    """The counters were reset in between: the counts are those since the reset (a lower bound)."""

    def by_kind(self) -> dict[str, int]:
        """Everyone's RPCs per :func:`kind`."""
        out = dict.fromkeys(KINDS, 0)
        for name, n in self.by_type.items():
            out[kind(name)] += n
        return out

    def per_minute(self, count: int) -> float:
        """``count`` over the delta's span, per minute (0 for an empty span)."""
        return round(count * 60.0 / self.seconds, 2) if self.seconds > 0 else 0.0


def parse_sdiag(text: str) -> SdiagSnapshot:
    """The snapshot ``text`` (sdiag's whole output) describes; SlurmParseError if it is not sdiag's."""
    if len(text) > _MAX_TEXT:
        raise SlurmParseError("sdiag output (too long)", text[:120])
    stamps: dict[str, int] = {}
    tables: dict[str, dict[str, RpcCount]] = {_SECTION_TYPE: {}, _SECTION_USER: {}}
    section = ""
    seen: set[str] = set()
    for line in text.splitlines():
        stamp = _STAMP.match(line)
        if stamp:
            stamps.setdefault(stamp.group(1), int(stamp.group(2)))
            continue
        stripped = line.strip()
        if stripped in tables:
            section = stripped
            seen.add(section)
            continue
        if not line[:1].isspace():
            section = ""  # any other header ends a table (Pending RPC statistics, ...)
            continue
        if not section or not stripped:
            continue
        row = _ROW.match(line)
        if row is None:
            raise SlurmParseError(f"sdiag row of {section!r}", line)
        name, ident, count, _, total = row.groups()
        if name in tables[section]:
            raise SlurmParseError(f"sdiag row of {section!r} (listed twice)", line)
        tables[section][name] = RpcCount(int(ident), int(count), int(total or 0))
    if "sdiag output at" not in stamps or "Data since" not in stamps:
        raise SlurmParseError("sdiag output (no 'sdiag output at'/'Data since' lines)", text)
    if len(seen) != len(tables):
        raise SlurmParseError("sdiag output (no RPC statistics by message type and by user)", text)
    return SdiagSnapshot(taken_at=stamps["sdiag output at"], data_since=stamps["Data since"],
                         by_type=tables[_SECTION_TYPE], by_user=tables[_SECTION_USER])


def delta(before: SdiagSnapshot, after: SdiagSnapshot) -> SdiagDelta:
    """``after - before``. A reset in between (another ``Data since``, a counter that went down
    or a row gone: sdiag lists only rows above 0) gives ``after``'s counts since that reset,
    flagged ``reset``."""
    reset = after.data_since != before.data_since or _went_down(before.by_type, after.by_type) \
        or _went_down(before.by_user, after.by_user)
    start = after.data_since if reset else before.taken_at
    return SdiagDelta(seconds=max(0, after.taken_at - start),
                      by_type=_diff(after.by_type, {} if reset else before.by_type),
                      by_user=_diff(after.by_user, {} if reset else before.by_user), reset=reset)


def _went_down(then: Mapping[str, RpcCount], now: Mapping[str, RpcCount]) -> bool:
    return any(name not in now or now[name].count < row.count for name, row in then.items())


def _diff(now: Mapping[str, RpcCount], then: Mapping[str, RpcCount]) -> dict[str, int]:
    out = {name: row.count - (then[name].count if name in then else 0) for name, row in now.items()}
    return {name: n for name, n in out.items() if n > 0}

"""The live view of a running app (``scalebox status --watch`` on a terminal, and
``Client.wait(progress=True)``): a :class:`Snapshot` read from the database, and
:func:`render`, a pure function from a snapshot to a rich renderable (unit-tested with a
recorded console).

Everything a task controls (module names are the pipeline's, but bodies, stderr lines, the
result and a slot's host are not) is shown as :class:`rich.text.Text` after
:func:`~scalebox_hpc.text.terminal_safe`: never parsed as rich markup (audit F24), never
able to move the cursor or retitle the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from scalebox_hpc.models import TaskStatus
from scalebox_hpc.text import terminal_safe

if TYPE_CHECKING:
    from scalebox_hpc.db.connection import Connection

FAILURES_SHOWN = 5
"""Recent failures listed in the view."""
BODY_CHARS = 40
LINE_CHARS = 100


@dataclass(frozen=True)
class ModuleView:
    """One module's progress."""

    name: str
    total: int
    done: int
    ok: int
    failed: int
    running: int
    ready: int
    initial: int
    per_minute: int
    """Tasks that ended in the last minute."""
    slots: int
    """Live slots of the module."""

    @property
    def remaining(self) -> int:
        """Tasks not yet in a terminal status."""
        return self.total - self.done

    def eta_seconds(self) -> float | None:
        """Seconds to finish the tasks known now at the last minute's rate; None without a rate."""
        if self.remaining == 0:
            return 0.0
        if self.per_minute <= 0:
            return None
        return self.remaining * 60.0 / self.per_minute


@dataclass(frozen=True)
class HostSlots:
    """The slots of one host."""

    host: str
    live: int
    busy: int
    """Live slots running a task now."""
    ended: int
    errors: int


@dataclass(frozen=True)
class StageJob:
    """One live Slurm stage job."""

    module: str
    job_id: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class Failure:
    """One failed task and the last line it wrote."""

    task_id: int
    module: str
    status: int
    body: str
    line: str


@dataclass(frozen=True)
class Snapshot:
    """What the live view shows, read at one moment."""

    app_id: int
    name: str
    state: str
    """The app's status as ``scalebox status`` says it (IDLE and WAITING included)."""
    result: str | None
    modules: Sequence[ModuleView]
    hosts: Sequence[HostSlots] = ()
    jobs: Sequence[StageJob] = ()
    failures: Sequence[Failure] = ()
    failed: int = 0
    """Failed tasks in all (``failures`` holds the first few)."""
    why: Sequence[str] = field(default_factory=tuple)
    """Why tasks wait, one line per reason (``module: reason``)."""

    @property
    def ended(self) -> bool:
        """The app is over for a watcher: FINISHED, or IDLE (nothing left to run, no slot)."""
        return self.state in ("FINISHED", "IDLE")


def _line(text: str) -> str:
    """Task-controlled text for one line: no escapes, no control characters, one space per run of blanks."""
    return " ".join(terminal_safe(text).split())


def _cut(text: str, size: int) -> str:
    return text if len(text) <= size else text[:size - 3] + "..."


def duration(seconds: float | None) -> str:
    """``1:02:03``, ``4:05`` or ``?`` (no estimate)."""
    if seconds is None:
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def bar_width(columns: int) -> int:
    """The bars' width on a terminal of ``columns``: what the other columns leave, 10 to 40."""
    return max(10, min(40, columns - 90))


def render(snap: Snapshot, *, width: int = 30, hint: str = "q quits") -> RenderableType:
    """The live view of ``snap``: a title line, per module a progress bar with counts, rate and
    ETA, the slots per host, the stage jobs, why tasks wait and the recent failures. ``width``:
    the bars' width (:func:`bar_width` of the terminal); ``hint``: the last line (empty for
    none). Pure: data in, renderable out."""
    parts: list[RenderableType] = [_title(snap), _modules(snap, width)]
    if snap.hosts:
        parts.append(_hosts(snap.hosts))
    if snap.jobs:
        parts.append(_jobs(snap.jobs))
    if snap.why:
        parts.append(Text("why tasks wait:\n" + "\n".join(f"  {_line(w)}" for w in snap.why)))
    if snap.failures:
        parts.append(_failures(snap))
    if hint:
        parts.append(Text(hint, style="dim"))
    return Group(*parts)


def _title(snap: Snapshot) -> Text:
    title = Text(f"app {snap.app_id} ", style="bold")
    title.append(_line(snap.name), style="bold")
    title.append(": ")
    title.append(snap.state, style="green" if snap.state == "FINISHED" else "yellow" if snap.state != "RUNNING" else "")
    if snap.result:
        title.append("  ")
        title.append(_cut(_line(snap.result), LINE_CHARS))
    return title


def _modules(snap: Snapshot, width: int) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False)
    for name, justify in (("module", "left"), ("progress", "left"), ("done", "right"), ("ok", "right"),
                          ("failed", "right"), ("running", "right"), ("ready", "right"), ("slots", "right"),
                          ("rate", "right"), ("eta", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for m in snap.modules:
        bar = ProgressBar(total=max(m.total, 1), completed=m.done if m.total else 0, width=width,
                          complete_style="red" if m.failed else "green", finished_style="green")
        eta = "-" if not m.total else "done" if m.remaining == 0 else duration(m.eta_seconds())
        table.add_row(Text(_line(m.name)), bar, Text(f"{m.done}/{m.total}"), Text(str(m.ok)),
                      Text(str(m.failed), style="red" if m.failed else ""), Text(str(m.running)),
                      Text(str(m.ready)), Text(str(m.slots)), Text(f"{m.per_minute}/min"), Text(eta))
    return table


def _hosts(hosts: Sequence[HostSlots]) -> Text:
    text = Text("slots: ")
    for i, h in enumerate(hosts):
        if i:
            text.append(", ")
        text.append(_line(h.host))
        text.append(f" {h.busy}/{h.live} busy")
        if h.errors:
            text.append(f" ({h.errors} in error)", style="red")
    return text


def _jobs(jobs: Sequence[StageJob]) -> Text:
    text = Text("stage jobs: ")
    for i, j in enumerate(jobs):
        if i:
            text.append(", ")
        text.append(f"{_line(j.module)} {_line(j.job_id)}:{_line(j.state)}")
        if j.reason:
            text.append(f" ({_line(j.reason)})")
    return text


def _failures(snap: Snapshot) -> Text:
    shown = len(snap.failures)
    head = f"failed tasks ({snap.failed}" + (f", the first {shown}" if snap.failed > shown else "") + "):"
    text = Text(head, style="red")
    for f in snap.failures:
        text.append(f"\n  {f.task_id:>6} {_line(f.module)} {TaskStatus.describe(f.status)} "
                    f"{_cut(_line(f.body), BODY_CHARS)} → {_cut(_line(f.line) or '(no output)', LINE_CHARS)}")
    return text


# -- reading a snapshot ---------------------------------------------------------------------------
def read_snapshot(conn: Connection, app_id: int, *, jobs: Sequence[StageJob] = ()) -> Snapshot:
    """The app as the live view shows it, read now (each part in a transaction of its own);
    ``jobs``: the stage jobs, read by the caller (refreshing them needs Slurm)."""
    from scalebox_hpc.db import apps

    with conn.transaction():
        row = apps.get_app(conn, app_id)
        counts = apps.module_counts(conn, app_id)
        slots = apps.list_slots(conn, app_id)
        why = apps.module_why(conn, app_id, counts, slots)
    failed = sum(mc.failed for mc in counts)
    failures: list[dict[str, Any]] = []
    if failed:
        with conn.transaction():
            failures = apps.failed_tasks(conn, app_id, FAILURES_SHOWN)
    modules = [ModuleView(
        name=mc.name, total=mc.total, done=mc.done, ok=mc.count(TaskStatus.OK), failed=mc.failed,
        running=mc.count(TaskStatus.RUNNING), ready=mc.count(TaskStatus.READY),
        initial=mc.count(TaskStatus.INITIAL), per_minute=mc.last_minute,
        slots=sum(1 for s in slots if s["module"] == mc.name and s["live"]),
    ) for mc in counts]
    return Snapshot(
        app_id=app_id, name=str(row["name"]), state=apps.app_state(row["status"], counts, slots),
        result=row["result"], modules=modules, hosts=host_slots(slots), jobs=tuple(jobs),
        failures=[Failure(int(f["id"]), str(f["module"]), int(f["status"]), str(f["body"]),
                          apps.last_line(f["stderr"]) or apps.last_line(f["stdout"])) for f in failures],
        failed=failed, why=[f"{module}: {w.text}" for module, reasons in why.items() for w in reasons],
    )


def host_slots(slots: Sequence[dict[str, Any]]) -> list[HostSlots]:
    """Slots per host (rows of :func:`apps.list_slots`), hosts in name order."""
    by_host: dict[str, list[dict[str, Any]]] = {}
    for s in slots:
        by_host.setdefault(str(s["host"]), []).append(s)
    return [HostSlots(host=host, live=sum(1 for s in mine if s["live"]),
                      busy=sum(1 for s in mine if s["live"] and s["task_id"] is not None),
                      ended=sum(1 for s in mine if not s["live"]),
                      errors=sum(1 for s in mine if s["status"] == "ERROR"))
            for host, mine in sorted(by_host.items())]

"""What an app's modules are doing, as ``status``, ``app why`` and ``scalebox run`` show it: the
task counts, the modules no live slot can serve, the app's shown state, why READY tasks wait.
Re-exported by :mod:`scalebox_hpc.db.apps`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scalebox_hpc.db.connection import Connection
from scalebox_hpc.db.sql import query
from scalebox_hpc.models import AppStatus, TaskStatus


@dataclass
class ModuleCounts:
    """Task counts of one module by status."""

    name: str
    by_status: dict[int, int]
    last_minute: int

    @property
    def total(self) -> int:
        """All tasks of the module."""
        return sum(self.by_status.values())

    @property
    def done(self) -> int:
        """Tasks in a terminal status (OK or failed)."""
        return sum(n for s, n in self.by_status.items() if s >= 0 or s < -100)

    @property
    def failed(self) -> int:
        """Tasks that ended in failure."""
        return sum(n for s, n in self.by_status.items() if TaskStatus.is_failure(s))

    def count(self, status: int) -> int:
        """Tasks in one status."""
        return self.by_status.get(status, 0)


def module_counts(conn: Connection, app_id: int) -> list[ModuleCounts]:
    """Per-module task counts by status, in pipeline order."""
    out: dict[str, ModuleCounts] = {}
    for r in conn.execute(query("module_counts"), {"app_id": app_id}).fetchall():
        mc = out.setdefault(r["name"], ModuleCounts(r["name"], {}, 0))
        if r["status"] is not None:
            mc.by_status[int(r["status"])] = int(r["n"])
            mc.last_minute += int(r["last_minute"])
    return list(out.values())


def last_line(text: str | None) -> str:
    """The last non-blank line of ``text`` (stripped), or ''."""
    for line in reversed((text or "").splitlines()):
        if line.strip():
            return line.strip()
    return ""


@dataclass(frozen=True)
class StuckModule:
    """A module with READY tasks that no live slot can take: each of its slots ended."""

    module: str
    ready: int
    slots: int
    errors: int
    message: str

    def describe(self) -> str:
        """One line: the module, what became of its slots, the first error, the READY count."""
        if not self.slots:
            what = "no slot runs it here (an MPI collective module runs only as an MPI stage)"
        elif self.errors == self.slots:
            what = f"all {self.slots} slot(s) failed"
        elif self.errors:
            what = f"no live slot ({self.errors} of {self.slots} failed, the others ended)"
        else:
            what = f"no live slot (all {self.slots} ended)"
        return f"{self.module}: {what}" + (f": {self.message}" if self.message else "") + \
            f" — {self.ready} task(s) left READY"


def stuck_modules(
    counts: Sequence[ModuleCounts], slots: Sequence[dict[str, Any]], *, without_slots: bool = False,
) -> list[StuckModule]:
    """The modules whose READY tasks no slot can take: they had slots, and none is live any more
    (``without_slots``: also those that never had one, for a run whose slots have all started)."""
    found = []
    for mc in counts:
        ready = mc.count(TaskStatus.READY)
        mine = [s for s in slots if s["module"] == mc.name]
        if not ready or (not mine and not without_slots) or any(s["live"] for s in mine):
            continue
        errors = [s for s in mine if s["status"] == "ERROR"]
        message = next((str(s["message"]) for s in errors if s["message"]), "")
        found.append(StuckModule(mc.name, ready, len(mine), len(errors), message))
    return found


def all_work_stuck(counts: Sequence[ModuleCounts], stuck: Sequence[StuckModule]) -> bool:
    """True when there is work left and all of it waits in stuck modules (nothing RUNNING
    anywhere, nothing READY that a live slot could take): a run waiting longer waits for ever."""
    names = {s.module for s in stuck}
    if not names:
        return False
    for mc in counts:
        if mc.count(TaskStatus.RUNNING) or (mc.name not in names and mc.count(TaskStatus.READY)):
            return False
    return True


def app_state(status: str, counts: Sequence[ModuleCounts], slots: Sequence[dict[str, Any]]) -> str:
    """The app's state as a user should see it: the stored status, except that a RUNNING app
    with nothing READY or RUNNING and no live slot is ``IDLE``, and one with READY tasks but no
    live slot (and nothing running) is ``WAITING`` (for a launcher or a stage job)."""
    if status != AppStatus.RUNNING:
        return status
    ready = sum(mc.count(TaskStatus.READY) for mc in counts)
    running = sum(mc.count(TaskStatus.RUNNING) for mc in counts)
    live = any(s["live"] for s in slots)
    if running or live:
        return status
    return "WAITING" if ready else "IDLE"


# -- why READY tasks do not move ----------------------------------------------------------------
WHY_SLOTS_NAMED = 3
"""Slot gate reasons named per module (the others are counted)."""


@dataclass(frozen=True)
class Why:
    """One reason a module's READY tasks are not claimed, matching one rule of claim_tasks.

    ``kind``: ``app_paused``, ``app_initial``, ``app_finished``, ``tasks_initial``, ``no_slot``,
    ``check_sh``, ``disk_gate``, ``semaphore``, ``back_pressure`` or ``host``."""

    kind: str
    text: str

    def as_json(self) -> dict[str, str]:
        """``{"kind", "text"}``."""
        return {"kind": self.kind, "text": self.text}


def module_why(
    conn: Connection, app_id: int, counts: Sequence[ModuleCounts], slots: Sequence[dict[str, Any]],
) -> dict[str, list[Why]]:
    """Per module, why its READY (or INITIAL) tasks wait (:func:`why_waiting`); modules with
    nothing waiting, or nothing keeping it, have an empty list."""
    by_name = {mc.name: mc for mc in counts}
    out: dict[str, list[Why]] = {}
    for r in conn.execute(query("module_why"), {"app_id": app_id}).fetchall():
        mc = by_name.get(r["name"]) or ModuleCounts(r["name"], {}, 0)
        mine = [s for s in slots if s["module"] == r["name"]]
        out[r["name"]] = why_waiting(dict(r), mc, mine, app_id)
    return out


def why_waiting(
    row: Mapping[str, Any], counts: ModuleCounts, slots: Sequence[Mapping[str, Any]], app_id: int,
) -> list[Why]:
    """The reasons (one row of the ``module_why`` query, the module's counts and slots) the
    claim takes none of the module's READY tasks now, each the rule of claim_tasks that holds
    them; INITIAL tasks are named too (they are not claimable at all until activated)."""
    ready, initial = counts.count(TaskStatus.READY), counts.count(TaskStatus.INITIAL)
    found: list[Why] = []
    if initial:
        found.append(Why("tasks_initial", f"{initial} task(s) INITIAL: not claimable until activated "
                                          f"(`scalebox task retry --status initial --app {app_id}`)"))
    if not ready:
        return found
    found += _app_why(str(row["app_status"]), app_id)
    found += _slot_why(row, ready, slots, app_id)
    semaphore = row.get("semaphore")
    value = row.get("semaphore_value")
    if semaphore and (value is None or int(value) <= 0):
        said = "does not exist" if value is None else f"is {value}"
        found.append(Why("semaphore", f"semaphore {semaphore!r} {said}: a claim takes one unit a task "
                                      f"(`scalebox semaphore increment --app {app_id} {semaphore}`)"))
    for sink in row.get("full_sinks") or []:
        found.append(Why("back_pressure", f"back-pressure: its sink {sink['sink']} has {sink['max_pending']} or "
                                          f"more READY tasks (max_pending {sink['max_pending']})"))
    for h in row.get("host_waits") or []:
        found.append(Why("host", _host_wait(h)))
    return found


def _app_why(status: str, app_id: int) -> list[Why]:
    """The claim takes tasks of RUNNING apps only."""
    if status == AppStatus.PAUSED:
        return [Why("app_paused", f"the app is PAUSED: nothing is claimed (`scalebox app resume {app_id}`)")]
    if status == AppStatus.INITIAL:
        return [Why("app_initial", f"the app is INITIAL: nothing is claimed until `scalebox app resume {app_id}`")]
    if status == AppStatus.FINISHED:
        return [Why("app_finished", "the app is FINISHED: nothing more is claimed")]
    return []


def _slot_why(row: Mapping[str, Any], ready: int, slots: Sequence[Mapping[str, Any]], app_id: int) -> list[Why]:
    """No live slot of the module, or live slots whose gates are closed (check.sh, disk)."""
    if not row["live_slots"]:
        if not slots:
            return [Why("no_slot", f"no slot has run it yet — start one with `scalebox run --app {app_id}`, "
                                   f"`scalebox launcher --app {app_id}` or `scalebox submit`")]
        errors = [s for s in slots if s["status"] == "ERROR"]
        message = next((str(s["message"]) for s in errors if s["message"]), "")
        stuck = StuckModule(str(row["name"]), ready, len(slots), len(errors), message).describe()
        return [Why("no_slot", stuck.removeprefix(f"{row['name']}: "))]
    groups: dict[str, list[str]] = {}
    for w in row.get("waiting") or []:
        groups.setdefault(str(w["waiting"]), []).append(f"{w['host']} slot {w['seq']}")
    found = []
    for reason, where in list(groups.items())[:WHY_SLOTS_NAMED]:
        kind = "check_sh" if reason.startswith("check.sh") else "disk_gate"
        whom = ", ".join(where[:WHY_SLOTS_NAMED]) + (f" and {len(where) - WHY_SLOTS_NAMED} more"
                                                     if len(where) > WHY_SLOTS_NAMED else "")
        found.append(Why(kind, f"{len(where)} of its {row['live_slots']} live slot(s) wait ({whom}): {reason}"))
    return found


def _host_wait(h: Mapping[str, Any]) -> str:
    """Tasks held for a host that runs no live slot of their module."""
    n = f"{h['tasks']}{'+' if int(h['tasks']) >= 10000 else ''} task(s)"
    if h["bound"]:
        return (f"{n} bound to host {h['host']} (to_host), which runs no live slot of this module "
                "(released to any host once it is dead past their locality wait)")
    wait = max(0.0, float(h["wait_seconds"] or 0.0))
    return (f"{n} wait for host {h['host']}, which holds their inputs but runs no live slot of this "
            f"module, for up to {wait:.0f}s more (locality_wait_seconds)")

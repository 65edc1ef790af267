"""``scalebox status``: an app's state, its modules, slots, stage jobs and failures."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import click

from scalebox_hpc.errors import ScaleboxError

if TYPE_CHECKING:
    from scalebox_hpc.db.connection import Connection

from scalebox_hpc.cli.common import (
    APP_OPTION,
    ID,
    JSON_OPTION,
    _app_id,
    _db,
    _dump,
    _one_line,
    _squeezed,
    _work_root,
    app_or_id,
    settings,
)

FAILURES_SHOWN = 5
"""Failed tasks listed in a failure summary."""

def _print_failures(conn: Connection, app_id: int, failed: int, *, err: bool = True) -> None:
    """Up to FAILURES_SHOWN failed tasks as ``id module status body → last stderr line``, and
    the commands to dig further."""
    from scalebox_hpc.db import apps
    from scalebox_hpc.models import TaskStatus

    with conn.transaction():
        rows = apps.failed_tasks(conn, app_id, FAILURES_SHOWN)
    click.echo(f"failed tasks ({failed}" + (f", the first {len(rows)}" if failed > len(rows) else "") + "):", err=err)
    for r in rows:
        body = _one_line(r["body"])
        body = body if len(body) <= 40 else body[:37] + "..."
        why = apps.last_line(r["stderr"]) or apps.last_line(r["stdout"]) or "(no output)"
        why = _one_line(why)
        why = why if len(why) <= 100 else why[:97] + "..."
        click.echo(f"  {r['id']:>6} {_one_line(r['module'])} {TaskStatus.describe(r['status'])} {body} → {why}",
                   err=err)
    first = rows[0]["id"] if rows else "ID"
    click.echo(f"  more: `scalebox task show {first}`, `scalebox task list --failed --app {app_id}`, "
               f"`scalebox task retry --failed --app {app_id}`", err=err)


def _status_rows(conn: Connection, app_id: int, slots: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    from scalebox_hpc.db import apps

    with conn.transaction():
        counts = apps.module_counts(conn, app_id)
        why = apps.module_why(conn, app_id, counts, slots or [])
    return [{
        "module": mc.name, "total": mc.total, "ready": mc.count(-1), "running": mc.count(-3),
        "initial": mc.count(-9), "ok": mc.count(0), "failed": mc.failed,
        "per_minute": mc.last_minute,
        "slots": sum(1 for s in slots or [] if s["module"] == mc.name and s["live"]),
        "by_status": {str(k): v for k, v in sorted(mc.by_status.items())},
        "why": [w.as_json() for w in why.get(mc.name, [])],
    } for mc in counts]


def _print_why(rows: list[dict[str, Any]], app_id: int, *, err: bool = False, footer: bool = True) -> None:
    """``why tasks wait:`` and one line per reason a module's READY (or INITIAL) tasks are not
    claimed (``module: reason``); nothing when none is held."""
    held = [(r["module"], w["text"]) for r in rows for w in r.get("why", [])]
    if not held:
        return
    click.echo("why tasks wait:", err=err)
    for module, text in held:
        click.echo(f"  {_squeezed(module)}: {_squeezed(text)}", err=err)
    if footer:
        click.echo(f"  (the slots: `scalebox slot list --app {app_id}`)", err=err)


def _app_state(conn: Connection, app_id: int) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """The app row, its honest state (:func:`apps.app_state`) and its slots."""
    from scalebox_hpc.db import apps

    with conn.transaction():
        row = apps.get_app(conn, app_id)
        counts = apps.module_counts(conn, app_id)
        slots = apps.list_slots(conn, app_id)
    return row, apps.app_state(row["status"], counts, slots), slots


def _state_line(row: dict[str, Any], state: str, rows: list[dict[str, Any]]) -> str:
    """``IDLE: nothing READY or RUNNING, no live slot; 10 ok, 2 failed`` and the like."""
    ok = sum(r["ok"] for r in rows)
    failed = sum(r["failed"] for r in rows)
    ready = sum(r["ready"] for r in rows)
    tally = f"{ok} ok, {failed} failed"
    if state == "IDLE":
        return f"IDLE: nothing READY or RUNNING and no live slot; {tally}"
    if state == "WAITING":
        return (f"WAITING: {ready} task(s) READY but no live slot — start one with "
                f"`scalebox run --app {row['id']}` or `scalebox launcher --app {row['id']}`; {tally}")
    return f"{state}: {tally}"


@click.command("status")
@APP_OPTION
@click.argument("app_id", type=ID, required=False)
@click.option("--watch", is_flag=True,
              help="Refresh every second until the app is FINISHED or IDLE (q or Ctrl-C quits): a live view on a "
                   "terminal, the plain report again elsewhere.")
@JSON_OPTION
def status_cmd(app: int | None, app_id: int | None, watch: bool, as_json: bool) -> None:
    """Per-module task counts by status, live slots, rates, each stage's Slurm jobs (scaled
    first), the app's state, why tasks wait, and its failed tasks.

    Why tasks wait names, per module, each rule of the claim that holds its READY tasks now:
    the app PAUSED or INITIAL, no live slot, its slots' check.sh or disk gates closed, its
    semaphore at 0, back-pressure (a sink at its max_pending), tasks held for a host that runs
    no live slot of the module; and its INITIAL tasks (`why` in --json).

    The state is the app's status, except that a RUNNING app with nothing READY or RUNNING and
    no live slot is IDLE, and one with READY tasks but no live slot is WAITING.

    --watch on a terminal is a live view: per module a progress bar with its counts, the rate
    (tasks ended in the last minute) and an ETA at that rate; the live slots per host (busy of
    live); the stage jobs; why tasks wait; the recent failures. It ends when the app is FINISHED
    or IDLE, or when you press q. Off a terminal (a pipe, a log) it prints the plain report every
    second instead.

    \b
    Examples:
      scalebox status               # the newest app
      scalebox status --app 3 --watch   # live until app 3 is FINISHED or IDLE (q quits)
      scalebox status --json
    """
    from scalebox_hpc.cli import relay

    with _db() as conn:
        app_id = _app_id(conn, app_or_id(app, app_id))
        if watch and not as_json and _stdout_terminal():
            _watch_live(conn, app_id)
            return
        relay.relay_now(app_id)  # a fallback deliverer of the outbox (messages to other databases)
        while True:
            conn.commit()  # each refresh in transactions of its own: now() moves, slots can look dead
            snap = _snapshot(conn, app_id, watch)
            if as_json:
                _dump_snapshot(conn, app_id, snap)
            else:
                _print_snapshot(conn, app_id, snap, watch)
            if not watch or snap.state in ("FINISHED", "IDLE"):
                return
            time.sleep(1.0)


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """One refresh of ``status``: what it read, in the order it read it."""

    parts: Any
    row: dict[str, Any]
    state: str
    rows: list[dict[str, Any]]
    calls: int | None
    usage: list[Any] | None

    @property
    def failed(self) -> int:
        """Failed tasks over all modules."""
        return sum(r["failed"] for r in self.rows)


def _snapshot(conn: Connection, app_id: int, watch: bool) -> _Snapshot:
    from scalebox_hpc.cli import relay

    parts = relay.remote_parts(conn, app_id)
    jobs = _stage_jobs(conn, app_id)
    row, state, slots = _app_state(conn, app_id)
    rows = _status_rows(conn, app_id, slots)
    for r in rows:
        r["jobs"] = [f"{j['slurm_job_id']}:{j['state']}" for j in jobs if j["module"] == r["module"]]
        _pending_reasons(r, jobs)
    calls = _slurm_calls(conn, app_id)
    usage = None if watch else _usage(conn, app_id)  # a scan of the executions: not every second
    return _Snapshot(parts, row, state, rows, calls, usage)


def _dump_snapshot(conn: Connection, app_id: int, snap: _Snapshot) -> None:
    from scalebox_hpc.db import apps

    with conn.transaction():
        failures = apps.failed_tasks(conn, app_id, FAILURES_SHOWN) if snap.failed else []
    _dump({"app": {**{k: snap.row[k] for k in ("id", "name", "status", "result")}, "state": snap.state},
           "modules": snap.rows,
           "failures": [{**{k: f[k] for k in ("id", "module", "body", "status", "attempts")},
                         "last_line": apps.last_line(f["stderr"]) or apps.last_line(f["stdout"])}
                        for f in failures],
           **({"remote_parts": snap.parts} if snap.parts else {}),
           **({"slurm_calls_last_minute": snap.calls} if snap.calls is not None else {}),
           **({"usage": [dataclasses.asdict(u) for u in snap.usage]} if snap.usage is not None else {})})


def _print_snapshot(conn: Connection, app_id: int, snap: _Snapshot, watch: bool) -> None:
    from scalebox_hpc.cli import relay

    _print_status(snap.row, snap.rows, clear=watch, state=snap.state)
    click.echo(_one_line(_state_line(snap.row, snap.state, snap.rows)))
    _print_why(snap.rows, app_id)
    relay.print_remote_parts(snap.parts)
    if snap.failed:
        _print_failures(conn, app_id, snap.failed, err=False)
    if snap.calls is not None:
        click.echo(f"slurm: {snap.calls} calls in the last minute")
    _print_usage(snap.usage)


def _usage(conn: Connection, app_id: int) -> list[Any]:
    """Per module: CPU core-hours used, allocated (stage jobs), efficiency, max RSS (sbx_usage)."""
    from scalebox_hpc.db.usage import app_usage

    with conn.transaction():
        return list(app_usage(conn, app_id))


def _print_usage(usage: list[Any] | None) -> None:
    from scalebox_hpc.cli.usage import usage_lines

    lines = usage_lines(usage) if usage else []
    if lines:
        click.echo("resources:")
        for line in lines:
            click.echo(line)


WATCH_SECONDS = 1.0
"""How often --watch refreshes."""


def _stdout_terminal() -> bool:
    from rich.console import Console

    return Console().is_terminal


def _watch_live(conn: Connection, app_id: int) -> None:
    """The live view (rich Live) until the app is FINISHED or IDLE, or q is pressed."""
    from rich.console import Console
    from rich.live import Live

    from scalebox_hpc.liveview import bar_width, render

    console = Console()
    with _QuitKey() as keys:
        hint = "q quits" if keys.reading else "Ctrl-C quits"
        snap = _live_snapshot(conn, app_id)
        view = render(snap, hint=hint, width=bar_width(console.width))
        with Live(view, console=console, auto_refresh=False, transient=False) as live:
            while not snap.ended and not keys.pressed(WATCH_SECONDS):
                snap = _live_snapshot(conn, app_id)
                live.update(render(snap, hint="" if snap.ended else hint, width=bar_width(console.width)),
                            refresh=True)
    if not snap.ended:
        click.echo(f"(stopped watching app {app_id}: {snap.state})")


def _live_snapshot(conn: Connection, app_id: int) -> Any:
    from scalebox_hpc.liveview import StageJob, read_snapshot

    conn.commit()  # each refresh in transactions of its own: now() moves, slots can look dead
    jobs = [StageJob(str(j["module"]), str(j["slurm_job_id"]), str(j["state"]),
                     str(j["reason"] or "") if j["state"] == "PENDING" else "") for j in _stage_jobs(conn, app_id)]
    return read_snapshot(conn, app_id, jobs=jobs)


class _QuitKey:
    """Reads q from the terminal while the live view runs: stdin in cbreak mode (keys one by
    one, not echoed, Ctrl-C still a signal) only when it is a terminal, and put back as it was
    on every way out (the app ending, q, Ctrl-C, an error)."""

    def __init__(self) -> None:
        import sys

        self.fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else -1
        self.saved: list[Any] | None = None

    @property
    def reading(self) -> bool:
        """Whether q can be read (stdin is a terminal)."""
        return self.saved is not None

    def __enter__(self) -> _QuitKey:
        if self.fd >= 0:
            import termios
            import tty

            try:
                self.saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
            except termios.error:  # not a real terminal after all: no keys, Ctrl-C still works
                self.saved = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None

    def pressed(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True when q (or Q) was typed meanwhile."""
        if self.saved is None:
            time.sleep(seconds)
            return False
        import os
        import select

        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready and b"q" in os.read(self.fd, 64).lower():
                return True
        return False


def _stage_jobs(conn: Connection, app_id: int) -> list[dict[str, Any]]:
    """The app's live stage jobs, after an autoscale pass (none, quietly, for apps never submitted)."""
    from scalebox_hpc.cli.stage import stage_rows

    if not stage_rows(conn, app_id, include_ended=True):
        return []
    from scalebox_hpc.node import resolve_dsn, stage_autoscaler

    try:
        site = settings()
        stage_autoscaler(resolve_dsn(create_schema=False, settings=site), _work_root(None), settings=site)(app_id)
    except ScaleboxError as exc:
        click.echo(f"scalebox: warning: stage jobs not refreshed: {exc}", err=True)
    return stage_rows(conn, app_id, include_ended=False)


def _pending_reasons(row: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
    """Slurm's reason for each PENDING job of the row's module (Resources, QOSMaxJobsPerUserLimit...)."""
    reasons = {j["slurm_job_id"]: j["reason"] for j in jobs
               if j["module"] == row["module"] and j["state"] == "PENDING" and j["reason"]}
    if reasons:
        row["pending_reasons"] = reasons


def _slurm_calls(conn: Connection, app_id: int) -> int | None:
    from scalebox_hpc.cli.stage import slurm_calls

    return slurm_calls(conn, app_id)


def _print_status(app_row: dict[str, Any], rows: list[dict[str, Any]], *, clear: bool,
                  state: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text, not markup: a task's result such as "[/] done" is shown as written, never parsed
    title = f"app {app_row['id']} {app_row['name']}: {state or app_row['status']} {app_row['result'] or ''}"
    table = Table(title=Text(_one_line(title)))
    columns: tuple[str, ...] = ("module", "total", "ready", "running", "ok", "failed", "per_minute")
    if rows and "slots" in rows[0]:  # live slots per module
        columns = (*columns[:-1], "slots", columns[-1])
    for col in columns:
        table.add_column(col, justify="left" if col == "module" else "right")
    with_jobs = any(r.get("jobs") for r in rows)
    if with_jobs:
        table.add_column("slurm jobs")
    for r in rows:
        reasons = r.get("pending_reasons", {})
        jobs = [f"{j}({reasons[j.split(':')[0]]})" if j.split(":")[0] in reasons else j for j in r.get("jobs", [])]
        cells = [str(r.get(c, "")) for c in columns] + ([" ".join(jobs)] if with_jobs else [])
        table.add_row(*(Text(_one_line(cell)) for cell in cells))
    console = Console()
    if clear:
        console.clear()
    console.print(table)

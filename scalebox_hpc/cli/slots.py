"""``scalebox slot list``: where an app's slots are, what they do, and why one ended."""

from __future__ import annotations

from typing import Any

import click

from scalebox_hpc.cli.common import APP_OPTION, JSON_OPTION, _app_id, _db, _dump, _one_line, _squeezed


@click.group()
def slot() -> None:
    """Inspect the slots (workers) of an app."""


def elapsed(seconds: float | None) -> str:
    """``75.2`` -> ``1m15s``; '' for no value."""
    if seconds is None:
        return ""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def slot_rows(conn: Any, app_id: int) -> list[dict[str, Any]]:
    """The app's slots as shown: ``state`` is LOST for a slot that stopped heart-beating
    but was not marked yet (its launcher died)."""
    from scalebox_hpc.db import apps

    with conn.transaction():
        rows = apps.list_slots(conn, app_id)
    for r in rows:
        r["state"] = r["status"] if r["live"] or r["status"] not in ("STARTING", "READY", "RUNNING") else "LOST"
        if not r["live"]:
            r["waiting"] = None  # what an ended slot last waited for is no reason any more
    return rows


def slot_message(row: dict[str, Any]) -> str:
    """What a listing says of a slot: why a live one waits (``waits: ...``), else its message."""
    if row.get("waiting"):
        return f"waits: {row['waiting']}"
    return str(row["message"] or "")


@slot.command("list")
@APP_OPTION
@click.option("--all", "show_all", is_flag=True, help="Also the slots that ended normally (EXITED).")
@JSON_OPTION
def slot_list(app: int | None, show_all: bool, as_json: bool) -> None:
    """The app's slots: host, module, slot number, state, the task it runs now and for how
    long, and its message: why a live slot claims nothing now (`waits: check.sh exited 1:
    ... (not now)`, a closed disk gate), or why an ERROR slot ended (`setup.sh exited 3:
    <its last stderr lines>`). Then, as in `scalebox status`, why each module's tasks wait.

    \b
    Examples:
      scalebox slot list              # the newest app's slots
      scalebox slot list --app 3 --all
      scalebox slot list --json
    """
    from scalebox_hpc.cli.status import _print_why, _status_rows

    with _db() as conn:
        app_id = _app_id(conn, app)
        rows = slot_rows(conn, app_id)
        modules = [] if as_json or not rows else _status_rows(conn, app_id, rows)
    if as_json:
        _dump(rows)
        return
    shown = [r for r in rows if show_all or r["state"] != "EXITED"]
    if not rows:
        click.echo(f"app {app_id} has no slots yet — start them with `scalebox run --app {app_id}`, "
                   f"`scalebox launcher --app {app_id}` or `scalebox submit`", err=True)
        return
    click.echo(f"{'host':<12} {'module':<14} {'slot':>4}  {'state':<8} {'done':>6}  {'task':>8} {'for':>7}  message")
    for r in shown:
        task = str(r["task_id"]) if r["task_id"] is not None else ""
        click.echo(f"{_one_line(r['host']):<12} {_one_line(r['module']):<14} {r['seq']:>4}  {r['state']:<8} "
                   f"{r['tasks_done']:>6}  {task:>8} {elapsed(r['task_seconds']):>7}  "
                   f"{_squeezed(slot_message(r))}")
    hidden = len(rows) - len(shown)
    if hidden:
        click.echo(f"({hidden} slot(s) that ended normally not shown; --all shows them)", err=True)
    _print_why(modules, app_id, footer=False)

"""``scalebox relay``: deliver the outbox (messages to apps in other databases), one pass or a loop."""

from __future__ import annotations

import time
from typing import Any

import click

from scalebox_hpc.cli.common import ID, JSON_OPTION, _dump, _one_line, settings


def _dsn() -> str:
    from scalebox_hpc.db.connection import configured_dsn

    site = settings()
    dsn = configured_dsn(site)
    if dsn is None:
        from scalebox_hpc import embedded

        dsn = embedded.ensure_running(embedded.data_home(site))
    return dsn


@click.command("relay")
@click.option("--app", "app", type=ID, default=None, help="Only this app's outbox (default: every app you see).")
@click.option("--once", is_flag=True, help="One pass, then exit (for scrontab / cron).")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True,
              help="Seconds between passes without --once.")
@JSON_OPTION
def relay_cmd(app: int | None, once: bool, interval: float, as_json: bool) -> None:
    """Deliver the messages waiting in this database's outbox to the other clusters' databases.

    Each message is delivered exactly once (its key is kept there), whoever delivers: the
    sender's launcher right after its hand-off, `scalebox status`, the autoscale pass, or this
    command. A remote that is down only delays (backoff); a pass with --once tries every remote
    with waiting messages now. Exit 1 when some remote could not be reached (--once).

    \b
    Examples:
      scalebox relay --once                 # one pass (scrontab: */1 * * * * scalebox relay --once)
      scalebox relay --app 3 --interval 2   # keep delivering app 3's outbox
    """
    from scalebox_hpc.db import outbox

    dsn = _dsn()
    while True:
        done = outbox.relay(dsn, app_id=app, force=once)
        if as_json:
            _dump([{"remote": d.remote, "sent": d.sent, "received": d.received, "busy": d.busy,
                    "waiting": d.waiting, "error": d.error} for d in done])
        else:
            for d in done:
                state = d.error or ("busy (another relay)" if d.busy else
                                    "finish record waits for its queue to drain" if d.waiting else "ok")
                click.echo(f"{outbox.shown(d.remote)}: {d.sent} delivered ({d.received} new there): {state}")
        if once:
            if any(d.error for d in done):
                raise SystemExit(1)
            return
        time.sleep(interval)


def relay_now(app_id: int) -> None:
    """The `scalebox status` / autoscale hook: one quiet relay pass over the app's due remotes."""
    from scalebox_hpc.db import outbox

    outbox.relay_quietly(_dsn(), app_id=app_id)


def remote_parts(conn: Any, app_id: int) -> list[dict[str, Any]]:
    """The app's parts in other databases with their outbox state (`status --json`: ``remote_parts``)."""
    from scalebox_hpc.db import outbox

    with conn.transaction():
        parts = outbox.remote_parts(conn, app_id)
    for p in parts:
        p["remote"] = outbox.shown(p["remote"])
    return parts


def print_remote_parts(parts: list[dict[str, Any]]) -> None:
    """One line per remote part: where it is, its sinks, what waits in the outbox for it."""
    for p in parts:
        waiting = "nothing waiting" if not p["depth"] else (
            f"{p['depth']} waiting, oldest {p['oldest_seconds']:.0f} s"
            + (f", last error: {p['last_error']}" if p.get("last_error") else ""))
        sinks = ", ".join(p["sinks"]) or "-"
        click.echo(_one_line(f"remote part: app {p['remote_app_id']} at {p['remote']} ({sinks}): outbox {waiting}"))

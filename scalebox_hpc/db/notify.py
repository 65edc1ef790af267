"""LISTEN for task wake-up hints on a dedicated autocommit connection, in a thread.

A hint only shortens a slot's sleep: slots poll anyway (every ``sleep_interval_seconds``), so
lost hints (reconnects, overflow) cost latency, never correctness. That is also why LISTEN is
optional: through a pooler in transaction mode (PgBouncer) a LISTEN binds to whichever server
connection ran it and nothing is ever delivered, so there the listener needs a direct DSN
(SCALEBOX_LISTEN_DSN) or is left off.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

import psycopg

from scalebox_hpc.db.connection import connect, known_pooler, redact
from scalebox_hpc.errors import DatabaseError
from scalebox_hpc.settings import Settings

logger = logging.getLogger(__name__)

CHANNEL = "sbx_tasks"

LISTEN_DSN_ENV = "SCALEBOX_LISTEN_DSN"
"""Where to LISTEN: a DSN (e.g. the PostgreSQL server behind the pooler), or ``off``."""


def listen_dsn(dsn: str, settings: Settings | Mapping[str, str] | None = None) -> str | None:
    """The DSN the listener uses, None for none: the settings' SCALEBOX_LISTEN_DSN (``off``/``none``:
    none); unset, ``dsn`` itself, except behind a transaction pooler (SCALEBOX_DB_POOLER=transaction),
    where a LISTEN hears nothing: none, the slots poll. ``settings``: the root's (a mapping or
    nothing is read as :meth:`Settings.of` does)."""
    site = Settings.of(settings)
    value = (site.listen_dsn or "").strip()
    if value.lower() in ("off", "none"):
        return None
    if value:
        return value
    return None if site.db_pooler else dsn


class Listener:
    """Calls ``on_hint(module_id)`` for every NOTIFY on the task channel until stopped; with
    ``dsn`` None it does nothing (``ready`` is set at start: there is nothing to wait for).
    ``pooler``: what :func:`~scalebox_hpc.db.connection.connect` takes (the root passes its
    settings' ``db_pooler``; None: this process's settings)."""

    def __init__(self, dsn: str | None, on_hint: Callable[[int], None], *, reconnect_seconds: float = 2.0,
                 pooler: bool | None = None) -> None:
        self.dsn = dsn
        self.pooler = pooler
        self.on_hint = on_hint
        self.reconnect_seconds = reconnect_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="listener", daemon=True)
        self.ready = threading.Event()

    def start(self) -> Listener:
        """Start listening in the background."""
        if self.dsn is None:
            logger.info("no LISTEN (%s=off, or behind a transaction pooler): slots poll only", LISTEN_DSN_ENV,
                        extra={"action": "listen_off"})
            self.ready.set()
            return self
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop (within about a second)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(3.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._listen():
                    return
            except (DatabaseError, psycopg.Error) as exc:
                logger.debug("listener reconnecting: %s", exc, extra={"action": "listen_reconnect", "error": str(exc)})
                self._stop.wait(self.reconnect_seconds)

    def _listen(self) -> bool:
        """Listen until stopped (True) or, when the DSN turns out to lead to a pooler nobody
        declared, not at all (False)."""
        assert self.dsn is not None  # start() runs no thread without one
        with connect(self.dsn, autocommit=True, pooler=self.pooler) as conn:
            if known_pooler(self.dsn):  # a LISTEN through it would never hear anything
                logger.info("no LISTEN: %s leads to a pooler (set %s to a direct DSN for hints); slots poll only",
                            redact(self.dsn), LISTEN_DSN_ENV,
                            extra={"action": "listen_pooler", "dsn": redact(self.dsn)})
                self.ready.set()
                return False
            conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(CHANNEL)))
            self.ready.set()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=1.0, stop_after=64):
                    try:
                        self.on_hint(int(note.payload))
                    except ValueError:
                        continue
        return True

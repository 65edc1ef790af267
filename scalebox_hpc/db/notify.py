"""LISTEN for task wake-up hints on a dedicated autocommit connection, in a thread.

A hint only shortens a slot's sleep: slots poll anyway, so lost hints (reconnects,
overflow) cost latency, never correctness.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

from scalebox_hpc.db.connection import connect
from scalebox_hpc.errors import DatabaseError

logger = logging.getLogger(__name__)

CHANNEL = "sbx_tasks"


class Listener:
    """Calls ``on_hint(module_id)`` for every NOTIFY on the task channel until stopped."""

    def __init__(self, dsn: str, on_hint: Callable[[int], None], *, reconnect_seconds: float = 2.0) -> None:
        self.dsn = dsn
        self.on_hint = on_hint
        self.reconnect_seconds = reconnect_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="listener", daemon=True)
        self.ready = threading.Event()

    def start(self) -> Listener:
        """Start listening in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop (within about a second)."""
        self._stop.set()
        self._thread.join(3.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except (DatabaseError, psycopg.Error) as exc:
                logger.debug("listener reconnecting: %s", exc)
                self._stop.wait(self.reconnect_seconds)

    def _listen(self) -> None:
        with connect(self.dsn, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(CHANNEL)))
            self.ready.set()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=1.0, stop_after=64):
                    try:
                        self.on_hint(int(note.payload))
                    except ValueError:
                        continue

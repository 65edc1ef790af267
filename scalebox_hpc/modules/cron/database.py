"""The cron task's sink: each tick straight into the queue, at the tick.

A run.sh's messages normally wait in the emit buffer until the task ends, and the cron task
never ends, so it writes its ticks itself, over one connection of its own (SCALEBOX_DSN, which
the launcher gives every script), each delivery one transaction: the app's state, then the
ticks as tasks of their modules under CONFLICT_ACTION IGNORE whatever the module's own setting,
so a tick whose body (its time) is already in the module is not written again (a restarted
cron task, two cron tasks at once) and never resets one already done (as OVERWRITE would).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import Connection, connect, translate_errors
from scalebox_hpc.db.queue import module_refs
from scalebox_hpc.errors import DatabaseError
from scalebox_hpc.models import ConflictAction, ModuleRef
from scalebox_hpc.modules.cron.loop import AppState, Delivered, Tick

logger = logging.getLogger(__name__)

STATEMENT_TIMEOUT_SECONDS = 30.0
"""A delivery is three short statements; one that hangs longer is taken for an outage."""


@dataclass(frozen=True)
class TaskIdentity:
    """Where this cron task runs (from the launcher's TASK_ID, HOST, SLOT_SEQ): while its task is
    RUNNING elsewhere, or no longer RUNNING (recovered after this launcher was lost, cancelled),
    this process is an orphan and stops."""

    task_id: int
    host: str
    seq: int


class DatabaseSink:
    """:class:`~scalebox_hpc.modules.cron.loop.TickSink` on PostgreSQL."""

    def __init__(self, dsn: str, app_id: int, me: TaskIdentity | None = None) -> None:
        self.dsn = dsn
        self.app_id = app_id
        self.me = me
        self._conn: Connection | None = None

    def close(self) -> None:
        """Close the connection, if open."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, statement_timeout=STATEMENT_TIMEOUT_SECONDS)
        return self._conn

    def modules(self) -> dict[str, ModuleRef]:
        """The app's modules (DatabaseError during an outage)."""
        try:
            conn = self._connection()
            with translate_errors(self.dsn), conn.transaction():
                return module_refs(conn, self.app_id)
        except DatabaseError:
            self.close()  # a broken connection is opened anew on the next try
            raise

    def deliver(self, ticks: Sequence[Tick]) -> Delivered:
        """The app's state and, when RUNNING, ``ticks`` inserted; one transaction."""
        try:
            conn = self._connection()
            with translate_errors(self.dsn), conn.transaction():
                state = self._state(conn)
                if state is not AppState.RUNNING or not ticks:
                    return Delivered(state, 0)
                batches = [apps.Batch(t.entry.module, {"cron": t.entry.schedule.text}, [t.body]) for t in ticks]
                done = apps.submit(conn, self.app_id, batches, conflict=ConflictAction.IGNORE)
                return Delivered(state, done.written)
        except DatabaseError:
            self.close()
            raise

    def _state(self, conn: Connection) -> AppState:
        status = str(apps.get_app(conn, self.app_id)["status"])
        if status == "FINISHED":
            return AppState.ENDED
        if self.me is not None:
            where = apps.running_task(conn, self.me.task_id)
            if where is None or where["host"] != self.me.host or where["seq"] != self.me.seq:
                logger.warning("task %d is no longer running in this slot (%s/%d): stopping",
                               self.me.task_id, self.me.host, self.me.seq)
                return AppState.ENDED
        return AppState.RUNNING if status == "RUNNING" else AppState.PAUSED

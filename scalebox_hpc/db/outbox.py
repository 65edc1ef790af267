"""The outbox relay: messages to another database's app, delivered exactly once, with no daemon.

A hand-off that emits to a remote sink writes the message to ``sbx_outbox`` in its own
transaction (``sbx_insert_messages_v1``, action REMOTE). :func:`deliver` moves one remote's
pending rows:

1. in a local transaction, take the remote's advisory lock (``pg_try_advisory_xact_lock``: a
   second relay at the same time skips this remote instead of waiting) and read its oldest
   pending rows in id order;
2. in ONE remote transaction, ``sbx_receive_v1`` keeps each row's key (the sender app's uid +
   the outbox id) in the receiver's ``sbx_inbox`` and inserts the messages whose keys are new;
   a key seen before (a retried delivery) inserts nothing;
3. mark the rows delivered in the local transaction, and commit it.

A crash between the remote commit (2) and the local one (3) leaves the rows pending: the next
delivery sends them again and the receiver skips them by their keys. A remote that cannot be
reached (or refuses) only delays: one log line, the rows stay pending, and the remote is not
tried again before its backoff (1 s doubling to 5 min, kept in the rows) is over.

A finish record (the app was set FINISHED) is sent alone after every message before it, and is
applied there once nothing of the remote app is READY or RUNNING; until then it stays pending
and holds the rows after it (order is kept).

Who delivers: the sender's own queue right after a hand-off that wrote to the outbox, through
:func:`kick` (a background thread per database, so neither the slot nor the dispatcher waits on
another database), and as fallback ``scalebox relay`` (scrontab), ``scalebox status`` and the
autoscale pass, each a :func:`relay` call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb

from scalebox_hpc.db.connection import Connection, connect, redact
from scalebox_hpc.db.sql import query
from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.models import ConflictAction, ModuleRef
from scalebox_hpc.text import error_line

if TYPE_CHECKING:  # pydantic stays out of the queue's import (`scalebox task add` start time)
    from scalebox_hpc.pipeline.spec import AppSpec

logger = logging.getLogger(__name__)

BATCH = 1000
"""Rows one delivery moves (one remote transaction)."""
PASS_ROWS = 100_000
"""Rows one pass moves per remote at most (then the next pass goes on)."""
REMOTE_CONNECT_TIMEOUT = 3.0
"""Seconds to reach a remote database: a down remote must not hold the deliverer long."""
REMOTE_STATEMENT_TIMEOUT = 30.0
FAULT_ENV = "SCALEBOX_OUTBOX_FAULT"
"""Fault injection for the tests: ``exit-after-remote-commit`` ends the delivering process
(``os._exit(70)``) between the remote commit and the local mark."""


@dataclass
class Delivery:
    """What one :func:`deliver` did for one remote."""

    remote: str
    sent: int = 0
    """Rows marked delivered here (messages and finish records)."""
    received: int = 0
    """Of those, messages whose key was new there (the others had arrived before)."""
    busy: bool = False
    """Another relay holds this remote's lock."""
    waiting: bool = False
    """A finish record waits for the remote app's queue to drain."""
    error: str | None = None


def record_remote_sinks(conn: Connection, app_id: int, spec: AppSpec) -> None:
    """Store the app's remote sinks (see :meth:`AppSpec.remote_sinks`), inside create_app's transaction."""
    for name, remote in spec.remote_sinks().items():
        conn.execute(query("insert_remote_sink"), {
            "app_id": app_id, "name": name, "remote": remote.server, "remote_app_id": remote.app_id})


def remote_refs(conn: Connection, app_id: int) -> dict[str, ModuleRef]:
    """The app's remote sinks as routing targets (id 0, ``remote`` set)."""
    return refs_of(conn.execute(query("list_remote_sinks"), {"app_id": app_id}).fetchall())


def refs_of(rows: Sequence[dict[str, Any]]) -> dict[str, ModuleRef]:
    """Rows of ``list_remote_sinks`` (name, remote, remote_app_id) as routing targets."""
    return {r["name"]: ModuleRef(0, r["name"], (), ConflictAction.IGNORE, None, r["remote"], int(r["remote_app_id"]))
            for r in rows}


def remote_parts(conn: Connection, app_id: int) -> list[dict[str, Any]]:
    """The app's remote parts (remote, app id there, its sinks) with their outbox depth, oldest
    pending row's age in seconds and last delivery error (depth 0 when nothing is pending)."""
    parts: dict[tuple[str, int], dict[str, Any]] = {}
    for r in conn.execute(query("list_remote_sinks"), {"app_id": app_id}).fetchall():
        part = parts.setdefault((r["remote"], int(r["remote_app_id"])), {
            "remote": r["remote"], "remote_app_id": int(r["remote_app_id"]), "sinks": [],
            "depth": 0, "oldest_seconds": None, "last_error": None})
        part["sinks"].append(r["name"])
    for d in outbox_depth(conn, app_id):
        part = parts.setdefault((d["remote"], d["remote_app_id"]), {
            "remote": d["remote"], "remote_app_id": d["remote_app_id"], "sinks": []})
        part.update(depth=d["depth"], oldest_seconds=d["oldest_seconds"], last_error=d["last_error"])
    return list(parts.values())


def outbox_depth(conn: Connection, app_id: int | None = None) -> list[dict[str, Any]]:
    """Pending outbox rows per app and remote: depth, oldest_seconds, last_error."""
    return [{"app_id": int(r["app_id"]), "remote": r["remote"], "remote_app_id": int(r["remote_app_id"]),
             "depth": int(r["depth"]), "oldest_seconds": float(r["oldest_seconds"]), "last_error": r["last_error"]}
            for r in conn.execute(query("outbox_depth"), {"app_id": app_id}).fetchall()]


def _one_line(exc: BaseException) -> str:
    """The error as recorded and logged: all its lines joined, at most 500 characters."""
    return error_line(exc, whole=True, limit=500)


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        logger.warning("outbox: fault injected at %s: exiting", point)
        os._exit(70)


def _message_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"source": str(r["source"]), "outbox_id": int(r["id"]), "app_id": int(r["remote_app_id"]),
             "module": r["module"], "body": r["body"], "headers": r["headers"]} for r in rows]


def _connect_remote(remote: str) -> Connection:
    from scalebox_hpc.pipeline.remotes import remote_dsn

    return connect(remote_dsn(remote), autocommit=True, timeout=REMOTE_CONNECT_TIMEOUT,
                   statement_timeout=REMOTE_STATEMENT_TIMEOUT)


def _send(local: Connection, rconn: Connection, rows: list[dict[str, Any]], out: Delivery) -> bool:
    """Deliver ``rows`` (pending, in order) over ``rconn``: the messages before the first finish
    record in one remote transaction, then that record; True when all of them went."""
    cut = next((i for i, r in enumerate(rows) if r["kind"] == "finish"), len(rows))
    messages = rows[:cut]
    if messages:
        with rconn.transaction():
            got = rconn.execute(query("outbox_receive"), {"rows": Jsonb(_message_rows(messages))}).fetchone()
            _forget(local, rconn, {int(r["app_id"]) for r in messages})
        _fault("exit-after-remote-commit")
        local.execute(query("outbox_delivered"), {"ids": [int(r["id"]) for r in messages]})
        out.sent += len(messages)
        out.received += int(got["received"]) if got else 0
    if cut == len(rows):
        return True
    fin = rows[cut]
    answer = rconn.execute(query("outbox_receive_finish"), {
        "source": str(fin["source"]), "outbox_id": int(fin["id"]), "app_id": int(fin["remote_app_id"]),
        "result": fin["body"]}).fetchone()
    if answer is None or answer["outcome"] != "done":
        out.waiting = True
        return False
    local.execute(query("outbox_delivered"), {"ids": [int(fin["id"])]})
    out.sent += 1
    return True


def _forget(local: Connection, rconn: Connection, app_ids: set[int]) -> None:
    """Let the receiver forget the keys of rows these sender apps will never send again (below
    each app's lowest pending id, this batch included: its keys stay until it is marked), in the
    delivery's remote transaction. Best effort, in a savepoint: a receiver that refuses (a role
    without DELETE there) keeps its keys, and the delivery goes on."""
    marks = local.execute(query("outbox_low_water"), {"app_ids": sorted(app_ids)}).fetchall()
    try:
        with rconn.transaction():
            for m in marks:
                if int(m["below"]) > 0:
                    rconn.execute(query("outbox_forget"), {"source": str(m["source"]), "below": int(m["below"])})
    except (psycopg.Error, ScaleboxError) as exc:
        logger.debug("outbox: the receiver keeps its keys (%s)", _one_line(exc))


def deliver(local: Connection, remote: str, *, limit: int = BATCH, max_rows: int = PASS_ROWS,
            connect_remote: Callable[[str], Connection] = _connect_remote, keep: bool = False) -> Delivery:
    """Deliver the pending rows of ``remote``, ``limit`` per transaction, up to ``max_rows``
    (see the module doc). ``local`` is an autocommit connection to the sender's database;
    ``keep``: the remote connection is the caller's to close (a cached one). Never raises for a
    remote that is down or refuses: the result's ``error`` says so, and the rows wait for their
    backoff."""
    out = Delivery(remote)
    try:  # before the lock: a remote that is down holds no lock for its connect timeout
        rconn = connect_remote(remote)
    except Exception as exc:  # DatabaseError (down), a malformed REMOTE_SERVER: the rows wait
        with local.transaction():
            _failed(local, remote, out, exc)
        return out
    try:
        while out.sent < max_rows and _batch(local, rconn, remote, limit, out):
            pass
    finally:
        if not keep or out.error is not None:  # after an error the next pass reconnects
            rconn.close()
    if out.sent:
        logger.info("outbox: %d row(s) delivered to %s (%d new there)", out.sent, shown(remote), out.received)
    return out


def _failed(local: Connection, remote: str, out: Delivery, exc: BaseException) -> None:
    out.error = _one_line(exc)
    logger.warning("outbox: delivery to %s failed, its rows wait: %s", shown(remote), out.error)
    local.execute(query("outbox_failed"), {"remote": remote, "error": out.error})


def _batch(local: Connection, rconn: Connection, remote: str, limit: int, out: Delivery) -> bool:
    """One local transaction: the remote's lock, its oldest pending rows, their delivery and
    mark. True when rows went and more may wait."""
    with local.transaction():
        row = local.execute(query("outbox_lock"), {"remote": remote}).fetchone()
        if row is None or not row["locked"]:
            out.busy = True
            return False
        rows = [dict(r) for r in local.execute(query("outbox_pending"), {"remote": remote, "limit": limit}).fetchall()]
        if not rows:
            return False
        try:
            return _send(local, rconn, rows, out)
        except Exception as exc:  # psycopg or a ScaleboxError of the remote: the rows wait
            _failed(local, remote, out, exc)
            return False


def shown(remote: str) -> str:
    """A remote as it may be shown (a DSN without its password)."""
    try:
        return redact(remote)
    except Exception:  # an unparsable conninfo: show nothing of it that could be a secret
        return "<remote>"


def relay(dsn: str, *, app_id: int | None = None, force: bool = False, limit: int = BATCH,
          connect_remote: Callable[[str], Connection] = _connect_remote) -> list[Delivery]:
    """One pass over every remote with pending rows (of ``app_id``, or of every app the caller
    sees): deliver what is due (``force``: also the remotes still in their backoff)."""
    with connect(dsn, autocommit=True, statement_timeout=REMOTE_STATEMENT_TIMEOUT) as local:
        return relay_on(local, app_id=app_id, force=force, limit=limit, connect_remote=connect_remote)


def relay_on(local: Connection, *, app_id: int | None = None, force: bool = False, limit: int = BATCH,
             connect_remote: Callable[[str], Connection] = _connect_remote, keep: bool = False) -> list[Delivery]:
    """:func:`relay` over an open connection to the sender's database (the autoscale pass's)."""
    out: list[Delivery] = []
    remotes = local.execute(query("outbox_remotes"), {"app_id": app_id}).fetchall()
    for r in remotes:
        if force or r["due"]:
            out.append(deliver(local, r["remote"], limit=limit, connect_remote=connect_remote, keep=keep))
    return out


def relay_quietly(dsn: str, *, app_id: int | None = None) -> list[Delivery]:
    """:func:`relay` for the tiny hooks (status, autoscale): a failure is one log line, never raised."""
    try:
        return relay(dsn, app_id=app_id)
    except Exception as exc:  # the hook's own command must go on
        logger.warning("outbox: relay pass skipped: %s", _one_line(exc))
        return []


def relay_quietly_on(local: Connection, app_id: int) -> None:
    """:func:`relay_on` for the autoscale pass: a failure is one log line, never raised."""
    try:
        with local.transaction():  # a savepoint inside the pass's transaction: a failure here leaves it usable
            relay_on(local, app_id=app_id)
    except Exception as exc:  # the pass must go on
        logger.warning("outbox: relay pass skipped: %s", _one_line(exc))


@dataclass
class BackgroundRelay:
    """A daemon thread that relays one database's outbox when kicked (after a hand-off wrote to
    it) and, while rows wait, again after a backoff; the kick itself never blocks."""

    dsn: str
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _local: Connection | None = None
    _remotes: dict[str, Connection] = field(default_factory=dict)

    def kick(self) -> None:
        """Ask for a relay pass soon (returns at once)."""
        self._wake.set()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="outbox-relay", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        pause: float | None = None
        while True:
            self._wake.wait(timeout=pause)
            self._wake.clear()
            done = self._pass()
            left = any(d.error or d.waiting or d.busy for d in done)
            # rows left: try again later (the rows' own backoff decides when they are due);
            # nothing left: sleep until the next hand-off that writes to the outbox
            pause = min((pause or 0.5) * 2, 60.0) if left else None

    def _pass(self) -> list[Delivery]:
        """One relay pass over connections kept between passes (a pass right after each hand-off
        must not pay two connects); any failure drops them, the next pass reconnects."""
        _fault("exit-before-delivery")  # tests: the sender dies between its hand-off's commit and the delivery
        try:
            if self._local is None or self._local.closed:
                self._local = connect(self.dsn, autocommit=True, statement_timeout=REMOTE_STATEMENT_TIMEOUT)
            return relay_on(self._local, connect_remote=self._remote, keep=True)
        except Exception as exc:  # logged, never raised: the launcher goes on
            logger.warning("outbox: relay pass skipped: %s", _one_line(exc))
            self._drop()
            return [Delivery("?", error=_one_line(exc))]

    def _remote(self, remote: str) -> Connection:
        conn = self._remotes.get(remote)
        if conn is None or conn.closed:
            conn = self._remotes[remote] = _connect_remote(remote)
        return conn

    def _drop(self) -> None:
        for conn in [self._local, *self._remotes.values()]:
            if conn is not None:
                conn.close()
        self._local, self._remotes = None, {}


_RELAYS: dict[str, BackgroundRelay] = {}
_RELAYS_LOCK = threading.Lock()


def kick(dsn: str) -> None:
    """A hand-off on ``dsn`` wrote to the outbox: relay it in the background (one thread per database)."""
    with _RELAYS_LOCK:
        background = _RELAYS.setdefault(dsn, BackgroundRelay(dsn))
    background.kick()


def wait_delivered(dsn: str, app_id: int, timeout: float) -> bool:
    """Relay until nothing of ``app_id`` is pending, or ``timeout`` seconds; True when empty."""
    deadline = time.monotonic() + timeout
    while True:
        relay(dsn, app_id=app_id, force=True)
        with connect(dsn, autocommit=True) as conn:
            if not outbox_depth(conn, app_id):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)

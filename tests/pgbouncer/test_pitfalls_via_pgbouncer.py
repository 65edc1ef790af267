"""What breaks behind PgBouncer in transaction mode, and what connect()/the listener do about it.

Each pitfall is shown first with a plain psycopg connection (so the test would fail if our
fix were undone: the failure is real on this PgBouncer), then with scalebox's connection."""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
import pytest

from scalebox_hpc.db import apps, connection
from scalebox_hpc.db import stages as db_stages
from scalebox_hpc.db.connection import PooledConnection, connect
from scalebox_hpc.db.notify import Listener, listen_dsn
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.models import Message
from scalebox_hpc.pipeline import load_pipeline
from tests.helpers import write_app
from tests.pgbouncer.conftest import Bouncer, Shuffler

pytestmark = [pytest.mark.pg, pytest.mark.pgbouncer]

RUNS = 12
"""Executions of one query: psycopg prepares it server-side at the 5th (prepare_threshold=5)."""


def _moved_runs(conn: psycopg.Connection[Any], shuffler: Shuffler) -> list[str]:
    """Run one query RUNS times, every other time with three clients pinning the server
    connections on top of PgBouncer's idle list, so consecutive runs use different server
    connections; the outcome of each run."""
    out = []
    for k in range(RUNS):
        if k % 2:
            shuffler.pin()
        try:
            conn.execute("SELECT %s::int + 1 AS n", (k,)).fetchone()
            out.append("ok")
        except psycopg.Error as exc:
            out.append(type(exc).__name__)
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                conn.rollback()
        finally:
            if k % 2:
                shuffler.release()
    return out


def test_automatic_prepare_breaks_through_the_pooler_and_connect_turns_it_off(bouncer: Bouncer) -> None:
    shuffler = Shuffler(bouncer.dsn)
    try:
        with psycopg.connect(bouncer.dsn, autocommit=True) as plain:  # psycopg's default: prepare after 5
            broken = _moved_runs(plain, shuffler)
        with connect(bouncer.dsn, autocommit=True) as ours:
            assert ours.prepare_threshold is None
            fine = _moved_runs(ours, shuffler)
    finally:
        shuffler.close()
    assert broken[:5] == ["ok"] * 5
    assert set(broken[5:]) - {"ok"} and set(broken) <= {"ok", "InvalidSqlStatementName", "DuplicatePreparedStatement"}
    assert fine == ["ok"] * RUNS


def test_a_session_setting_is_lost_behind_the_pooler_and_the_queue_sets_its_timeout_per_transaction(
    bouncer: Bouncer,
) -> None:
    shuffler = Shuffler(bouncer.dsn)
    try:
        with psycopg.connect(bouncer.dsn, autocommit=True, prepare_threshold=None) as plain:
            plain.execute("SET statement_timeout = '4321ms'")
            shuffler.pin()
            lost = plain.execute("SHOW statement_timeout").fetchone()
            shuffler.release()
            plain.execute("RESET statement_timeout")  # do not leave it to the next client
        q = PgQueue(bouncer.dsn, statement_timeout=4.321)
        shuffler.pin()
        kept = q.conn.execute("SHOW statement_timeout").fetchone()
        shuffler.release()
        q.close()
    finally:
        shuffler.close()
    assert lost != ("4321ms",)
    assert kept == {"statement_timeout": "4321ms"}


def test_a_server_refusing_the_options_parameter_is_taken_for_a_pooler(
    bouncer: Bouncer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Nobody set SCALEBOX_DB_POOLER: PgBouncer's refusal of ``options`` (sent as the timeout,
    or as a no-op probe) makes connect() reopen the pooler's way, with one warning."""
    monkeypatch.delenv("SCALEBOX_DB_POOLER")
    monkeypatch.setattr(connection, "_REFUSE_OPTIONS", set())
    with connect(bouncer.direct) as direct:  # a server takes the probe: nothing changes there
        assert type(direct) is psycopg.Connection and direct.prepare_threshold == 5
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter"):
        psycopg.connect(bouncer.dsn, options="-c statement_timeout=1000").close()
    with caplog.at_level(logging.WARNING, logger="scalebox_hpc.db.connection"):
        cli = connect(bouncer.dsn)
        q = PgQueue(bouncer.dsn, statement_timeout=3)
        assert isinstance(q.conn, PooledConnection)
        assert q.conn.execute("SHOW statement_timeout").fetchone() == {"statement_timeout": "3s"}
    assert cli.prepare_threshold is None and q.conn.prepare_threshold is None
    assert len([r for r in caplog.records if "refuses the `options` startup parameter" in r.getMessage()]) == 1
    cli.close()
    q.close()


def test_the_autoscale_lock_is_transaction_scoped_and_holds_through_the_pooler(
    bouncer: Bouncer, tmp_path: Any,
) -> None:
    """pg_try_advisory_xact_lock, taken inside the autoscaler's transaction: held by one
    client until its commit, whichever server connections the clients get."""
    spec = load_pipeline(write_app(tmp_path / "app", "name: lock\nmodules:\n  a: {}\n", {"a/run.sh": "true\n"}))
    with connect(bouncer.dsn) as conn:
        app_id = apps.create_app(conn, spec)
        conn.commit()
    a = connect(bouncer.dsn, autocommit=True, statement_timeout=30)
    b = connect(bouncer.dsn, autocommit=True, statement_timeout=30)
    try:
        with a.transaction():
            assert db_stages.try_lock(a, app_id)
            with b.transaction():
                assert not db_stages.try_lock(b, app_id)
        with b.transaction():
            assert db_stages.try_lock(b, app_id)
    finally:
        a.close()
        b.close()


def test_listen_is_off_behind_the_pooler_unless_a_direct_dsn_is_given(
    bouncer: Bouncer, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
) -> None:
    """A LISTEN through PgBouncer in transaction mode never hears anything, so behind the pooler
    there is none (the slots poll), or it goes to SCALEBOX_LISTEN_DSN: there a task inserted
    through the pooler wakes the module's slots."""
    assert listen_dsn(bouncer.dsn) is None
    off = Listener(listen_dsn(bouncer.dsn), lambda _m: None).start()
    assert off.ready.is_set()
    off.stop()

    monkeypatch.setenv("SCALEBOX_LISTEN_DSN", bouncer.direct)
    assert listen_dsn(bouncer.dsn) == bouncer.direct
    spec = load_pipeline(write_app(tmp_path / "app", "name: hint\nmodules:\n  a: {}\n", {"a/run.sh": "true\n"}))
    with connect(bouncer.dsn) as conn:
        app_id = apps.create_app(conn, spec)
        conn.commit()
        module_id = apps.module_refs(conn, app_id)["a"].id
    heard = threading.Event()
    hints: list[int] = []

    def on_hint(module: int) -> None:
        hints.append(module)
        heard.set()

    listener = Listener(listen_dsn(bouncer.dsn), on_hint).start()
    try:
        assert listener.ready.wait(10)
        hints.clear()
        heard.clear()
        with connect(bouncer.dsn) as conn:
            apps.add_tasks(conn, app_id, "a", [Message("wake")])
            conn.commit()
        assert heard.wait(10), "no NOTIFY reached the listener on the direct DSN"
    finally:
        listener.stop()
    assert module_id in hints


def test_a_listener_sent_to_an_undeclared_pooler_gives_up_listening(
    bouncer: Bouncer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nobody set SCALEBOX_DB_POOLER, so the listener gets the pooler's DSN: its connect
    recognises PgBouncer, and it ends instead of holding a LISTEN that never hears anything."""
    monkeypatch.delenv("SCALEBOX_DB_POOLER")
    monkeypatch.setattr(connection, "_REFUSE_OPTIONS", set())
    assert listen_dsn(bouncer.dsn) == bouncer.dsn
    listener = Listener(bouncer.dsn, lambda _m: None).start()
    assert listener.ready.wait(10)
    listener._thread.join(10)
    assert not listener._thread.is_alive()
    listener.stop()

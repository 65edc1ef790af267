"""How database errors reach the user: a deadlock is a refused transaction to run again, not an outage."""

from __future__ import annotations

import threading

import psycopg
import pytest

from scalebox_hpc.db.connection import translate_errors
from scalebox_hpc.errors import DatabaseError

pytestmark = pytest.mark.pg


def test_a_deadlock_says_run_it_again_not_cannot_reach(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE dl (id int PRIMARY KEY, v int); INSERT INTO dl VALUES (1, 0), (2, 0)")
    a, b = psycopg.connect(pg_dsn), psycopg.connect(pg_dsn)
    errors: list[DatabaseError] = []
    both = threading.Barrier(2)

    def cross(conn: psycopg.Connection, first: int, second: int) -> None:
        try:
            with translate_errors(pg_dsn):
                conn.execute("UPDATE dl SET v = v + 1 WHERE id = %s", (first,))
                both.wait()
                conn.execute("UPDATE dl SET v = v + 1 WHERE id = %s", (second,))
                conn.commit()
        except DatabaseError as exc:
            errors.append(exc)
            conn.rollback()

    try:
        threads = [threading.Thread(target=cross, args=(a, 1, 2)), threading.Thread(target=cross, args=(b, 2, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        a.close()
        b.close()
    [err] = errors  # PostgreSQL cancels one of the two
    assert "40P01" in str(err) and "run again" in str(err) and "cannot reach" not in str(err), err
    assert err.hint == "run the command again"

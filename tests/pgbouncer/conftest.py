"""Fixtures for the suite that runs through a real PgBouncer in transaction pooling mode.

launchers/testbed/pgbouncer.sh puts PgBouncer in front of the test-bed PostgreSQL (every
database of it) and prints SCALEBOX_TEST_PGBOUNCER_DSN (through PgBouncer) and
SCALEBOX_TEST_PGBOUNCER_DIRECT_DSN (the same server, directly). Without them the tests skip,
and fail under CI=true (tests/components.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from tests.components import need
from tests.conftest import _with_db


@dataclass(frozen=True)
class Bouncer:
    """One fresh database, reachable through PgBouncer (``dsn``) and directly (``direct``)."""

    dsn: str
    direct: str
    admin: str
    """PgBouncer's admin console (SHOW POOLS, SHOW SERVERS)."""


@pytest.fixture(scope="session")
def pgbouncer_server() -> tuple[str, str]:
    """(through PgBouncer, direct) DSNs of the test-bed's maintenance database."""
    dsn = os.environ.get("SCALEBOX_TEST_PGBOUNCER_DSN")
    if not dsn:
        need("pgbouncer", "SCALEBOX_TEST_PGBOUNCER_DSN is not set (bash launchers/testbed/pgbouncer.sh start "
                          "prints it; run-tests.sh sets it)")
    direct = os.environ.get("SCALEBOX_TEST_PGBOUNCER_DIRECT_DSN") or os.environ.get("SCALEBOX_TEST_DSN")
    if not direct:
        need("pgbouncer", "neither SCALEBOX_TEST_PGBOUNCER_DIRECT_DSN nor SCALEBOX_TEST_DSN is set")
    for label, target in (("PgBouncer", dsn), ("its backend", direct)):
        try:
            with psycopg.connect(str(target), connect_timeout=5, prepare_threshold=None):
                pass
        except psycopg.OperationalError as exc:
            need("pgbouncer", f"cannot connect to {label}: {str(exc).strip().splitlines()[-1]}")
    return str(dsn), str(direct)


@pytest.fixture
def bouncer(pgbouncer_server: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Bouncer]:
    """A fresh migrated database on PgBouncer's backend; SCALEBOX_DB_POOLER=transaction in this process."""
    from scalebox_hpc.db import schema

    through, direct = pgbouncer_server
    name = f"sbx_pgb_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(direct, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(_with_db(direct, name), row_factory=dict_row) as conn:
        schema.init(conn)  # type: ignore[arg-type]
    monkeypatch.setenv("SCALEBOX_DB_POOLER", "transaction")
    monkeypatch.delenv("SCALEBOX_LISTEN_DSN", raising=False)
    yield Bouncer(_with_db(through, name), _with_db(direct, name), _with_db(through, "pgbouncer"))
    with psycopg.connect(direct, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class Shuffler:
    """Three clients that each hold a server connection in an open transaction while ``pin``
    is active, so the next statement of a client under test runs on a server connection other
    than its last one (PgBouncer hands out idle server connections last-in first-out: with one
    idle client it would get the same one back, and every pitfall would stay hidden)."""

    def __init__(self, dsn: str) -> None:
        self.others = [psycopg.connect(dsn, connect_timeout=5, prepare_threshold=None) for _ in range(3)]

    def pin(self) -> None:
        for o in self.others:
            o.execute("SELECT 1")  # BEGIN + SELECT: the server connection stays this client's

    def release(self) -> None:
        for o in self.others:
            o.commit()

    def close(self) -> None:
        for o in self.others:
            o.close()

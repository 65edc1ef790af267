"""``queue_backend``: every conformance scenario runs once on InMemoryQueue and once on PgQueue.

The PostgreSQL side uses one database per test module, emptied before each test (every row
deleted, every id sequence restarted): a fresh database per test costs seconds on a busy server, and an empty one
is as fresh for the queue (ids restart at 1 as in InMemoryQueue; no other app's slots, hosts or
scratch entries)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from tests.conformance.backends import Backend, MemoryBackend, PgBackend
from tests.conftest import _with_db


@pytest.fixture(scope="module")
def conformance_db(pg_server: str, pg_template: str) -> Iterator[str]:
    """A database with the current schema for this test module; dropped after it."""
    name = f"sbx_c_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(pg_template)))
    yield _with_db(pg_server, name)
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _emptied(dsn: str) -> str:
    """Delete every row but the schema version and restart every id sequence, in one round trip
    (DELETE, not TRUNCATE: on these few rows it takes no file operations, and so milliseconds)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""
            DO $$
            DECLARE r record;
            BEGIN
                FOR r IN SELECT tablename FROM pg_tables WHERE schemaname = 'public'
                         AND tablename LIKE 'sbx_%' AND tablename <> 'sbx_schema_version' LOOP
                    EXECUTE format('DELETE FROM %I', r.tablename);
                END LOOP;
                FOR r IN SELECT sequencename FROM pg_sequences WHERE schemaname = 'public' LOOP
                    EXECUTE format('ALTER SEQUENCE %I RESTART', r.sequencename);
                END LOOP;
            END $$""")
    return dsn


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.pg)])
def queue_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The backend under test: ("memory", InMemoryQueue on a fake clock) or ("postgres",
    PgQueue on an emptied test database; skipped without one, failed under CI=true)."""
    if request.param == "memory":
        backend: Backend = MemoryBackend()
    else:
        backend = PgBackend(_emptied(request.getfixturevalue("conformance_db")))
    try:
        yield backend
    finally:
        backend.close()

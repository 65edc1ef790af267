"""Shared fixtures: a real PostgreSQL database per test, cloned from a migrated template."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from psycopg import sql

from tests.components import need

REPO = Path(__file__).resolve().parents[1]

# The machine is shared and noisy: hypothesis' clock-based checks (a 200 ms deadline per example,
# "input generation is slow") failed CI runs on a loaded box without finding anything. What a
# property test checks is the property; speed lives in benchmarks/.
settings.register_profile("scalebox", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("scalebox")


def _with_db(dsn: str, dbname: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**params)


@pytest.fixture(scope="session")
def pg_server() -> str:
    """DSN of the test server's maintenance database (SCALEBOX_TEST_DSN)."""
    dsn = os.environ.get("SCALEBOX_TEST_DSN")
    if not dsn:
        need("postgres", "SCALEBOX_TEST_DSN is not set (launchers/testbed/run-tests.sh sets it)")
    try:
        with psycopg.connect(dsn, connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        need("postgres", f"cannot connect to SCALEBOX_TEST_DSN: {str(exc).strip().splitlines()[-1]}")
    return str(dsn)


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> Iterator[str]:
    """A database migrated once per session, cloned by every test."""
    from scalebox_hpc.db import schema

    name = f"sbx_tpl_{os.getpid()}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(_with_db(pg_server, name), row_factory=psycopg.rows.dict_row) as conn:
        schema.init(conn)  # type: ignore[arg-type]
    yield name
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg_dsn(pg_server: str, pg_template: str) -> Iterator[str]:
    """A fresh database with the current schema, dropped after the test."""
    name = f"sbx_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(pg_template))
        )
    yield _with_db(pg_server, name)
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def empty_db(pg_server: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    name = f"sbx_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield _with_db(pg_server, name)
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def cli_env(pg_dsn: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running `scalebox` as a subprocess against the test database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SCALEBOX_"))}
    env.update({
        "SCALEBOX_DSN": pg_dsn,
        "SCALEBOX_HOME": str(tmp_path / "home"),
        "SCALEBOX_WORK_ROOT": str(tmp_path / "work"),
    })
    return env

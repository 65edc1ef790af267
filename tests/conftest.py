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


# -- the suite on several workers (pytest-xdist, `-n N --dist loadgroup`) ----------------------------
# What a test shares with others on the machine puts it in a group; xdist runs a group's tests on
# one worker, one after another (everything else is spread freely): the Slurm test-bed, the
# emulated hosts, PgBouncer, the TLS server and the second database are one machine-wide set
# (tests stop and restart parts of it); Podman tests count every container of the host; the chaos
# tests' private server has a fixed port and data directory.
_GROUP_OF_MARKER = {"slurm": "testbed", "netns": "testbed", "pgbouncer": "testbed", "pgtls": "testbed",
                    "podman": "podman"}
_GROUP_OF_FIXTURE = {"db2": "testbed", "private_pg": "private_pg", "private_server": "private_pg"}


def _group(item: pytest.Item) -> str | None:
    for marker, group in _GROUP_OF_MARKER.items():
        if item.get_closest_marker(marker) is not None:
            return group
    names = getattr(item, "fixturenames", ())
    return next((group for fixture, group in _GROUP_OF_FIXTURE.items() if fixture in names), None)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test that shares a machine-wide resource with its group (see above)."""
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under ``--dist loadgroup`` a grouped test's id carries its group, or xdist spread the
    group over workers and the test-bed's tests break each other: a pytest/xdist mismatch did
    exactly that, silently (pytest-xdist#1386). Such a test fails at once, naming the cause."""
    if (hasattr(item.config, "workerinput") and getattr(item.config.option, "loadgroup", False)
            and _group(item) is not None and "@" not in item.nodeid):
        pytest.fail("xdist did not apply this test's group (pytest-xdist#1386: this pytest and xdist do not "
                    "agree): run with SCALEBOX_TEST_WORKERS=0 (-n 0) or a pytest < 9.2", pytrace=False)


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
        # one worker at a time: the schema makes the server-wide roles (sbx_user ...) when missing,
        # and two workers making them at once collide on pg_authid
        admin.execute("SELECT pg_advisory_lock(hashtext('scalebox test template'))")
        try:
            with psycopg.connect(_with_db(pg_server, name), row_factory=psycopg.rows.dict_row) as conn:
                schema.init(conn)  # type: ignore[arg-type]
        finally:
            admin.execute("SELECT pg_advisory_unlock(hashtext('scalebox test template'))")
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

"""Roles and row-level security on a real PostgreSQL (audit F18): two database roles granted
with `scalebox db grant` share one database; each sees and changes only its own apps, from the
CLI and with plain SQL, and a viewer reads all."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.helpers import write_app

pytestmark = pytest.mark.pg

APP = """
name: mine
parameters: {start_task: go}
modules:
  a:
    arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}
"""


def _ids(listing: str) -> list[str]:
    return [line.split()[0] for line in listing.splitlines()[1:] if line.strip()]


def _as(dsn: str, role: str) -> str:
    params = conninfo_to_dict(dsn)
    params["user"] = role
    return make_conninfo(**params)  # type: ignore[arg-type]


@pytest.fixture
def roles(pg_dsn: str) -> Iterator[tuple[str, str, str]]:
    """Three fresh login roles (the test server trusts TCP logins): two users and a viewer."""
    names = tuple(f"sbx_t_{kind}_{uuid.uuid4().hex[:6]}" for kind in ("a", "b", "v"))
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    try:
        yield names  # type: ignore[misc]
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            for name in names:
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _sbx(dsn: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SCALEBOX_DSN": dsn}
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def test_each_role_sees_and_changes_only_its_own_apps(pg_dsn: str, roles: tuple[str, str, str],
                                                       tmp_path: Path) -> None:
    alice, bob, viewer = roles
    _sbx(pg_dsn, "db", "grant", alice)
    _sbx(pg_dsn, "db", "grant", bob)
    _sbx(pg_dsn, "db", "grant", viewer, "--viewer")
    a_dsn, b_dsn, v_dsn = (_as(pg_dsn, r) for r in roles)
    app = write_app(tmp_path / "app", APP, {"a/run.sh": "echo hi\n"})
    a_id = _sbx(a_dsn, "app", "create", str(app)).stdout.strip()
    b_id = _sbx(b_dsn, "app", "create", str(app)).stdout.strip()
    _sbx(a_dsn, "task", "add", "--app", a_id, "--", "more")

    # the CLI: bob cannot see, cancel or read alice's app, and his default app is his own
    assert _ids(_sbx(b_dsn, "app", "list").stdout) == [b_id]
    for args in (("app", "show", a_id), ("app", "cancel", a_id), ("task", "list", "--app", a_id),
                 ("task", "add", "--app", a_id, "--", "x"), ("semaphore", "create", "--app", a_id, "s", "9")):
        refused = _sbx(b_dsn, *args, check=False)
        assert refused.returncode != 0 and "not found" in refused.stderr.lower(), (args, refused.stderr)
    _sbx(b_dsn, "app", "cancel")  # the default: bob's newest app, his own
    with psycopg.connect(pg_dsn) as admin:
        rows = dict(admin.execute("SELECT id::text, cancelled FROM sbx_apps WHERE id IN (%s, %s)",
                                  (int(a_id), int(b_id))).fetchall())
    assert rows == {a_id: False, b_id: True}

    # plain SQL as bob: nothing of alice's to read or change
    with psycopg.connect(b_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM sbx_tasks WHERE app_id = %s", (int(a_id),)).fetchone() == (0,)
        assert conn.execute("UPDATE sbx_apps SET status = 'FINISHED' WHERE id = %s", (int(a_id),)).rowcount == 0
        assert conn.execute("DELETE FROM sbx_tasks WHERE app_id = %s", (int(a_id),)).rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # no app in someone else's name
            conn.execute("INSERT INTO sbx_apps (name, spec, owner) VALUES ('x', '{}', %s)", (alice,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # and no DDL
            conn.execute("DROP TABLE sbx_tasks CASCADE")

    # alice still has all of hers, and runs it to the end as herself
    _sbx(a_dsn, "run", "--app", a_id, check=False)
    with psycopg.connect(a_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM sbx_tasks WHERE app_id = %s AND status = 0",
                            (int(a_id),)).fetchone() == (2,)
    # the viewer reads both, changes neither
    assert _ids(_sbx(v_dsn, "app", "list").stdout) == [a_id, b_id]
    with psycopg.connect(v_dsn, autocommit=True) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("UPDATE sbx_apps SET status = 'PAUSED'")

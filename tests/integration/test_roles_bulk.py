"""A bulk submit (`task add --file`, COPY through a temporary table, the locality trigger's
sbx.plain_modules listing of 0025) by unprivileged roles: it works for one's own app, and row
security still refuses another's app, by the CLI and by plain SQL with the listing set."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests.helpers import write_app
from tests.integration.test_roles import APP, _as, _sbx, roles  # noqa: F401  (roles: a fixture)

pytestmark = pytest.mark.pg


def test_bulk_submit_as_a_user_stays_within_own_apps(pg_dsn: str, roles: tuple[str, str, str],  # noqa: F811
                                                      tmp_path: Path) -> None:
    alice, bob, _ = roles
    _sbx(pg_dsn, "db", "grant", alice)
    _sbx(pg_dsn, "db", "grant", bob)
    a_dsn, b_dsn = _as(pg_dsn, alice), _as(pg_dsn, bob)
    app = write_app(tmp_path / "app", APP, {"a/run.sh": "echo hi\n"})
    a_id = _sbx(a_dsn, "app", "create", str(app)).stdout.strip()
    bodies = tmp_path / "bodies.txt"
    bodies.write_text("".join(f"b{i}\n" for i in range(300)), encoding="utf-8")

    assert _sbx(a_dsn, "task", "add", "--app", a_id, "--file", str(bodies)).stdout.strip() == "added 300 task(s)"
    refused = _sbx(b_dsn, "task", "add", "--app", a_id, "--file", str(bodies), check=False)
    assert refused.returncode != 0 and "added" not in refused.stdout

    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT id FROM sbx_modules WHERE app_id = %s", (int(a_id),)).fetchone()
    assert row is not None
    module_id = int(row[0])
    with psycopg.connect(b_dsn) as conn:
        conn.execute("SELECT set_config('sbx.plain_modules', %s, true)", (str(module_id),))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) "
                         "SELECT %s, %s, 'x' || g FROM generate_series(1, 5) g", (int(a_id), module_id))
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM sbx_tasks WHERE app_id = %s", (int(a_id),)).fetchone()
    assert row is not None and row[0] == 300 + 1  # the bodies and the app's start task

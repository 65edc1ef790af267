"""The query loader and DSN handling."""

from __future__ import annotations

import pytest

from scalebox_hpc.db import sql
from scalebox_hpc.db.connection import configured_dsn, redact


def test_parse_queries_splits_on_name_lines() -> None:
    text = "-- header\n\n-- name: one\n-- what it does\nSELECT 1;\n\n-- name: two\nSELECT 2\n"
    assert sql.parse_queries(text) == {"one": "-- what it does\nSELECT 1", "two": "SELECT 2"}


def test_shipped_queries_and_migrations_load() -> None:
    names = set(sql.queries())
    assert {"claim_tasks", "complete_task", "insert_messages", "heartbeat_slot", "release_tasks"} <= names
    versions = [v for v, _, _ in sql.migrations()]
    assert versions == sorted(versions) and versions[0] == 1
    assert sql.schema_version() == versions[-1]
    with pytest.raises(KeyError):
        sql.query("nope")


@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://u:pw@db.example:5433/sbx", "postgresql://u@db.example:5433/sbx"),
    ("host=/tmp/s dbname=x user=me password=pw", "postgresql://me@/tmp/s:5432/x"),
    ("", "from PG* variables"),
    ("not a dsn ===", "<unparsable DSN>"),
])
def test_redact_never_shows_passwords(dsn: str, shown: str) -> None:
    assert redact(dsn) == shown
    assert "pw" not in redact(dsn)


def test_configured_dsn_precedence() -> None:
    assert configured_dsn({"SCALEBOX_DSN": "x", "PGHOST": "h"}) == "x"
    assert configured_dsn({"PGHOST": "h"}) == ""
    assert configured_dsn({}) is None

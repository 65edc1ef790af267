"""Loads the ``.sql`` files: ``QUERIES[name]`` for every ``-- name: NAME`` block of queries.sql."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import LiteralString

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def sql_dir() -> Path:
    """The directory holding schema.sql, queries.sql and migrations/ (wheel or source tree)."""
    packaged = Path(__file__).resolve().parent.parent / "sql"
    if (packaged / "schema.sql").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


def parse_queries(text: str) -> dict[str, str]:
    """Split a queries file into {name: sql}; each block runs to the next ``-- name:`` line."""
    parts = _NAME.split(text)
    return {name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=True)}


@functools.cache
def queries() -> dict[str, str]:
    """All named queries."""
    return parse_queries((sql_dir() / "queries.sql").read_text(encoding="utf-8"))


def query(name: str) -> LiteralString:
    """One named query; KeyError names the missing query. Typed as a literal: the text is the
    project's own file, never built from data, so the type checker refuses a caller that
    concatenates a value into it (values go in as parameters)."""
    return queries()[name]  # mypy treats LiteralString as str; pyright checks the callers


def schema_sql() -> str:
    """The full current schema."""
    return (sql_dir() / "schema.sql").read_text(encoding="utf-8")


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, sql) for every ``migrations/NNNN_name.sql``, in order."""
    found = []
    for path in sorted((sql_dir() / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql")):
        found.append((int(path.name[:4]), path.name, path.read_text(encoding="utf-8")))
    return found


def schema_version() -> int:
    """The schema version this code expects: the newest migration."""
    return max(v for v, _, _ in migrations())

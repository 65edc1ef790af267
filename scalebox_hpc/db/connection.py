"""Connections: DSN resolution, password redaction, psycopg error translation."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row

from scalebox_hpc.errors import DatabaseError

Connection = psycopg.Connection[DictRow]

_PG_VARS = ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


def configured_dsn(environ: Mapping[str, str] | None = None) -> str | None:
    """The DSN the user configured: SCALEBOX_DSN, else "" when PG* variables are set, else None."""
    env = os.environ if environ is None else environ
    if env.get("SCALEBOX_DSN"):
        return env["SCALEBOX_DSN"]
    if any(env.get(v) for v in _PG_VARS):
        return ""  # libpq reads the PG* variables itself
    return None


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    if not dsn:
        return "from PG* variables"
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    params.pop("password", None)
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or "5432")
    user = str(params.get("user") or "")
    db = str(params.get("dbname") or "")
    return f"postgresql://{user + '@' if user else ''}{host}:{port}/{db}"


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


@contextlib.contextmanager
def translate_errors(dsn: str) -> Iterator[None]:
    """Turn psycopg connection/operational errors into DatabaseError naming the redacted DSN."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise DatabaseError(f"cannot reach PostgreSQL: {_one_line(exc)}", dsn=redact(dsn)) from exc
    except psycopg.DataError as exc:
        from scalebox_hpc.errors import InvalidValueError

        raise InvalidValueError(f"invalid value: {exc.diag.message_primary or _one_line(exc)}") from exc
    except psycopg.errors.UndefinedTable as exc:
        from scalebox_hpc.errors import SchemaError

        raise SchemaError(f"schema missing: {_one_line(exc)}", dsn=redact(dsn)) from exc


def connect(dsn: str, *, autocommit: bool = False, timeout: float = 10.0, **kwargs: Any) -> Connection:
    """Open one connection with dict rows; errors become DatabaseError."""
    with translate_errors(dsn):
        return psycopg.connect(
            dsn,
            autocommit=autocommit,
            row_factory=dict_row,
            connect_timeout=max(1, int(timeout)),
            application_name="scalebox",
            **kwargs,
        )

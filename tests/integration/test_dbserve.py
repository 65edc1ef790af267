"""``scalebox db serve`` for real: the embedded PostgreSQL served on TCP + TLS here (the CLI
through its service file, a second OS user shut out), and as a Slurm job on the test-bed with
app-primes' stages as Slurm jobs against it, across a forced hand-over mid-run.

Everything through the ``scalebox`` CLI as a subprocess, with neither SCALEBOX_DSN nor PG*
set: the service file is the only way the CLI and the stage jobs find the database.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from scalebox_hpc.db import sql
from tests import helpers
from tests.components import need, slurm_available
from tests.other_user import as_other, other_uid
from tests.slurmbed import cancel, jobs_named, login_env, shared_dir

REPO = Path(__file__).resolve().parents[2]
FAST = {"max_idle_polls": 4, "sleep_interval_seconds": 0.5, "heartbeat_seconds": 2}


def sbx(env: dict[str, str], *args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"scalebox {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def sbx_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(sbx(env, *args, "--json").stdout)


def connect_error(dsn: str, user: str | None = None) -> str:
    """The last line of the error connecting with ``dsn`` (as root, or as the other user); '' if it connects."""
    code = ("import sys, psycopg\ntry:\n    psycopg.connect(sys.argv[1], connect_timeout=5).close()\n"
            "except psycopg.Error as e:\n    print(str(e).strip().splitlines()[-1])\n")
    argv = [sys.executable, "-c", code, dsn]
    proc = as_other(*argv, check=False) if user else subprocess.run(argv, capture_output=True, text=True,
                                                                    timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture
def shared() -> Iterator[Path]:
    with shared_dir("sbx-dbserve-") as path:
        yield path


def test_serve_here_serves_the_cli_and_shuts_out_another_user(shared: Path) -> None:
    other_uid()  # root and sbxtest, or skipped (failed under CI)
    env = login_env(shared)
    service = shared / "home" / "service"
    out = sbx(env, "db", "serve", "--here").stdout
    try:
        assert "generation 0" in out, out
        assert "created" in sbx(env, "db", "init").stdout
        status = sbx_json(env, "db", "status")
        assert status["kind"] == "served" and status["version"] == sql.schema_version(), status
        served = status["served"]
        assert (served["state"], served["generation"], served["job_id"]) == ("up", 0, None), served
        assert sbx_json(env, "app", "list") == []
        assert service.stat().st_mode & 0o777 == 0o700
        for name in ("service.json", "pgpass", "ca.key", "server.key"):
            assert (service / name).stat().st_mode & 0o777 == 0o600, name
        info = json.loads((service / "service.json").read_text())
        assert "password" not in (service / "service.json").read_text()
        base = f"host={info['host']} port={info['port']} dbname=scalebox user={info['user']}"
        ca_copy = shared / "ca.crt"  # what a second user might have: the CA, public
        shutil.copy(service / "ca.crt", ca_copy)
        ca_copy.chmod(0o644)
        verified = f"{base} sslmode=verify-full sslrootcert={ca_copy}"

        # the owner: through the service file's DSN only; plaintext refused even with the password
        assert connect_error(f"{verified} passfile={service / 'pgpass'}") == ""
        assert "TLS connections only" in connect_error(f"{base} sslmode=disable passfile={service / 'pgpass'}")
        assert "does not match host name" in connect_error(
            f"host=127.0.0.1 port={info['port']} dbname=scalebox user={info['user']} sslmode=verify-full "
            f"sslrootcert={ca_copy} passfile={service / 'pgpass'}")

        # the other user: cannot read the owner's files, nor get in with the CA alone
        assert as_other("cat", str(service / "pgpass"), check=False).returncode != 0
        assert as_other("cat", str(service / "service.json"), check=False).returncode != 0
        their = as_other("env", f"SCALEBOX_HOME={shared / 'home'}", sys.executable, "-m", "scalebox_hpc",
                         "db", "status", check=False)
        assert their.returncode == 1 and "service file" in their.stderr, their
        assert "no password supplied" in connect_error(verified, user="other")
        assert "no password supplied" in connect_error(f"{verified} passfile={service / 'pgpass'}", user="other")
        assert "password authentication failed" in connect_error(f"{verified} password=guess", user="other")
    finally:
        stopped = sbx(env, "db", "stop", check=False)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped", stopped
    assert json.loads((service / "service.json").read_text())["state"] == "stopped"
    assert "accepting TCP/IP connections" in connect_error(f"{verified} passfile={service / 'pgpass'}")


@pytest.fixture
def slurm() -> None:
    reason = slurm_available()
    if reason:
        need("slurm", reason)


def primes_app(shared: Path, calc_seconds: int) -> Path:
    """examples/app-primes with fast polling, calc on 2 nodes, each calc task ``calc_seconds`` longer."""
    app_dir = shared / "app-primes"
    shutil.copytree(REPO / "examples/app-primes", app_dir)
    spec = yaml.safe_load((app_dir / "app.yaml").read_text())
    for module in spec["modules"].values():
        module["arguments"] = dict(FAST)
    spec["modules"]["calc"]["slurm"] = {"nodes": 2}
    spec["slurm"] = {"time": "10"}
    (app_dir / "app.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    calc = app_dir / "calc" / "run.sh"
    calc.write_text(calc.read_text().replace("\ncount=", f"\nsleep {calc_seconds}\ncount=", 1))
    subprocess.run(["chmod", "-R", "a+rX", str(app_dir)], check=True)
    return app_dir / "app.yaml"


@pytest.mark.slurm
def test_app_primes_as_stage_jobs_over_a_served_slurm_job_across_a_hand_over(shared: Path, slurm: None) -> None:
    env = login_env(shared)
    before = set(jobs_named("sbx-db"))
    try:
        out = sbx(env, "db", "serve", "--slurm", "--time", "15", "--handover-before", "2m", "--wait", "180").stdout
        first = sbx_json(env, "db", "status")["served"]
        assert first["job_id"] and first["generation"] == 0 and first["state"] == "up", (out, first)
        assert first["node"] in {f"node{i}" for i in range(1, 5)}, first
        sbx(env, "db", "init")
        pipeline = primes_app(shared, calc_seconds=4)

        # the README's walk-through: doctor first, all green, its probe job reaching the served
        # database from a compute node through the same service file
        checks = json.loads(sbx(env, "doctor", "--json", "--probe-timeout", "240", str(pipeline), timeout=300).stdout)
        failed = [c for c in checks if c["status"] == "fail"]
        assert not failed, failed
        probe_db = [c for c in checks if c["id"] == "probe.db"]
        assert [c["status"] for c in probe_db] == ["pass"], probe_db
        assert probe_db[0]["summary"].rsplit(" on ", 1)[1] in {f"node{i}" for i in range(1, 5)}, probe_db

        app = json.loads(sbx(env, "submit", str(pipeline), "--json").stdout)["app_id"]

        def calc_half_done() -> bool:
            calc = next(m for m in sbx_json(env, "status", str(app))["modules"] if m["module"] == "calc")
            return 1 <= calc["ok"] < calc["total"] == 10

        helpers.wait_until(calc_half_done, 150, "some calc tasks done, not all", 1)
        sbx(env, "db", "serve", "--handover-now", "--wait", "180")
        second = sbx_json(env, "db", "status")["served"]
        assert second["generation"] == 1 and second["job_id"] != first["job_id"] and second["state"] == "up", second
        assert second["port"] != first["port"]  # a new server: clients had to re-read the service file

        def finished() -> dict[str, Any] | None:
            status = sbx_json(env, "status", str(app))
            return status if status["app"]["status"] == "FINISHED" else None

        status = helpers.wait_until(finished, 240, "app-primes to finish after the hand-over", 2)
        assert status["app"]["result"] == "Result is 1229"
        counts = {m["module"]: (m["total"], m["ok"], m["failed"]) for m in status["modules"]}
        assert counts == {"scatter": (1, 1, 0), "calc": (10, 10, 0), "gather": (10, 10, 0)}, counts
        rows = sbx_json(env, "task", "list", "--app", str(app), "-n", "1000")
        assert len(rows) == 21 and {t["status"] for t in rows} == {0}
        bodies = sorted(t["body"] for t in rows if t["module"] == "calc")
        assert bodies == sorted({t["body"] for t in rows if t["module"] == "calc"}) and len(bodies) == 10

        stopped = sbx(env, "db", "stop")
        assert f"Slurm job {second['job_id']}" in stopped.stdout
        assert sbx_json(env, "db", "status")["served"]["state"] == "stopped"
        log = (shared / "home" / "service" / f"db-{first['job_id']}.log").read_text()
        assert "hand-over: generation 0 stopped" in log, log
    finally:
        cancel(sorted(set(jobs_named("sbx-db")) - before))


def test_served_dsn_follows_the_service_file_through_connect(shared: Path) -> None:
    """A DSN taken from the service file of generation 0 still connects after a restart on
    another port (generation 1): connect() re-reads the service file."""
    env = login_env(shared)
    sbx(env, "db", "serve", "--here")
    try:
        old = json.loads((shared / "home" / "service" / "service.json").read_text())
        sbx(env, "db", "stop")
        sbx(env, "db", "serve", "--here")
        new = json.loads((shared / "home" / "service" / "service.json").read_text())
        assert new["generation"] == 1 and new["port"] != old["port"]
        dsn = psycopg.conninfo.make_conninfo(host=old["host"], port=str(old["port"]), dbname="scalebox",
                                             user=old["user"], sslmode="verify-full", sslrootcert=old["ca"],
                                             passfile=old["passfile"])
        code = ("import sys\nfrom scalebox_hpc.db.connection import connect\n"
                "with connect(sys.argv[1]) as c:\n    print(c.execute('SELECT 1 AS one').fetchone()['one'])\n")
        proc = subprocess.run([sys.executable, "-c", code, dsn], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.stdout.strip() == "1", proc.stderr
        assert "accepting TCP/IP connections" in connect_error(dsn)  # libpq alone: the old port is gone
    finally:
        sbx(env, "db", "stop", check=False)


@pytest.mark.slurm
def test_the_job_hands_over_by_itself_before_its_walltime(shared: Path, slurm: None) -> None:
    """--time 2 (minutes) and --handover-before 100s: the first job hands over about 20 s after
    it starts, unasked; the successor (--exclusive: not beside the old job) serves generation 1
    from another node, off the same data dir."""
    env = login_env(shared)
    before = set(jobs_named("sbx-db"))
    try:
        sbx(env, "db", "serve", "--slurm", "--time", "2", "--handover-before", "100s", "--sbatch-arg=--exclusive",
            "--wait", "180")
        first = sbx_json(env, "db", "status")["served"]
        sbx(env, "db", "init")

        def next_generation() -> dict[str, Any] | None:
            served: dict[str, Any] = sbx_json(env, "db", "status")["served"]
            return served if served["generation"] == 1 and served["state"] == "up" else None

        second = helpers.wait_until(next_generation, 150, "the hand-over before the walltime", 2)
        assert second["job_id"] != first["job_id"] and second["node"] != first["node"], (first, second)
        assert sbx_json(env, "db", "status")["version"] == sql.schema_version()  # the same data dir
        log = (shared / "home" / "service" / f"db-{first['job_id']}.log").read_text()
        assert "hand-over: generation 0 stopped" in log, log
        sbx(env, "db", "stop")
    finally:
        cancel(sorted(set(jobs_named("sbx-db")) - before))

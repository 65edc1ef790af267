"""Two unprivileged users sharing one PostgreSQL with TLS (verify-full, a site CA) and scram-sha-256
passwords from their own pgpass files (launchers/testbed/postgres-tls.sh): root as database user
sbx_alice, the OS user sbxtest as sbx_bob. Alice runs a pipeline end to end over TLS; Bob cannot
read, change, cancel or scale it from the CLI or with plain SQL, nor log in as Alice; and no
password reaches Alice's task, its files or the output. Each has a launcher role too
(sbx_alice_launcher, sbx_bob_launcher: `scalebox db grant USER --launcher`, migration 0018):
Alice's launcher role runs her app with `scalebox launcher`; with psql as his launcher role Bob
reads no table and no function of his touches her app."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.components import need
from tests.helpers import write_app

pytestmark = pytest.mark.pgtls

ALICE_PW = "alice-S3cret-tls"  # launchers/testbed/postgres-tls.sh's test passwords
BOB_PW = "bob-S3cret-tls"
ALICE_LAUNCHER_PW = "alice-launcher-S3cret-tls"

APP = """
name: tls-e2e
parameters: {start_task: "3"}
modules:
  count:
    sink_modules: [square]
    arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}
  square:
    arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}
"""
SCRIPTS = {
    "count/run.sh": 'i=1; while [ "$i" -le "$1" ]; do scalebox task add -- "$i"; i=$((i + 1)); done; env\n',
    "square/run.sh": 'echo "$(( $1 * $1 ))"; scalebox semaphore create sq 1 >/dev/null || exit 3\n',
}


@dataclass(frozen=True)
class Server:
    root: Path
    port: int
    db: str

    def dsn(self, role: str, osuser: str) -> str:
        ca = self.root / "users" / osuser / "root.crt"
        return f"postgresql://{role}@127.0.0.1:{self.port}/{self.db}?sslmode=verify-full&sslrootcert={ca}"

    def env(self, role: str, osuser: str) -> dict[str, str]:
        return {"SCALEBOX_DSN": self.dsn(role, osuser), "PGPASSFILE": str(self.root / "users" / osuser / "pgpass")}

    @property
    def admin(self) -> str:
        return f"host={self.root / 'run'} port={self.port} user=postgres dbname={self.db}"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    root = os.environ.get("SCALEBOX_TEST_PGTLS_DIR")
    if not root or not (Path(root) / "run").is_dir():
        need("pgtls", "SCALEBOX_TEST_PGTLS_DIR is not set (bash launchers/testbed/postgres-tls.sh start)")
    try:
        pwd.getpwnam("sbxtest")
    except KeyError:
        need("pgtls", "the OS user sbxtest does not exist (launchers/testbed/postgres-tls.sh start makes it)")
    reach = subprocess.run(["runuser", "-u", "sbxtest", "--", sys.executable, "-c", "import scalebox_hpc"],
                           capture_output=True, text=True, timeout=60, cwd="/tmp")
    if reach.returncode != 0:
        need("pgtls", f"sbxtest cannot run {sys.executable} with scalebox_hpc ({reach.stderr.strip()[-200:]}): "
                      "launchers/testbed/postgres-tls.sh start makes the checkout reachable")
    port = 55435
    db = f"sbxsec_{uuid.uuid4().hex[:8]}"
    maintenance = f"host={Path(str(root)) / 'run'} port={port} user=postgres dbname=postgres"
    try:
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    except psycopg.OperationalError as exc:
        need("pgtls", f"cannot reach the TLS server's admin socket: {str(exc).strip().splitlines()[-1]}")
    srv = Server(Path(str(root)), port, db)
    admin_env = {"SCALEBOX_DSN": srv.admin}
    for args in (("db", "init"), ("db", "grant", "sbx_alice"), ("db", "grant", "sbx_bob"),
                 ("db", "grant", "sbx_alice", "--launcher"), ("db", "grant", "sbx_bob", "--launcher")):
        _run(admin_env, *args)
    try:
        yield srv
    finally:
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


def _run(env: dict[str, str], *args: str, osuser: str = "root", check: bool = True,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SCALEBOX_DSN"))}
    full = {**base, **env, "SCALEBOX_DSN_PASSWORD_OK": "1"}
    argv = [sys.executable, "-m", "scalebox_hpc", *args]
    if osuser != "root":
        keep = ",".join(sorted(full))
        argv = ["runuser", "-u", osuser, f"--whitelist-environment={keep}", "--", *argv]
        full["HOME"] = "/tmp"
    proc = subprocess.run(argv, env=full, capture_output=True, text=True, timeout=180, cwd=cwd or "/tmp")
    if check:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def test_two_users_over_tls_each_only_with_their_own_apps(server: Server, tmp_path: Path) -> None:
    alice = server.env("sbx_alice", "root")
    bob = server.env("sbx_bob", "sbxtest")
    app = write_app(tmp_path / "app", APP, SCRIPTS)
    work = tmp_path / "work"
    ran = _run({**alice, "SCALEBOX_WORK_ROOT": str(work)}, "run", str(app), check=False)
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    with psycopg.connect(server.admin) as conn:
        [(app_id, owner)] = conn.execute("SELECT id, owner FROM sbx_apps").fetchall()
        squares = sorted(int(r[0]) for r in conn.execute(
            "SELECT e.stdout FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id JOIN sbx_modules m"
            " ON m.id = t.module_id WHERE m.name = 'square' AND e.status = 0").fetchall())
        outputs = [r[0] + r[1] for r in conn.execute("SELECT stdout, stderr FROM sbx_task_execs").fetchall()]
        before = conn.execute("SELECT status, cancelled FROM sbx_apps WHERE id = %s", (app_id,)).fetchone()
    assert owner == "sbx_alice" and squares == [1, 4, 9]
    # no password anywhere a task could put it or read it: its output, its files, the run's output
    for text in [*outputs, ran.stdout, ran.stderr]:
        assert ALICE_PW not in text and BOB_PW not in text
    for path in work.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert ALICE_PW.encode() not in path.read_bytes(), path

    # Bob, as the OS user sbxtest with his own pgpass: none of it, from the CLI
    listed = _run(bob, "app", "list", osuser="sbxtest")
    assert str(app_id) not in [line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip()]
    for args in (("app", "show", str(app_id)), ("app", "cancel", str(app_id)), ("app", "pause", str(app_id)),
                 ("task", "list", "--app", str(app_id)), ("autoscale", "--app", str(app_id)),
                 ("variable", "set", "--app", str(app_id), "x", "y")):
        refused = _run(bob, *args, osuser="sbxtest", check=False)
        assert refused.returncode != 0 and "not found" in refused.stderr.lower(), (args, refused.stderr)
    scaled = _run(bob, "autoscale", osuser="sbxtest")  # without --app: his own apps only, i.e. none
    assert f"app {app_id}" not in scaled.stdout, scaled.stdout

    # ... nor with psql as sbx_bob over TLS
    psql = ["psql", "-X", "-w", "-tA", server.dsn("sbx_bob", "sbxtest"), "-c"]
    bob_env = {**os.environ, "PGPASSFILE": bob["PGPASSFILE"], "HOME": "/tmp"}
    for statement, expected in (("SELECT count(*) FROM sbx_tasks", "0"), ("SELECT count(*) FROM sbx_task_execs", "0"),
                                (f"UPDATE sbx_apps SET status = 'FINISHED' WHERE id = {app_id}", "UPDATE 0")):
        got = subprocess.run(["runuser", "-u", "sbxtest", "--", *psql, statement], env=bob_env,
                             capture_output=True, text=True, timeout=60)
        assert got.stdout.strip() == expected, (statement, got.stdout, got.stderr)

    # ... nor as Alice: her pgpass is hers (0600), and without the password TLS + SCRAM refuses
    peek = subprocess.run(["runuser", "-u", "sbxtest", "--", "cat", alice["PGPASSFILE"]], capture_output=True,
                          text=True, timeout=30)
    assert peek.returncode != 0 and ALICE_PW not in peek.stdout
    stolen = _run({"SCALEBOX_DSN": server.dsn("sbx_alice", "sbxtest"), "PGPASSFILE": bob["PGPASSFILE"]},
                  "app", "list", osuser="sbxtest", check=False)
    assert stolen.returncode != 0 and "password" in stolen.stderr.lower(), stolen.stderr
    assert ALICE_PW not in stolen.stderr and BOB_PW not in stolen.stderr
    with psycopg.connect(server.admin) as conn:
        after = conn.execute("SELECT status, cancelled FROM sbx_apps WHERE id = %s", (app_id,)).fetchone()
    assert after == before and before is not None and not before[1]


def test_a_connection_without_tls_is_refused(server: Server) -> None:
    plain = server.dsn("sbx_alice", "root").replace("sslmode=verify-full", "sslmode=disable")
    refused = _run({"SCALEBOX_DSN": plain, "PGPASSFILE": server.env("sbx_alice", "root")["PGPASSFILE"]},
                   "app", "list", check=False)
    assert refused.returncode != 0 and "no encryption" in refused.stderr, refused.stderr
    assert ALICE_PW not in refused.stderr


def test_launcher_roles_over_tls(server: Server, tmp_path: Path) -> None:
    """Alice's launcher role (its password in her pgpass) runs her app over verify-full; Bob, as
    sbxtest with psql as his launcher role, reads no table and is refused every queue function
    on her app; he cannot log in as her launcher role either."""
    alice = server.env("sbx_alice", "root")
    app = write_app(tmp_path / "app", APP, SCRIPTS)
    app_id = _run(alice, "app", "create", str(app)).stdout.strip()
    work = tmp_path / "work"
    ran = _run({**server.env("sbx_alice_launcher", "root"), "SCALEBOX_WORK_ROOT": str(work)},
               "launcher", "--app", app_id, check=False)
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    with psycopg.connect(server.admin) as conn:
        squares = sorted(int(r[0]) for r in conn.execute(
            "SELECT e.stdout FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id JOIN sbx_modules m"
            " ON m.id = t.module_id WHERE m.name = 'square' AND e.status = 0 AND t.app_id = %s",
            (int(app_id),)).fetchall())
        outputs = [r[0] + r[1] for r in conn.execute(
            "SELECT e.stdout, e.stderr FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id"
            " WHERE t.app_id = %s", (int(app_id),)).fetchall()]
        before = conn.execute("SELECT count(*), sum(status) FROM sbx_tasks WHERE app_id = %s",
                              (int(app_id),)).fetchone()
    assert squares == [1, 4, 9]
    for text in [*outputs, ran.stdout, ran.stderr]:
        assert ALICE_PW not in text and ALICE_LAUNCHER_PW not in text

    bob_launcher = server.dsn("sbx_bob_launcher", "sbxtest")
    bob_env = {**os.environ, "PGPASSFILE": server.env("sbx_bob", "sbxtest")["PGPASSFILE"], "HOME": "/tmp"}

    def psql(dsn: str, statement: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "sbxtest", "--", "psql", "-X", "-w", "-tA", dsn, "-c", statement],
                              env=bob_env, capture_output=True, text=True, timeout=60)

    for table in ("sbx_apps", "sbx_tasks", "sbx_task_execs", "sbx_variables", "sbx_launchers", "sbx_scratch"):
        got = psql(bob_launcher, f"SELECT count(*) FROM {table}")
        assert got.returncode != 0 and "permission denied" in got.stderr, (table, got.stdout, got.stderr)
    for statement in (f"SELECT * FROM sbx_l_modules_v1({app_id})", f"SELECT * FROM sbx_l_variable_list_v1({app_id})",
                      f"SELECT sbx_l_variable_set_v1({app_id}, 'x', 'y')",
                      f"SELECT * FROM sbx_l_semaphore_add_v1({app_id}, 'sq', 5)"):
        got = psql(bob_launcher, statement)
        assert got.returncode != 0 and "is not an app of sbx_bob" in got.stderr, (statement, got.stdout, got.stderr)
    got = psql(bob_launcher, f"SELECT sbx_l_app_exists_v1({app_id}), count(*) FROM sbx_l_recover_v1()")
    assert got.stdout.strip() == "f|0", (got.stdout, got.stderr)
    stolen = psql(server.dsn("sbx_alice_launcher", "sbxtest"), "SELECT 1")
    assert stolen.returncode != 0 and "password" in stolen.stderr.lower(), stolen.stderr
    with psycopg.connect(server.admin) as conn:
        after = conn.execute("SELECT count(*), sum(status) FROM sbx_tasks WHERE app_id = %s",
                             (int(app_id),)).fetchone()
        variables = conn.execute("SELECT count(*) FROM sbx_variables WHERE app_id = %s", (int(app_id),)).fetchone()
    assert after == before and variables == (0,)

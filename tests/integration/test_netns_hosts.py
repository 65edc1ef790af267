"""Location-aware dispatch and app-copy across emulated hosts with a network between them.

Three network namespaces (launchers/testbed/netns.sh: sbx-hI at 10.77.0.(10+I) on the bridge
sbxbr0, the head node 10.77.0.1) each run a real ``scalebox launcher`` subprocess, started the
way a user would on a node: its own hostname (UTS namespace; the launcher takes its host name
from it), its own address and loopback, its own scratch directory (``SCALEBOX_LOCAL_SCRATCH``
with ``${HOST}``), and PostgreSQL reached over the bridge at 10.77.0.1 (postgres.sh listens
there when the bridge exists). The test itself talks to the same database on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import psycopg
import pytest

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.models import Message
from tests.components import need, netns_available, netns_hosts
from tests.helpers import write_app

pytestmark = [pytest.mark.pg, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
HEAD = "10.77.0.1"

APP = """
name: netns-loc
modules:
  use:
    slots: [".*:2"]
    arguments: {{locality_wait_seconds: {wait}, heartbeat_seconds: 2, sleep_interval_seconds: 0.2,
                 slot_options: [always_running]}}
"""
# where the task ran, and whether its input (the body: a key of the scratch index) was in
# this host's own scratch
RUN = """
where=remote
[ -f "$LOCAL_SCRATCH/$1" ] && where=local
echo "$(hostname) $where"
sleep 0.1
"""


@dataclass(frozen=True)
class Host:
    """One emulated host: its network namespace, its host name and its address."""

    ns: str
    name: str
    ip: str

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` run inside the namespace with the host name set (one exec chain: the PID is cmd's)."""
        return ["nsenter", f"--net=/run/netns/{self.ns}", "unshare", "--uts",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *cmd]


@pytest.fixture(scope="module")
def hosts() -> list[Host]:
    names = netns_hosts()
    if len(names) < 3:
        need("netns", f"3 emulated hosts needed, SCALEBOX_TEST_NETNS_HOSTS names {len(names)}")
    reason = netns_available(names[:3])
    if reason:
        need("netns", reason)
    out = []
    for ns in names[:3]:
        index = int(ns.rsplit("h", 1)[1])
        out.append(Host(ns=ns, name=f"h{index}", ip=f"10.77.0.{10 + index}"))
    return out


def over_bridge(dsn: str) -> str:
    """The same database as seen from the emulated hosts: the head node's bridge address."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    user = quote(str(params.get("user") or "postgres"))
    return f"postgresql://{user}@{HEAD}:{params.get('port') or 5432}/{quote(str(params['dbname']))}"


@pytest.fixture(scope="module")
def head_reachable(pg_server: str, hosts: list[Host]) -> None:
    """PostgreSQL answers on 10.77.0.1 from inside a namespace (else: skip, or fail under CI)."""
    probe = "import psycopg, sys; psycopg.connect(sys.argv[1], connect_timeout=5).close()"
    try:
        proc = subprocess.run(hosts[0].argv(sys.executable, "-c", probe, over_bridge(pg_server)),
                              capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        need("netns", f"connecting from {hosts[0].ns} to PostgreSQL at {HEAD} timed out")
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["?"]
        last = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1])
        need("netns", f"PostgreSQL not reachable from {hosts[0].ns} at {HEAD}: {last} "
                      "(launchers/testbed/postgres.sh start listens there when netns.sh up ran first)")


class Fleet:
    """The processes a test starts (launchers, daemons), each logging to a file; whatever is
    still running at the end is killed with its whole process tree."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def logs_text(self) -> str:
        return "\n".join(f"--- {name} (exit {p.poll()}):\n{self.log(name)}" for name, p in self.procs.items())

    def kill(self, name: str) -> None:
        """SIGKILL the process and every descendant (collected first: they would be reparented)."""
        proc = self.procs[name]
        try:
            root = psutil.Process(proc.pid)
            tree = [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        proc.wait(10)

    def stop(self, names: list[str], timeout: float = 20) -> dict[str, int | None]:
        """SIGTERM (a launcher drains and exits 0); returns each exit code (None: had to be killed)."""
        for name in names:
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for name in names:
            try:
                codes[name] = self.procs[name].wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(name)
                codes[name] = None
        return codes

    def close(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                self.kill(name)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    processes = Fleet(tmp_path / "logs")
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture
def env(pg_dsn: str, tmp_path: Path, head_reachable: None) -> dict[str, str]:
    """A node's environment: the database over the bridge, one scratch root per host name."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SCALEBOX_", "SLURM"))}
    environ.update(SCALEBOX_DSN=over_bridge(pg_dsn), SCALEBOX_HOME=str(tmp_path / "home"),
                   SCALEBOX_WORK_ROOT=str(tmp_path / "work"),
                   SCALEBOX_LOCAL_SCRATCH=str(tmp_path / "scratch-${HOST}"), PYTHONUNBUFFERED="1")
    return environ


def scalebox(env: dict[str, str], pg_dsn: str, *args: str) -> str:
    """The CLI on the head node (this namespace, 127.0.0.1)."""
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], env=dict(env, SCALEBOX_DSN=pg_dsn),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"scalebox {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def launch(fleet: Fleet, host: Host, env: dict[str, str], app_id: int) -> None:
    fleet.start(host.name, host.argv(sys.executable, "-m", "scalebox_hpc", "launcher", "--app", str(app_id),
                                     "--grace", "5"), env)


def wait_for(what: str, check: Callable[[], Any], fleet: Fleet, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{fleet.logs_text()}")
        time.sleep(0.2)


def rows(dsn: str, sql: str, *params: object) -> list[dict[str, Any]]:
    with connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def ready_hosts(dsn: str) -> set[str]:
    return {r["host"] for r in rows(dsn, "SELECT DISTINCT host FROM sbx_slots WHERE status IN ('READY', 'RUNNING')")}


def tasks(dsn: str, app_id: int) -> list[dict[str, Any]]:
    """The app's tasks with their last execution's stdout."""
    return rows(dsn, """
        SELECT t.body, t.status, t.host, t.pref_host, t.created_at, t.started_at, e.stdout, e.stderr
        FROM sbx_tasks t
        LEFT JOIN sbx_task_execs e ON e.task_id = t.id AND e.attempt = t.attempts
        WHERE t.app_id = %s ORDER BY t.id""", app_id)


def all_done(dsn: str, app_id: int, n: int) -> Callable[[], list[dict[str, Any]] | None]:
    def check() -> list[dict[str, Any]] | None:
        got = tasks(dsn, app_id)
        failed = [t for t in got if t["status"] not in (-1, -3, 0)]
        assert not failed, f"tasks failed: {failed}"
        return got if len(got) == n and all(t["status"] == 0 for t in got) else None
    return check


def place_inputs(tmp_path: Path, hosts: list[Host], per_host: int) -> dict[str, str]:
    """``per_host`` files in each host's scratch; returns key -> holder, interleaved by host."""
    holder: dict[str, str] = {}
    for k in range(per_host):
        for host in hosts:
            key = f"d/{host.name}-{k:02d}.dat"
            path = tmp_path / f"scratch-{host.name}" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(1024 + 37 * k))
            holder[key] = host.name
    return holder


def start_located(pg_dsn: str, env: dict[str, str], tmp_path: Path, fleet: Fleet, hosts: list[Host],
                  wait: float) -> int:
    """The locality app, created on the head node, and a launcher on every host until all are up
    (their slots heartbeat, so the hosts are live, and their scratch is indexed)."""
    app_yaml = write_app(tmp_path / "app", APP.format(wait=wait), {"use/run.sh": RUN})
    app_id = int(json.loads(scalebox(env, pg_dsn, "app", "create", "--json", str(app_yaml)))["app_id"])
    for host in hosts:
        launch(fleet, host, env, app_id)
    names = {h.name for h in hosts}
    wait_for("a READY slot on every host", lambda: ready_hosts(pg_dsn) >= names, fleet, 45)
    # each launcher reached PostgreSQL over the bridge, from its own host's address
    clients = rows(pg_dsn, "SELECT DISTINCT host(client_addr) AS ip FROM pg_stat_activity "
                           "WHERE datname = current_database() AND client_addr IS NOT NULL")
    assert {r["ip"] for r in clients} >= {h.ip for h in hosts}, clients
    return app_id


def test_tasks_run_on_the_host_holding_their_input(
    pg_dsn: str, env: dict[str, str], tmp_path: Path, fleet: Fleet, hosts: list[Host],
) -> None:
    holder = place_inputs(tmp_path, hosts, per_host=20)
    app_id = start_located(pg_dsn, env, tmp_path, fleet, hosts, wait=10)
    indexed = rows(pg_dsn, "SELECT key, host FROM sbx_scratch")
    assert {r["key"]: r["host"] for r in indexed} == holder  # each launcher indexed its own scratch
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "use", [Message(key, headers={"inputs": [key]}) for key in holder])
    done = wait_for("every task done", all_done(pg_dsn, app_id, len(holder)), fleet, 60)
    codes = fleet.stop([h.name for h in hosts])

    assert {t["body"]: t["pref_host"] for t in done} == holder
    local = [t for t in done if t["host"] == holder[t["body"]]]
    share = len(local) / len(done)
    print(f"local share: {len(local)}/{len(done)} = {share:.1%}; per host: "
          f"{ {h.name: sum(t['host'] == h.name for t in done) for h in hosts} }")
    assert share >= 0.95, [(t["body"], t["host"]) for t in done if t not in local]
    # the script ran in the claiming host's namespace and, when local, found its input there
    for t in done:
        where = "local" if t["host"] == holder[t["body"]] else "remote"
        assert t["stdout"].split() == [t["host"], where], t
    assert codes == {h.name: 0 for h in hosts}, fleet.logs_text()


def test_a_killed_holders_tasks_finish_elsewhere_after_the_wait(
    pg_dsn: str, env: dict[str, str], tmp_path: Path, fleet: Fleet, hosts: list[Host],
) -> None:
    wait = 2.0
    holder = place_inputs(tmp_path, hosts, per_host=10)
    app_id = start_located(pg_dsn, env, tmp_path, fleet, hosts, wait=wait)
    dead = hosts[2].name
    fleet.kill(dead)  # SIGKILL: no drain, its slots simply stop heart-beating
    with connect(pg_dsn) as conn:  # at once: the dead host still counts as live, so it is preferred
        apps.add_tasks(conn, app_id, "use", [Message(key, headers={"inputs": [key]}) for key in holder])
    done = wait_for("every task done", all_done(pg_dsn, app_id, len(holder)), fleet, 60)
    # the live launchers' heartbeat threads find the dead host's slots (no daemon does)
    wait_for(f"{dead}'s slots marked LOST", lambda: {r["status"] for r in rows(
        pg_dsn, "SELECT status FROM sbx_slots WHERE host = %s", dead)} == {"LOST"}, fleet, 20)
    codes = fleet.stop([h.name for h in hosts[:2]])

    orphans = [t for t in done if holder[t["body"]] == dead]
    assert {t["pref_host"] for t in orphans} == {dead}
    assert all(t["host"] in (hosts[0].name, hosts[1].name) for t in done)
    waited = [(t["started_at"] - t["created_at"]).total_seconds() for t in orphans]
    assert min(waited) >= wait - 0.05, waited  # nobody took them before the locality wait was over
    print(f"{len(orphans)} tasks of the killed {dead} ran on "
          f"{sorted({t['host'] for t in orphans})} after {min(waited):.1f}-{max(waited):.1f} s")
    others = [t for t in done if holder[t["body"]] != dead]
    assert sum(t["host"] == holder[t["body"]] for t in others) >= 0.95 * len(others)
    assert codes == {h.name: 0 for h in hosts[:2]}, fleet.logs_text()


@pytest.fixture
def rsync_daemon(tmp_path: Path, hosts: list[Host], fleet: Fleet) -> Iterator[tuple[str, Path]]:
    """An rsync daemon inside the first host's namespace, bound to its address only, serving
    module ``src`` read-only: (rsync://10.77.0.11:PORT, the served directory)."""
    if subprocess.run(["sh", "-c", "command -v rsync"], capture_output=True, check=False).returncode != 0:
        need("rsync", "not on PATH (launchers/testbed/rsync.sh install)")
    host, src = hosts[0], tmp_path / "src"
    src.mkdir()
    conf = tmp_path / "rsyncd.conf"
    conf.write_text(f"use chroot = no\nuid = root\ngid = root\npid file = {tmp_path}/rsyncd.pid\n"
                    f"[src]\npath = {src}\nread only = yes\n")
    for attempt in range(5):  # the namespaces are shared: another run may hold a port
        port = random.randint(20000, 39999)
        name = f"rsyncd-{attempt}"
        proc = fleet.start(name, ["nsenter", f"--net=/run/netns/{host.ns}", "rsync", "--daemon", "--no-detach",
                                  "--address", host.ip, "--port", str(port), "--config", str(conf)])
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection((host.ip, port), timeout=1).close()  # over the bridge
                yield f"rsync://{host.ip}:{port}", src
                return
            except OSError:
                time.sleep(0.05)
        fleet.kill(name)
    raise AssertionError(f"the rsync daemon did not start in {host.ns}\n{fleet.logs_text()}")


def test_app_copy_pulls_from_an_rsync_daemon_on_another_host(
    pg_dsn: str, env: dict[str, str], tmp_path: Path, fleet: Fleet, hosts: list[Host],
    rsync_daemon: tuple[str, Path],
) -> None:
    url, src = rsync_daemon
    names = [f"f{i:02d}.bin" for i in range(12)] + [f"a/b{i}.txt" for i in range(4)] + \
        ["a/c/deep 1.dat", "with space & 'quote'.txt"]
    for i, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(os.urandom(i * 4099))
    target = tmp_path / "target"
    copy_env = dict(env, SOURCE_URL=url + "/src", TARGET_URL=str(target), START_DIR=".", REGEX_FILTER="",
                    CHECKSUM="yes")
    app_id = int(json.loads(scalebox(copy_env, pg_dsn, "app", "create", "--json",
                                     str(REPO / "examples/app-copy/app.yaml")))["app_id"])
    copiers = hosts[1:]  # not the daemon's host: every byte crosses the bridge
    for host in copiers:
        launch(fleet, host, copy_env, app_id)
    done = wait_for("every file copied", all_done(pg_dsn, app_id, 1 + len(names)), fleet, 60)
    codes = fleet.stop([h.name for h in copiers])

    copied = {str(p.relative_to(target)): p.stat().st_size for p in target.rglob("*") if p.is_file()}
    assert copied == {name: (src / name).stat().st_size for name in names}
    ran_on = {t["host"] for t in done}
    assert ran_on <= {h.name for h in copiers}, ran_on
    print(f"app-copy: {len(names)} files from {url} copied by {sorted(ran_on)}")
    status = json.loads(scalebox(copy_env, pg_dsn, "status", "--json", str(app_id)))
    by_module = {m["module"]: m for m in status["modules"]}
    assert by_module["file-copy"]["ok"] == len(names) and by_module["list-dir"]["ok"] == 1
    assert all(m["failed"] == 0 for m in by_module.values())
    assert codes == {h.name: 0 for h in copiers}, fleet.logs_text()

"""The launcher role (issue 16, audit F18, migration 0018): a login role made by `scalebox db
grant OWNER --launcher` has no table privileges, only the sbx_l_* queue functions, and those act
for its owner's apps only. Checked with plain SQL as that role (every table refused, every
function on another owner's app refused) and end to end: `scalebox launcher` under the launcher
role runs its owner's app, task services included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.db.sql import query, sql_dir
from scalebox_hpc.errors import DatabaseError
from tests.helpers import write_app

pytestmark = pytest.mark.pg

APP = """
name: lr
parameters: {start_task: go}
modules:
  a:
    sink_modules: [b]
    arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}
  b:
    arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}
"""
SCRIPTS = {
    # the task services through the launcher: a semaphore, a variable, the app's state
    "a/run.sh": """
        scalebox semaphore create made 4 > /dev/null
        scalebox semaphore decrement made > /dev/null
        scalebox variable set seen "$1"
        scalebox task add -m b -- "from-$1"
        """,
    "b/run.sh": "echo b-ran \"$1\"\n",
}


def _as(dsn: str, role: str) -> str:
    params = conninfo_to_dict(dsn)
    params["user"] = role
    return make_conninfo(**params)


def _sbx(dsn: str, *args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PG", "SCALEBOX_"))},
           "SCALEBOX_DSN": dsn, **extra}
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


@dataclass
class Site:
    admin: str
    alice: str
    bob: str
    a_launcher: str
    b_launcher: str

    def dsn(self, role: str) -> str:
        return _as(self.admin, role)


@pytest.fixture
def site(pg_dsn: str) -> Iterator[Site]:
    """Two users (sbx_user) and a launcher role each, made with `scalebox db grant`; the test
    server trusts TCP logins, so no passwords."""
    tag = uuid.uuid4().hex[:6]
    alice, bob = f"sbx_t_la_{tag}", f"sbx_t_lb_{tag}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        for name in (alice, bob):
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    made = [alice, bob]
    try:
        for user in (alice, bob):
            _sbx(pg_dsn, "db", "grant", user)
            out = _sbx(pg_dsn, "db", "grant", user, "--launcher").stdout
            assert f"{user}_launcher: launches the apps of {user}" in out, out
            made.append(f"{user}_launcher")
        yield Site(pg_dsn, alice, bob, f"{alice}_launcher", f"{bob}_launcher")
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            for name in made:
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _app(site: Site, user: str, root: Path) -> int:
    app = write_app(root, APP, SCRIPTS)
    return int(_sbx(site.dsn(user), "app", "create", str(app)).stdout.strip())


def _ids(conn: psycopg.Connection[Any], app_id: int) -> dict[str, Any]:
    """Module, task and a claimed slot of an app, made as the admin."""
    module = conn.execute("SELECT id FROM sbx_modules WHERE app_id = %s AND name = 'a'", (app_id,)).fetchone()[0]
    slot = conn.execute("INSERT INTO sbx_slots (module_id, host, seq) VALUES (%s, 'hb', 0) RETURNING id",
                        (module,)).fetchone()[0]
    task = conn.execute("UPDATE sbx_tasks SET status = -3, slot_id = %s, attempts = 1 WHERE app_id = %s "
                        "RETURNING id", (slot, app_id)).fetchone()[0]
    conn.execute("INSERT INTO sbx_semaphores (app_id, name, value) VALUES (%s, 's', 1)", (app_id,))
    conn.execute("INSERT INTO sbx_variables (app_id, name, value) VALUES (%s, 'v', 'secret of b')", (app_id,))
    conn.execute("INSERT INTO sbx_stage_jobs (app_id, module_id, slurm_job_id, state) VALUES (%s, %s, %s, 'RUNNING')",
                 (app_id, module, f"77{app_id}"))
    return {"module": module, "slot": slot, "task": task, "job": f"77{app_id}"}


def test_the_launcher_role_reads_no_table(site: Site, tmp_path: Path) -> None:
    _app(site, site.alice, tmp_path / "a")
    with psycopg.connect(site.admin) as admin:
        tables = [r[0] for r in admin.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 'sbx\\_%' "
            "ORDER BY 1").fetchall()]
        functions = admin.execute(
            "SELECT p.proname, p.prosecdef, array_to_string(p.proconfig, ',') AS config FROM pg_proc p "
            "WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'sbx\\_l\\_%'").fetchall()
        # the checks every claim and hand-off makes keep their plans for the session (0028): a
        # SECURITY DEFINER function in SQL is never inlined and plans its query at every call
        languages = dict(admin.execute(
            "SELECT p.proname, l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang "
            "WHERE p.proname IN ('sbx_l_acting_owner_v1', 'sbx_l_is_admin_v1', 'sbx_l_may_v1')").fetchall())
    assert languages == dict.fromkeys(("sbx_l_acting_owner_v1", "sbx_l_is_admin_v1", "sbx_l_may_v1"), "plpgsql")
    assert "sbx_tasks" in tables and "sbx_launchers" in tables and "sbx_schema_version" in tables
    with psycopg.connect(site.dsn(site.a_launcher), autocommit=True) as conn:
        for table in tables:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(sql.Identifier(table)))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO sbx_launchers (role, owner) VALUES (current_user, %s)", (site.bob,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE sbx_tasks SET status = 0")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE sbx_evil (x int)")
        # not an sbx_user: the invoker functions of the CLI's own path read tables it may not
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT sbx_insert_messages_v1(1, NULL, '[]')")
        roles = conn.execute("SELECT r.rolname FROM pg_roles r WHERE pg_has_role(current_user, r.oid, 'MEMBER')"
                             " AND r.rolname <> current_user").fetchall()
        assert [r[0] for r in roles] == ["sbx_launcher"]
    # every launcher function: SECURITY DEFINER but the two CLI helpers, all with the fixed search_path, no JIT
    assert len(functions) >= 30
    for name, secdef, config in functions:
        # the claim and the batch hand-off also plan once per session (0022)
        generic = ",plan_cache_mode=force_generic_plan" if name in ("sbx_l_claim_v1", "sbx_l_complete_tasks_v1") else ""
        # (0027) and never scan sbx_tasks sequentially (nor JIT-compile, which that cost would start)
        generic += ",enable_seqscan=off" if name in ("sbx_l_claim_v1", "sbx_l_complete_tasks_v1") else ""
        # (0032) the node's heartbeat updates its slots by primary key
        generic += ",enable_hashjoin=off,enable_mergejoin=off,enable_seqscan=off" \
            if name == "sbx_l_heartbeat_slots_v1" else ""
        # (0032) and none JIT-compiles: a stale estimate priced a no-op past jit_above_cost (1.1 s of CPU a call)
        assert config == "search_path=pg_catalog, public, pg_temp" + generic + ",jit=off", (name, config)
        assert secdef or name in ("sbx_l_app_exists_v1", "sbx_l_newest_app_v1"), name


def test_functions_on_another_owners_app_are_refused(site: Site, tmp_path: Path) -> None:
    a_id, b_id = _app(site, site.alice, tmp_path / "a"), _app(site, site.bob, tmp_path / "b")
    with psycopg.connect(site.admin, autocommit=True) as admin:
        b = _ids(admin, b_id)
        a_module = admin.execute("SELECT id FROM sbx_modules WHERE app_id = %s AND name = 'a'",
                                 (a_id,)).fetchone()[0]  # type: ignore[index]
        # bob's task's lease expired long ago: alice's launcher must not recover it
        admin.execute("UPDATE sbx_tasks SET lease_expires_at = now() - interval '1 hour', "
                      "heartbeat_at = now() - interval '1 hour 1 second' WHERE id = %s", (b["task"],))
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("SELECT * FROM sbx_l_modules_v1(%s)", (b_id,)),
        ("SELECT * FROM sbx_l_app_v1(%s)", (b_id,)),
        ("SELECT * FROM sbx_l_module_activity_v1(%s, %s)", (b_id, b["module"])),
        ("SELECT * FROM sbx_l_claim_v1(%s, %s, 'h', ARRAY[NULL]::bigint[], '{0}', '{5}', 5, 30)",
         (b_id, b["module"])),
        ("SELECT * FROM sbx_l_claim_v1(%s, %s, 'h', ARRAY[%s]::bigint[], '{0}', '{5}', 5, 30)",
         (a_id, a_module, b["slot"])),  # a slot of another app's module in one's own claim
        ("SELECT sbx_l_complete_task_v1(%s, %s, 1, 0, false, '{}', '[]', 'done')", (b["task"], b["slot"])),
        ("SELECT * FROM sbx_l_complete_tasks_v1(%s)",
         (Jsonb([{"ord": 0, "task_id": b["task"], "slot_id": b["slot"], "attempt": 1, "status": 0,
                  "requeue": False, "exec": {}, "messages": []}]),)),
        ("SELECT * FROM sbx_l_heartbeat_slots_v1(%s)",
         (Jsonb([{"slot_id": b["slot"], "status": "READY", "lease_seconds": 30}]),)),
        ("SELECT * FROM sbx_l_heartbeat_slot_v1(%s, 'READY', 30, NULL)", (b["slot"],)),
        ("SELECT * FROM sbx_l_release_v1(%s, NULL)", (b["slot"],)),
        ("SELECT * FROM sbx_l_release_v2(%s, NULL)", (b["slot"],)),
        ("SELECT sbx_l_set_slot_status_v1(%s, 'EXITED', 'x', 0)", (b["slot"],)),
        ("SELECT sbx_l_insert_slot_v1(%s, 'h', 0, 1, '/tmp', 10)", (b["module"],)),
        ("SELECT * FROM sbx_l_semaphore_add_v1(%s, 's', 100)", (b_id,)),
        ("SELECT * FROM sbx_l_semaphore_take_v1(%s, 's', 1)", (b_id,)),
        ("SELECT sbx_l_semaphore_create_v1(%s, 's', 100)", (b_id,)),
        ("SELECT * FROM sbx_l_semaphore_list_v1(%s)", (b_id,)),
        ("SELECT * FROM sbx_l_variable_get_v1(%s, 'v')", (b_id,)),
        ("SELECT sbx_l_variable_set_v1(%s, 'v', 'changed')", (b_id,)),
        ("SELECT * FROM sbx_l_variable_list_v1(%s)", (b_id,)),
        ("SELECT sbx_l_insert_messages_v1(%s, NULL, %s)",
         (b_id, Jsonb([{"module_id": b["module"], "body": "x", "status": -1, "action": "IGNORE"}]))),
        # one's own app, a message into another app's module
        ("SELECT sbx_l_insert_messages_v1(%s, NULL, %s)",
         (a_id, Jsonb([{"module_id": b["module"], "body": "x", "status": -1, "action": "IGNORE"}]))),
        ("SELECT sbx_l_adopt_tasks_v1(%s, 'h', 10)", (b_id,)),
        # a stage job's own row: drain requests, start and end, the min_jobs check
        ("SELECT * FROM sbx_l_stage_job_flags_v1('', %s)", (b["job"],)),
        ("SELECT * FROM sbx_l_drain_stage_job_v1('', %s)", (b["job"],)),
        ("SELECT * FROM sbx_l_stage_job_started_v1('', %s, 8)", (b["job"],)),
        ("SELECT * FROM sbx_l_stage_job_finished_v1('', %s)", (b["job"],)),
        ("SELECT * FROM sbx_l_lock_stage_job_module_v1('', %s)", (b["job"],)),
        ("SELECT sbx_l_running_stage_jobs_v1(%s, '', %s)", (b["module"], b["job"])),
    ]
    with psycopg.connect(site.dsn(site.a_launcher), autocommit=True) as conn:
        for statement, args in calls:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"another|not an app of|not a slot"):
                conn.execute(statement, args)
        assert conn.execute("SELECT count(*) FROM sbx_l_recover_v1()").fetchone() == (0,)
        assert conn.execute("SELECT sbx_l_app_exists_v1(%s), sbx_l_app_exists_v1(%s), sbx_l_newest_app_v1()",
                            (a_id, b_id)).fetchone() == (True, False, a_id)
    # nothing of bob's changed; his own launcher role recovers his task
    with psycopg.connect(site.admin) as admin:
        assert admin.execute("SELECT status FROM sbx_tasks WHERE id = %s", (b["task"],)).fetchone() == (-3,)
        assert admin.execute("SELECT value FROM sbx_semaphores WHERE app_id = %s", (b_id,)).fetchone() == (1,)
        assert admin.execute("SELECT value FROM sbx_variables WHERE app_id = %s", (b_id,)).fetchone() == \
            ("secret of b",)
        assert admin.execute("SELECT count(*) FROM sbx_tasks WHERE module_id = %s", (b["module"],)).fetchone() == (1,)
        assert admin.execute("SELECT draining, alloc_cpus FROM sbx_stage_jobs WHERE app_id = %s",
                             (b_id,)).fetchone() == (False, None)
    with psycopg.connect(site.dsn(site.b_launcher), autocommit=True) as conn:
        assert conn.execute("SELECT id FROM sbx_l_recover_v1()").fetchall() == [(b["task"],)]


def test_pgqueue_refuses_another_owners_app_with_one_line(site: Site, tmp_path: Path) -> None:
    b_id = _app(site, site.bob, tmp_path / "b")
    queue = PgQueue(site.dsn(site.a_launcher))
    try:
        with pytest.raises(DatabaseError, match=f"app {b_id} is not an app of {site.alice}") as err:
            queue.modules(b_id)
        assert "--launcher" in err.value.hint
    finally:
        queue.close()


def test_the_launcher_role_listens_and_hears_the_triggers(site: Site, tmp_path: Path) -> None:
    a_id = _app(site, site.alice, tmp_path / "a")
    with psycopg.connect(site.dsn(site.a_launcher), autocommit=True) as conn:
        conn.execute("LISTEN sbx_tasks")  # no grant needed
        _sbx(site.dsn(site.alice), "task", "add", "--app", str(a_id), "--", "more")
        heard = list(conn.notifies(timeout=5.0, stop_after=1))
    assert heard and heard[0].channel == "sbx_tasks"


def test_a_launcher_role_runs_its_owners_app_end_to_end(site: Site, tmp_path: Path) -> None:
    a_id = _app(site, site.alice, tmp_path / "a")
    b_id = _app(site, site.bob, tmp_path / "b")
    work = tmp_path / "work"
    proc = _sbx(site.dsn(site.a_launcher), "launcher", "--app", str(a_id), check=False,
                SCALEBOX_WORK_ROOT=str(work))
    assert proc.returncode == 0, proc.stderr
    with psycopg.connect(site.admin, row_factory=dict_row) as admin:
        tasks = admin.execute("SELECT m.name, t.body, t.status FROM sbx_tasks t JOIN sbx_modules m "
                              "ON m.id = t.module_id WHERE t.app_id = %s ORDER BY t.id", (a_id,)).fetchall()
        sem = admin.execute("SELECT value FROM sbx_semaphores WHERE app_id = %s AND name = 'made'",
                            (a_id,)).fetchone()
        var = admin.execute("SELECT value FROM sbx_variables WHERE app_id = %s AND name = 'seen'", (a_id,)).fetchone()
        hosts = admin.execute("SELECT count(*) AS n FROM sbx_hosts").fetchone()
        b_tasks = admin.execute("SELECT status FROM sbx_tasks WHERE app_id = %s", (b_id,)).fetchall()
    assert [(t["name"], t["body"], t["status"]) for t in tasks] == [("a", "go", 0), ("b", "from-go", 0)], \
        (tasks, proc.stderr)
    assert sem == {"value": 3} and var == {"value": "go"}
    assert hosts["n"] >= 1  # type: ignore[index]
    assert b_tasks == [{"status": -1}]  # bob's app: untouched
    # the launcher of alice's role may not run bob's app at all: one line, no traceback
    refused = _sbx(site.dsn(site.a_launcher), "launcher", "--app", str(b_id), check=False,
                   SCALEBOX_WORK_ROOT=str(work))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
    assert "not found" in refused.stderr.lower(), refused.stderr


def test_grant_launcher_refuses_a_user_role(site: Site) -> None:
    proc = _sbx(site.admin, "db", "grant", site.alice, "--launcher", "--launcher-role", site.bob, check=False)
    assert proc.returncode != 0 and "not a launcher role" in proc.stderr, proc.stderr
    with psycopg.connect(site.admin) as admin:
        assert admin.execute("SELECT count(*) FROM sbx_launchers WHERE role = %s", (site.bob,)).fetchone() == (0,)


def test_the_claim_function_runs_the_claim_tasks_statement() -> None:
    """sbx_l_claim_v1 holds the claim_tasks statement (tested by EXPLAIN in test_queue and
    test_locality) with its parameters as the function's arguments: the two cannot drift apart."""

    def normalized(text: str) -> str:
        text = re.sub(r"--[^\n]*", "", text)
        text = re.sub(r"%\((\w+)\)s", r"p_\1", text)
        return " ".join(text.split()).rstrip(";")

    # schema.sql: the function as the migrations leave it (test_schema holds the two equal)
    schema = (sql_dir() / "schema.sql").read_text(encoding="utf-8")
    body = schema.split("-- claim_tasks: begin", 1)[1].split("-- claim_tasks: end", 1)[0]
    assert normalized(body) == normalized(query("claim_tasks"))


def test_the_locality_index_is_per_owner(site: Site, tmp_path: Path) -> None:
    """sbx_hosts / sbx_scratch rows belong to the owner whose launcher wrote them: another user
    neither reads nor replaces nor forges them, and a task prefers hosts by its owner's index."""
    a_id, b_id = _app(site, site.alice, tmp_path / "a"), _app(site, site.bob, tmp_path / "b")
    qa, qb = PgQueue(site.dsn(site.a_launcher)), PgQueue(site.dsn(site.b_launcher))
    try:
        qa.register_host("n1", {"who": "alice"})
        qb.register_host("n1", {"who": "bob"})
        qa.index_scratch("n1", [("in/a.dat", 10)], [], replace=True)
        # bob's start-up scan of the same host name replaces his own entries only
        qb.index_scratch("n1", [("in/b.dat", 20), ("in/shared.dat", 5)], [], replace=True)
        qb.index_scratch("n1", [], ["in/a.dat"])  # removing alice's entry: not his to remove
        # both hosts live (a slot of each app heart-beats there)
        a_slot = qa.create_slot(qa.modules(a_id)["a"].id, host="n1", seq=0, pid=1, work_dir="/tmp")
        b_slot = qb.create_slot(qb.modules(b_id)["a"].id, host="n2", seq=0, pid=1, work_dir="/tmp")
        qb.index_scratch("n2", [("in/shared.dat", 99)], [])
        assert a_slot and b_slot
    finally:
        qa.close()
        qb.close()
    with psycopg.connect(site.admin) as admin:
        scratch = admin.execute("SELECT owner, host, key FROM sbx_scratch ORDER BY 1, 2, 3").fetchall()
        hosts = admin.execute("SELECT owner, name, info->>'who' FROM sbx_hosts ORDER BY 1").fetchall()
    assert scratch == sorted([(site.alice, "n1", "in/a.dat"), (site.bob, "n1", "in/b.dat"),
                              (site.bob, "n1", "in/shared.dat"), (site.bob, "n2", "in/shared.dat")])
    assert hosts == sorted([(site.alice, "n1", "alice"), (site.bob, "n1", "bob")])
    # as bob (sbx_user) with plain SQL: his rows only, and none in alice's name
    with psycopg.connect(site.dsn(site.bob), autocommit=True) as conn:
        assert {r[0] for r in conn.execute("SELECT owner FROM sbx_scratch").fetchall()} == {site.bob}
        assert {r[0] for r in conn.execute("SELECT owner FROM sbx_hosts").fetchall()} == {site.bob}
        assert conn.execute("DELETE FROM sbx_scratch WHERE owner = %s", (site.alice,)).rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO sbx_scratch (owner, key, host) VALUES (%s, 'in/x', 'evil')", (site.alice,))
    # alice's tasks prefer hosts by her index only: in/shared.dat is on bob's live n2, not hers
    _sbx(site.dsn(site.alice), "task", "add", "--app", str(a_id), "-m", "b", "--headers-json",
         '{"inputs": ["in/a.dat"]}', "--", "uses-a")
    _sbx(site.dsn(site.alice), "task", "add", "--app", str(a_id), "-m", "b", "--headers-json",
         '{"inputs": ["in/shared.dat"]}', "--", "uses-shared")
    with psycopg.connect(site.admin) as admin:
        prefs = dict(admin.execute("SELECT body, pref_host FROM sbx_tasks WHERE app_id = %s AND body LIKE 'uses-%%'",
                                   (a_id,)).fetchall())
    assert prefs == {"uses-a": "n1", "uses-shared": None}


def test_a_stage_jobs_autoscale_pass_as_the_launcher_role_is_refused_as_a_privilege_error(
        site: Site, tmp_path: Path) -> None:
    """What the launcher role may still not do in a pass: choose the stage Python of an app never
    submitted (a forced pass would). A stage job connected as the launcher role gets a
    PrivilegeError (which its lifecycle reports once, then stops asking:
    tests/unit/test_stage_lifecycle.py), never a raw psycopg error that would end the job."""
    from scalebox_hpc import node
    from scalebox_hpc.errors import PrivilegeError

    app_id = _app(site, site.alice, tmp_path)
    scale = node.stage_autoscaler(site.dsn(site.a_launcher), tmp_path / "work")
    with pytest.raises(PrivilegeError, match=r"may not choose the stage Python"):
        scale(app_id, force=True)


def test_a_stage_jobs_autoscale_pass_as_the_launcher_role_scales_its_owners_app(
        site: Site, tmp_path: Path) -> None:
    """Issue 16 (migration 0021): the autoscale pass's reads and writes are launcher functions, so
    a stage job connected as alice's launcher role scales alice's app (a job submitted for her
    READY task, its Slurm calls counted, a leaving job's drain marked seen), while bob's app is
    refused as a PrivilegeError and nothing of his changes."""
    from scalebox_hpc.autoscaler import Autoscaler, LaunchCommand
    from scalebox_hpc.db import stages
    from scalebox_hpc.db.connection import connect, translate_errors
    from scalebox_hpc.errors import PrivilegeError
    from scalebox_hpc.slurm import SlurmState
    from tests.integration.test_autoscale import FakeSlurm

    a_id, b_id = _app(site, site.alice, tmp_path / "a"), _app(site, site.bob, tmp_path / "b")
    for user, app_id in ((site.alice, a_id), (site.bob, b_id)):  # as `scalebox submit` keeps them
        with connect(site.dsn(user)) as conn:
            stages.save_launch_settings(conn, app_id, sys.executable, str(tmp_path / "work"))
            conn.commit()
    slurm = FakeSlurm()
    command = LaunchCommand(python=sys.executable, work_root=tmp_path / "work")
    launcher = site.dsn(site.a_launcher)
    with connect(launcher) as conn:
        report = Autoscaler(conn, {"": slurm}, command, interval=0).reconcile(a_id)
        assert report.managed and report.elected and list(report.submitted) == ["a"], report
        [job] = report.submitted["a"]
        slurm.jobs[job] = SlurmState.RUNNING
        assert Autoscaler(conn, {"": slurm}, command, interval=0).reconcile(a_id).submitted == {}
        stages.mark_draining(conn, job)  # it leaves: its pass runs at once and sees it drain
        conn.commit()
        leaving = Autoscaler(conn, {"": slurm}, command, interval=3600).reconcile(
            a_id, leaving=(job, ""))
        # "go" is still READY and its job left: the replacement (no squeue: every live job drains)
        assert leaving.urgent and leaving.elected and len(leaving.submitted["a"]) == 1
        [replacement] = leaving.submitted["a"]
        with (pytest.raises(PrivilegeError, match=f"app {b_id} is not an app of {site.alice}"),
              translate_errors(launcher)):
            Autoscaler(conn, {"": slurm}, command, interval=0).reconcile(b_id)
    with psycopg.connect(site.admin) as admin:
        assert admin.execute("SELECT slurm_job_id, state, drain_seen, submitted_by FROM sbx_stage_jobs "
                             "WHERE app_id = %s ORDER BY id", (a_id,)).fetchall() == [
            (job, "RUNNING", True, site.a_launcher), (replacement, "PENDING", False, site.a_launcher)]
        assert admin.execute("SELECT sum(calls) FROM sbx_slurm_calls WHERE app_id = %s",
                             (a_id,)).fetchone() == (len(slurm.calls),)
        assert admin.execute("SELECT count(*) FROM sbx_stage_jobs WHERE app_id = %s", (b_id,)).fetchone() == (0,)
        assert admin.execute("SELECT autoscaled_at FROM sbx_apps WHERE id = %s", (b_id,)).fetchone() == (None,)
    assert slurm.calls == ["sbatch", "squeue", "sbatch"]


def test_a_launcher_role_may_not_choose_the_stage_python(site: Site, tmp_path: Path) -> None:
    """What a stage job executes is its owner's choice, made at the first submission: a launcher
    role's pass on an app never submitted is refused (the lifecycle says so once, and stops)."""
    from scalebox_hpc.db import stages
    from scalebox_hpc.db.connection import connect

    a_id = _app(site, site.alice, tmp_path / "a")
    with (connect(site.dsn(site.a_launcher)) as conn,
          pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not choose the stage Python")):
        stages.save_launch_settings(conn, a_id, "/tmp/evil", str(tmp_path))
    with psycopg.connect(site.admin) as admin:
        assert admin.execute("SELECT stage_python FROM sbx_apps WHERE id = %s", (a_id,)).fetchone() == (None,)

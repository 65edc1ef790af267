"""The Python client (issue 18) against the real PostgreSQL: app-primes created from Python
and waited for while a launcher runs it, ``run`` end to end (no slot thread left behind, also
when it raises), tasks with headers, the filters of ``tasks``, a retry, a cancel, the wait
timeout, a pipeline as data and a bad pipeline's location."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalebox_hpc import Client, Outcome, Task
from scalebox_hpc.errors import AppTimeoutError, NotFoundError, PipelineError, ScaleboxError
from scalebox_hpc.models import TaskStatus
from scalebox_hpc.text import terminal_safe
from tests.helpers import write_app

pytestmark = pytest.mark.pg

REPO = Path(__file__).resolve().parents[2]
PRIMES = REPO / "examples" / "app-primes" / "app.yaml"
QUICK = "{max_idle_polls: 2, sleep_interval_seconds: 0.2}"


@pytest.fixture
def client(pg_dsn: str, tmp_path: Path) -> Iterator[Client]:
    with Client(pg_dsn, work_root=tmp_path / "work") as sbx:
        yield sbx


def threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


def echo_app(root: Path, *, fail_first: bool = False, sleep: int = 0) -> Path:
    """Module ``echo`` (2 slots) and its sink ``sink``: echo prints its body and headers and
    sends the body on; with ``fail_first`` each body's first attempt exits 3."""
    fail = ('mark="$MARKS/$(printf %s "$1" | sha256sum | cut -c1-16)"\n'
            'if [ ! -e "$mark" ]; then : > "$mark"; echo "first try of $1 fails" >&2; exit 3; fi\n'
            if fail_first else "")
    (root / "marks").mkdir(parents=True, exist_ok=True)
    return write_app(root, f"""
        name: echo
        modules:
          echo:
            slots: [".*:2"]
            sink_modules: [sink]
            arguments: {QUICK}
            environments: ["MARKS=${{MARKS:-{root / 'marks'}}}"]
          sink:
            arguments: {QUICK}
    """, {"echo/run.sh": fail + f'sleep {sleep}\nprintf "%s %s\\n" "$1" "$2"\nsend-message "got-$1"\n',
          "sink/run.sh": 'echo "sink $1"\n'})


def test_app_primes_created_from_python_waited_for_while_a_launcher_runs_it(
        client: Client, cli_env: dict[str, str]) -> None:
    app = client.create_app(PRIMES)
    assert client.result(app) is None
    launcher = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "launcher", "--app", str(app)], env=cli_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        outcome = client.wait(app, timeout=120)
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.communicate(timeout=60)
    assert isinstance(outcome, Outcome)
    assert (outcome.status, outcome.result) == ("FINISHED", "Result is 1229")
    assert client.result(app) == "Result is 1229"
    assert outcome.count(TaskStatus.OK, "calc") == 10 and outcome.count(TaskStatus.OK, "gather") == 10
    assert outcome.failed == 0 and outcome.pending == 0 and outcome.succeeded
    assert list(outcome.counts) == ["scatter", "calc", "gather"]


def test_run_does_what_scalebox_run_does_and_leaves_no_thread_behind(client: Client) -> None:
    before, handler = threads(), signal.getsignal(signal.SIGINT)
    outcome = client.run(PRIMES, env={"NUM_GROUPS": "4", "LENGTH": "25"})
    assert (outcome.status, outcome.result) == ("FINISHED", "Result is 25")
    assert outcome.total == 1 + 4 + 4 and outcome.ok == 9 and outcome.succeeded and outcome.stuck == ()
    assert threads() == before  # the slots, their dispatcher, heartbeat and listener are gone
    assert signal.getsignal(signal.SIGINT) is handler  # a library puts the handlers back
    again = client.run(outcome.app_id)  # a FINISHED app: nothing to run
    assert again == outcome


def test_a_run_that_times_out_raises_after_stopping_its_slots(client: Client, tmp_path: Path) -> None:
    app_yaml = echo_app(tmp_path / "app", sleep=30)
    before = threads()
    app = client.create_app(app_yaml)
    client.add_tasks(app, "echo", ["a", "b"])
    with pytest.raises(AppTimeoutError) as caught:
        client.run(app, timeout=1.0, grace=0.2)
    assert caught.value.app_id == app and caught.value.pending == 2
    assert f"app {app} did not end within 1 s (2 task(s) READY or RUNNING)" in str(caught.value)
    assert threads() == before
    tasks = client.tasks(app, module="echo")
    assert [(t.status, t.attempts) for t in tasks] == [(TaskStatus.READY, 0)] * 2  # given back, not counted


def test_add_tasks_with_headers_and_the_filters_of_tasks(client: Client, tmp_path: Path) -> None:
    app = client.create_app(echo_app(tmp_path / "app"))
    assert client.add_tasks(app, "echo", ["one", "two"], headers={"priority": 5, "tag": "x y"}) == 2
    assert client.add_tasks(app, None, "three") == 1  # the first module; one body as a str
    assert client.add_tasks(app, "echo", ["later"], initial=True) == 1
    ready = client.tasks(app, status="ready")
    assert [t.body for t in ready] == ["one", "two", "three"]
    first = ready[0]
    assert isinstance(first, Task) and first.module == "echo" and first.app_id == app
    assert dict(first.headers) == {"priority": 5, "tag": "x y"} and first.status_name == "READY"
    with pytest.raises(AttributeError):
        first.status = 0  # type: ignore[misc]  # frozen
    with pytest.raises(TypeError):
        first.headers["priority"] = 6  # type: ignore[index]  # a read-only view
    assert [t.body for t in client.tasks(app, status=TaskStatus.INITIAL)] == ["later"]
    assert [t.body for t in client.tasks(app, status=-9)] == ["later"]
    assert client.tasks(app, module="sink") == []
    assert client.task(first.id) == first
    outcome = client.run(app)
    assert outcome.count(TaskStatus.OK, "echo") == 3 and outcome.count(TaskStatus.OK, "sink") == 3
    assert outcome.count(TaskStatus.INITIAL) == 1 and outcome.succeeded
    sunk = client.tasks(app, module="sink", status="ok")
    assert sorted(t.body for t in sunk) == ["got-one", "got-three", "got-two"]
    assert all(t.headers["from_module"] == "echo" and t.done and t.host for t in sunk)
    assert len(client.tasks(app, limit=2)) == 2
    with pytest.raises(ScaleboxError, match="unknown task status 'fine'"):
        client.tasks(app, status="fine")
    with pytest.raises(NotFoundError, match="module 'nope' not found"):
        client.tasks(app, module="nope")
    with pytest.raises(NotFoundError, match="module 'nope' not found"):
        client.add_tasks(app, "nope", ["x"])
    with pytest.raises(NotFoundError, match="app 999 not found"):
        client.tasks(999)


def test_retry_of_a_failed_task(client: Client, tmp_path: Path) -> None:
    app = client.create_app(echo_app(tmp_path / "app", fail_first=True), env={"MARKS": str(tmp_path / "marks")})
    (tmp_path / "marks").mkdir()
    client.add_tasks(app, "echo", ["x"])
    outcome = client.run(app)
    assert outcome.failed == 1 and not outcome.succeeded
    [failed] = client.tasks(app, status="failed")
    assert (failed.body, failed.status, failed.status_name, failed.failed) == ("x", 3, "EXIT_3", True)
    assert client.tasks(app, status=3) == [failed]
    assert client.retry(app) == [failed.id]
    assert client.task(failed.id).status == TaskStatus.READY
    outcome = client.run(app)
    assert outcome.failed == 0 and client.task(failed.id).status == TaskStatus.OK and outcome.succeeded
    assert client.retry(app, [failed.id]) == [failed.id]  # by id too (an OK task can run again)
    with pytest.raises(NotFoundError):
        client.retry(app + 1000, [failed.id])


def test_cancel(client: Client, tmp_path: Path) -> None:
    app = client.create_app(echo_app(tmp_path / "app"))
    client.add_tasks(app, "echo", ["a"])
    client.cancel(app)
    outcome = client.wait(app, timeout=5)
    assert (outcome.status, outcome.result) == ("FINISHED", "cancelled")
    assert outcome.pending == 1  # nobody ran it: FINISHED ends the wait all the same
    with pytest.raises(NotFoundError):
        client.cancel(12345)


def test_wait_timeout_raises_a_clear_error(client: Client, tmp_path: Path) -> None:
    app = client.create_app(echo_app(tmp_path / "app"))
    client.add_tasks(app, "echo", ["a", "b", "c"])
    with pytest.raises(AppTimeoutError) as caught:
        client.wait(app, timeout=0.3)
    assert str(caught.value) == f"app {app} did not end within 0.3 s (3 task(s) READY or RUNNING)"
    assert "scalebox status" in caught.value.hint and isinstance(caught.value, ScaleboxError)


def test_a_pipeline_given_as_data(client: Client, tmp_path: Path) -> None:
    write_app(tmp_path / "app", "name: unused\n", {"hello/run.sh": 'echo "hello $1 $GREETING"\n'
                                                                  'scalebox app set-finished "said $1"\n'})
    pipeline = {"name": "from-python", "parameters": {"start_task": "world"},
                "modules": {"hello": {"arguments": {"max_idle_polls": 2, "sleep_interval_seconds": 0.2},
                                      "environments": ["GREETING=${GREETING}"]}}}
    outcome = client.run(pipeline, app_dir=tmp_path / "app", env={"GREETING": "hi"})
    assert (outcome.name, outcome.status, outcome.result) == ("from-python", "FINISHED", "said world")
    [task] = client.tasks(outcome.app_id)
    assert task.body == "world" and task.status == TaskStatus.OK


def test_a_bad_pipeline_is_a_pipeline_error_with_its_location(client: Client, tmp_path: Path) -> None:
    app = write_app(tmp_path / "bad", """
        name: bad
        modules:
          echo:
            slotz: [".*:2"]
    """, {"echo/run.sh": "true\n"})
    with pytest.raises(PipelineError) as caught:
        client.create_app(app)
    err = caught.value
    assert (err.file, err.line, err.key) == (str(app), 5, "modules.echo")
    assert "unknown key 'slotz' (did you mean 'slots'?)" in str(err)
    with pytest.raises(PipelineError) as from_data:
        client.create_app({"name": "bad", "modules": {"echo": {"sink_modules": ["nope"]}}}, app_dir=tmp_path / "bad")
    assert (from_data.value.line, from_data.value.key) == (None, "modules.echo.sink_modules")
    assert str(from_data.value) == "<pipeline data>: modules.echo.sink_modules: unknown module 'nope'"
    with pytest.raises(PipelineError, match="undefined variable 'NOPE'"):
        client.create_app({"name": "x", "modules": {"echo": {"environments": ["A=${NOPE}"]}}}, app_dir=tmp_path / "bad")
    with pytest.raises(PipelineError, match="not plain data"):
        client.create_app({"name": "x", "modules": {"echo": {"environments": [object()]}}})
    with client._tx() as conn:
        assert conn.execute("SELECT count(*) AS n FROM sbx_apps").fetchone() == {"n": 0}


def test_the_dsn_is_resolved_as_the_cli_does_and_the_connection_closes(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SCALEBOX_DSN", pg_dsn)
    with Client() as sbx:
        assert sbx.dsn == pg_dsn
        conn = sbx.conn
        assert not conn.closed
    assert conn.closed
    with pytest.raises(ScaleboxError, match="the client is closed"):
        sbx.result(1)
    sbx.close()  # twice is fine
    monkeypatch.delenv("SCALEBOX_DSN")
    for key in [k for k in os.environ if k.startswith("PG")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PGHOST", "127.0.0.1")  # the PG* variables, as the CLI reads them
    monkeypatch.setenv("PGPORT", "1")
    from scalebox_hpc.errors import DatabaseError

    with pytest.raises(DatabaseError, match="cannot reach PostgreSQL"):
        Client()


def test_an_error_during_a_run_stops_the_slots_before_it_is_raised(client: Client, tmp_path: Path) -> None:
    from scalebox_hpc.apprun import RunJudge, launcher_config, run_here
    from scalebox_hpc.errors import DatabaseError

    class Failing(RunJudge):
        """The database goes away once tasks run (as a tick would see it)."""

        def tick(self) -> bool:
            if any(mc.count(TaskStatus.RUNNING) for mc in self.counts):
                raise DatabaseError("cannot reach PostgreSQL: gone")
            return super().tick()

    app = client.create_app(echo_app(tmp_path / "app", sleep=30))
    client.add_tasks(app, "echo", ["a", "b"])
    before = threads()
    with pytest.raises(DatabaseError, match="gone"):
        run_here(client.dsn, launcher_config(app, root=client.work_root, local=True), Failing(client.conn, app, None),
                 grace=0.2)
    assert threads() == before
    assert {t.status for t in client.tasks(app, module="echo")} == {TaskStatus.READY}


def test_slots_ended_before_a_run_say_nothing_about_it(client: Client, pg_dsn: str, tmp_path: Path) -> None:
    """A resumed run's first tick may come before its slots register (a loaded host): the slots
    of an earlier run, all ended, one in error, must not make it stuck (it ended at once, READY)."""
    import psycopg

    from scalebox_hpc.apprun import RunJudge

    app = client.create_app(echo_app(tmp_path / "app"))
    client.add_tasks(app, "echo", ["a"])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO sbx_slots (module_id, host, seq, status, message, ended_at) "
                     "SELECT id, 'oldhost', s, st, 'from an earlier run', now() FROM sbx_modules, "
                     "(VALUES (0, 'EXITED'), (1, 'ERROR')) AS v(s, st) WHERE app_id = %s AND name = 'echo'", (app,))
    judge = RunJudge(client.conn, app, None)
    assert not judge.tick() and judge.stuck == [] and judge.read_slots() == []
    outcome = client.run(app)
    assert outcome.succeeded and outcome.ok == 2 and outcome.stuck == ()


def test_a_run_whose_slots_cannot_start_says_why_in_the_outcome(client: Client, tmp_path: Path) -> None:
    from tests.acceptance.test_cli_ux import broken_pipeline

    before = threads()
    outcome = client.run(broken_pipeline(tmp_path / "setup", "setup"))
    assert threads() == before
    assert not outcome.succeeded and outcome.count(TaskStatus.READY, "hasher") == 14
    [why] = outcome.stuck
    assert why.startswith("hasher: all 3 slot(s) failed: ") and why.endswith("14 task(s) left READY"), why


def test_wait_with_progress_draws_the_live_view_on_a_terminal(
        client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    app = client.create_app(echo_app(tmp_path / "app"))
    client.add_tasks(app, "echo", ["a"])
    client.cancel(app)
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich takes stderr for a terminal
    monkeypatch.setenv("COLUMNS", "120")
    assert client.wait(app, progress=True).result == "cancelled"
    err = terminal_safe(capsys.readouterr().err)
    assert f"app {app} echo: FINISHED  cancelled" in err and "━" in err and "1/0" not in err
    monkeypatch.delenv("FORCE_COLOR")
    client.wait(app, progress=True)
    assert capsys.readouterr().err == ""  # not a terminal: nothing drawn

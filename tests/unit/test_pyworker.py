"""In-slot Python handlers: the pipeline key, the worker protocol (untrusted input) and the worker
process itself, without a database."""

from __future__ import annotations

import json
import os
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalebox_hpc.errors import PipelineError
from scalebox_hpc.launcher import pyworker, pyworker_child, taskexec
from scalebox_hpc.pipeline import ModuleSpec, load_pipeline

SETTINGS = settings(max_examples=int(os.environ.get("PYWORKER_EXAMPLES", "200")), deadline=None)


# -- the pipeline key --------------------------------------------------------------------------

def app(root: Path, module: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "app.yaml").write_text("name: p\nmodules:\n  a:\n" + textwrap.indent(textwrap.dedent(module), "    "))
    return root / "app.yaml"


def refused(path: Path) -> str:
    with pytest.raises(PipelineError) as info:
        load_pipeline(path, environ={})
    return str(info.value)


def test_a_handler_module_needs_no_run_sh(tmp_path: Path) -> None:
    spec = load_pipeline(app(tmp_path, "handler: h.py:go\n", {"a/h.py": "def go(t): pass\n"}), environ={})
    assert spec.modules[0].handler == "h.py:go"


def test_a_one_file_app_finds_the_handler_next_to_app_yaml(tmp_path: Path) -> None:
    spec = load_pipeline(app(tmp_path, "handler: h.py:go\n", {"h.py": "def go(t): pass\n"}), environ={})
    assert spec.modules[0].code_path == tmp_path


def test_a_package_handler_must_be_importable(tmp_path: Path) -> None:
    assert load_pipeline(app(tmp_path / "1", "handler: json.decoder:scanstring\n"), environ={})
    message = refused(app(tmp_path / "2", "handler: no_such_pkg_zz.mod:fn\n"))
    assert "app.yaml:4: modules.a.handler: handler module 'no_such_pkg_zz.mod' cannot be found" in message


def test_a_module_in_code_path_is_accepted(tmp_path: Path) -> None:
    spec = load_pipeline(app(tmp_path, "handler: helpers.work:go\n", {"a/helpers/work.py": ""}), environ={})
    assert spec.modules[0].handler == "helpers.work:go"


def test_a_missing_handler_file_is_located(tmp_path: Path) -> None:
    message = refused(app(tmp_path, "handler: nope.py:go\n", {"a/other.py": ""}))
    assert message.endswith(f"app.yaml:4: modules.a.handler: no handler file nope.py in {tmp_path / 'a'}")


def test_handlers_run_bare(tmp_path: Path) -> None:
    message = refused(app(tmp_path, "handler: h.py:go\nbase_image: docker://alpine\n", {"a/h.py": ""}))
    assert "modules.a.handler: handlers run bare" in message and "\n" not in message
    message = refused(app(tmp_path / "2", "handler: h.py:go\narguments: {runtime: podman}\n", {"a/h.py": ""}))
    assert "handlers run bare" in message


@pytest.mark.parametrize(("value", "why"), [
    ("h.py", "is not file.py:function"),
    ("h.py:1go", "is not file.py:function"),
])
def test_a_malformed_handler_is_refused(tmp_path: Path, value: str, why: str) -> None:
    assert why in refused(app(tmp_path, f"handler: '{value}'\n", {"a/h.py": ""}))


def test_handler_and_mpi_do_not_mix(tmp_path: Path) -> None:
    assert "without MPI" in refused(app(tmp_path, "handler: h.py:go\nmpi: {ranks: 2}\n", {"a/h.py": ""}))


def test_the_stored_spec_round_trips() -> None:
    spec = ModuleSpec.model_validate({"name": "a", "code_path": "/x", "handler": "pkg.mod:fn"})
    assert ModuleSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_the_child_knows_every_task_exec_file() -> None:
    assert set(pyworker_child.TASK_EXEC_NAMES) == {
        taskexec.TASK_EXEC, taskexec.TIMESTAMPS, taskexec.USER_FILE, taskexec.SINK_TASKS,
        taskexec.OUTPUT_FILES, taskexec.REMOVED_FILES}


# -- the protocol: replies are untrusted ---------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
replies = st.fixed_dictionaries(
    {"status": st.none() | st.integers(-5, 300) | st.text(max_size=3)},
    optional={
        "messages": st.lists(st.lists(json_values, max_size=4) | st.tuples(st.text(max_size=10), st.none()
                             | st.text(max_size=5), json_values).map(list), max_size=3) | json_values,
        "finish": st.text(max_size=10) | json_values,
        "files": st.booleans() | json_values,
        "notes": st.lists(st.text(max_size=10)) | json_values,
        "extra": json_values,
    },
)


def _decoded_or_refused(data: bytes) -> pyworker.Reply | None:
    try:
        return pyworker.decode_reply(data)
    except pyworker.ProtocolError:
        return None


@SETTINGS
@given(data=st.binary(max_size=300))
def test_any_bytes_give_a_reply_or_a_protocol_error(data: bytes) -> None:
    _decoded_or_refused(data)


@SETTINGS
@given(obj=replies)
def test_any_json_gives_a_valid_reply_or_a_protocol_error(obj: dict[str, Any]) -> None:
    reply = _decoded_or_refused(json.dumps(obj).encode())
    if reply is None:
        return
    assert reply.status is None or 0 <= reply.status <= 255
    assert isinstance(reply.files, bool) and all(isinstance(n, str) for n in reply.notes)
    report = taskexec.ExecReport()
    pyworker.add_reply(report, reply, max_messages=2)  # never raises: bad messages are problems
    assert len(report.messages) <= 2
    assert len(report.messages) + len(report.problems) >= min(1, len(reply.messages))


def test_deep_headers_and_constants_are_refused() -> None:
    deep: Any = {}
    for _ in range(200):
        deep = {"k": deep}
    with pytest.raises(pyworker.ProtocolError):
        pyworker.decode_reply(json.dumps({"status": 0, "messages": [["b", None, deep]]}).encode())
    with pytest.raises(pyworker.ProtocolError):
        pyworker.decode_reply(b'{"status": 0, "finish": NaN}')
    with pytest.raises(pyworker.ProtocolError):
        pyworker.decode_reply(b"[" * 100_000)


def test_unstorable_messages_become_problems() -> None:
    reply = pyworker.decode_reply(json.dumps(
        {"status": 0, "messages": [["ok", None, {}], ["nul\u0000", None, {}], ["x", "b", []]],
         "finish": "fin\u0000"}).encode())
    report = taskexec.ExecReport()
    pyworker.add_reply(report, reply, max_messages=10)
    assert [m.body for m in report.messages] == ["ok"]
    assert len(report.problems) == 2 and report.finish_text == "fin\ufffd"


def test_too_many_messages_emit_none() -> None:
    reply = pyworker.Reply(status=0, messages=[(str(i), None, {}) for i in range(5)])
    report = taskexec.ExecReport()
    pyworker.add_reply(report, reply, max_messages=4)
    assert report.messages == [] and "more than 4 messages" in report.problems[0]


# -- the worker process --------------------------------------------------------------------------

CHILD_HANDLER = """
import os

def go(task):
    if task.body == "emit":
        task.send_message("m", module="b", headers={"n": 1})
        task.set_finished("fin")
    if task.body == "file":
        open("user-file.txt", "w").write("x")
    if task.body == "env":
        print(os.environ["TASK_ID"], task.env["TASK_ID"], task.headers["h"])
    return int(task.body) if task.body.isdigit() else None
"""


@pytest.fixture
def worker(tmp_path: Path) -> Any:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "h.py").write_text(CHILD_HANDLER)
    (tmp_path / "work").mkdir()
    w = pyworker.Worker("h.py:go", tmp_path / "code", cwd=tmp_path / "work", env=dict(os.environ), private=tmp_path)
    yield w
    w.close()


def ask(w: pyworker.Worker, body: str, headers: dict[str, Any] | None = None, task_id: int = 1) -> pyworker.HandlerRun:
    request = pyworker.request_for(task_id, body, headers or {}, 1, w.out_path.parent / "emit.jsonl")
    return w.run(request, timeout=30, abort=threading.Event())


def test_the_worker_runs_many_tasks_in_one_process(worker: pyworker.Worker) -> None:
    runs = [ask(worker, str(n)) for n in (0, 5, 255)]
    assert [r.reply.status for r in runs if r.reply] == [0, 5, 255]
    assert worker.starts == 1
    emitted = ask(worker, "emit").reply
    assert emitted is not None and emitted.messages == [("m", "b", {"n": 1})] and emitted.finish_text == "fin"
    assert ask(worker, "file").reply == pyworker.Reply(status=0, files=True)
    (worker.cwd / "user-file.txt").unlink()  # the slot's collector would have taken it
    run = ask(worker, "env", {"h": "hv"}, task_id=42)
    assert worker.outputs.tail(worker.out_path) == "42 42 hv\n"
    assert run.reply == pyworker.Reply(status=0)
    assert ask(worker, "x").reply == pyworker.Reply(status=0)
    assert worker.outputs.tail(worker.out_path) == ""  # the previous task's output is gone
    assert worker.starts == 1


def test_close_ends_the_worker(worker: pyworker.Worker) -> None:
    ask(worker, "0")
    assert worker.proc is not None
    pid = worker.proc.pid
    worker.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_abort_ends_the_worker(tmp_path: Path) -> None:
    (tmp_path / "h.py").write_text("import time\ndef go(task):\n    time.sleep(60)\n")
    w = pyworker.Worker("h.py:go", tmp_path, cwd=tmp_path, env=dict(os.environ), private=tmp_path)
    abort = threading.Event()
    threading.Timer(0.5, abort.set).start()
    try:
        run = w.run(pyworker.request_for(1, "b", {}, 1, tmp_path / "e"), timeout=None, abort=abort)
        assert run.aborted and w.proc is None
    finally:
        w.close()


def test_the_dir_watch_sees_a_new_file_after_a_settled_check(tmp_path: Path) -> None:
    watch = pyworker_child.DirWatch(tmp_path, pyworker_child.TASK_EXEC_NAMES)
    os.utime(tmp_path, ns=(0, 10**9))  # an old mtime: trusted, checks cost one stat
    assert not watch.any() and not watch.any()
    (tmp_path / "sink-tasks.txt").write_text("x\n")
    assert watch.any()
    (tmp_path / "sink-tasks.txt").unlink()
    assert not watch.any()  # a fresh mtime is not trusted yet: looked up again every time
    (tmp_path / "task-exec.json").write_text("{}")
    assert watch.any()


@SETTINGS
@given(task_id=st.integers(0, 2**62), attempt=st.integers(0, 1000),
       body=st.text(st.characters(exclude_characters="\x00", exclude_categories=()), max_size=50),
       headers=st.dictionaries(st.text(max_size=5), json_values, max_size=3))
def test_requests_round_trip(task_id: int, attempt: int, body: str, headers: dict[str, Any]) -> None:
    payload = pyworker.request_for(task_id, body, headers, attempt, "/p/emit-1.1.jsonl")
    assert pyworker_child.decode_request(payload) == {
        "id": task_id, "attempt": attempt, "emit": "/p/emit-1.1.jsonl", "headers": headers, "body": body}


def test_a_status_only_reply_is_one_byte() -> None:
    assert all(pyworker.decode_reply(frame[4:]) == pyworker.Reply(status=code)
               for code, frame in enumerate(pyworker_child.PLAIN_FRAMES))


def test_a_package_handler_in_code_path_runs(tmp_path: Path) -> None:
    (tmp_path / "pkg_in_code").mkdir()
    (tmp_path / "pkg_in_code" / "__init__.py").write_text("")
    (tmp_path / "pkg_in_code" / "mod.py").write_text("def go(task):\n    return len(task.body)\n")
    w = pyworker.Worker("pkg_in_code.mod:go", tmp_path, cwd=tmp_path, env=dict(os.environ), private=tmp_path)
    try:
        run = w.run(pyworker.request_for(1, "abc", {}, 1, tmp_path / "e"), timeout=30, abort=threading.Event())
        assert run.reply == pyworker.Reply(status=3)
    finally:
        w.close()


def test_a_worker_that_does_not_start_in_time_is_101(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\ndef go(task):\n    return 0\n")
    w = pyworker.Worker("slow.py:go", tmp_path, cwd=tmp_path, env=dict(os.environ), private=tmp_path)
    try:
        run = w.run(pyworker.request_for(1, "b", {}, 1, tmp_path / "e"), timeout=0.5, abort=threading.Event())
        assert run.start_error is not None and "did not start within task_max_seconds (0.5 s)" in run.start_error
        assert w.proc is None
    finally:
        w.close()


def test_a_missing_function_is_101_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "h.py").write_text("def other(task):\n    return 0\n")
    w = pyworker.Worker("h.py:go", tmp_path, cwd=tmp_path, env=dict(os.environ), private=tmp_path)
    try:
        run = w.run(pyworker.request_for(1, "b", {}, 1, tmp_path / "e"), timeout=30, abort=threading.Event())
        assert run.start_error is not None and "h.py has no function 'go'" in run.start_error
    finally:
        w.close()


def test_garbage_on_the_reply_pipe_fails_the_task_not_the_slot(tmp_path: Path) -> None:
    (tmp_path / "h.py").write_text(
        "import os, struct, sys\n"
        "def go(task):\n"
        "    os.write(int(sys.argv[2]), struct.pack('>I', 5) + task.body.encode())  # forges a frame\n"
        "    return 0\n")
    w = pyworker.Worker("h.py:go", tmp_path, cwd=tmp_path, env=dict(os.environ), private=tmp_path)
    try:
        for body in ("abort", "[1,2"):
            run = w.run(pyworker.request_for(1, body, {}, 1, tmp_path / "e"), timeout=30, abort=threading.Event())
            assert not run.aborted and run.reply is None and "worker was ended" in run.notes[0]
            assert run.outcome().returncode == 0 and run.report(None, 10).invalid  # → -103
        assert w.starts == 2
    finally:
        w.close()


# -- batches: several tasks in one write, one reply each ----------------------------------------

BATCH_HANDLER = """
import sys, time

def go(task):
    if task.body.startswith("say"):
        print("out", task.body)
        print("err", task.body, file=sys.stderr)
    if task.body == "sleep":
        time.sleep(30)
    if task.body == "die":
        import os
        os._exit(7)
    return 3 if task.body == "three" else 0
"""


@pytest.fixture
def batch_worker(tmp_path: Path) -> Any:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "h.py").write_text(BATCH_HANDLER)
    (tmp_path / "work").mkdir()
    w = pyworker.Worker("h.py:go", tmp_path / "code", cwd=tmp_path / "work", env=dict(os.environ), private=tmp_path)
    yield w
    w.close()


def batch(w: pyworker.Worker, bodies: list[str], timeout: float = 30) -> list[tuple[pyworker.HandlerRun, str, str]]:
    """Each task's run and its stdout / stderr tails, read when it was yielded (as the slot does)."""
    requests = [pyworker.request_for(n, b, {}, 1, w.out_path.parent / f"emit-{n}.jsonl") for n, b in enumerate(bodies)]
    return [(run, w.outputs.tail(w.out_path), w.outputs.tail(w.err_path))
            for run in w.run_many(requests, timeout=timeout, abort=threading.Event())]


def test_a_batch_gives_each_task_its_own_output(batch_worker: pyworker.Worker) -> None:
    got = batch(batch_worker, ["a", "say1", "b", "say2", "say3", "three", "c"])
    assert [r.reply.status for r, _, _ in got if r.reply] == [0, 0, 0, 0, 0, 3, 0]
    assert [(out, err) for _, out, err in got] == [
        ("", ""), ("out say1\n", "err say1\n"), ("", ""), ("out say2\n", "err say2\n"),
        ("out say3\n", "err say3\n"), ("", ""), ("", "")]
    assert [r.reply.hold for r, _, _ in got if r.reply] == [False, True, False, True, True, False, False]
    assert batch_worker.starts == 1
    # one at a time after a batch: the last hold is released before the next request
    assert batch(batch_worker, ["say4"])[0][1:] == ("out say4\n", "err say4\n")
    assert batch(batch_worker, ["d"])[0][1:] == ("", "")


def test_a_timeout_in_a_batch_kills_the_worker_and_the_rest_runs_on_a_new_one(batch_worker: pyworker.Worker) -> None:
    got = batch(batch_worker, ["a", "sleep", "say5", "b"], timeout=1.5)
    assert got[0][0].reply is not None and got[1][0].timed_out and got[1][0].outcome().timed_out
    assert [r.reply.status for r, _, _ in got[2:] if r.reply] == [0, 0]
    assert got[2][1] == "out say5\n" and batch_worker.starts == 2


def test_a_worker_dying_in_a_batch_fails_that_task_only(batch_worker: pyworker.Worker) -> None:
    got = batch(batch_worker, ["a", "die", "three"])
    assert got[1][0].returncode == 7 and got[1][0].died
    assert got[2][0].reply is not None and got[2][0].reply.status == 3 and batch_worker.starts == 2


def test_an_aborted_batch_reports_every_task_left_as_aborted(batch_worker: pyworker.Worker) -> None:
    abort = threading.Event()
    requests = [pyworker.request_for(n, b, {}, 1, "/nonexistent/e") for n, b in enumerate(["a", "sleep", "b"])]
    runs = batch_worker.run_many(requests, timeout=30, abort=abort)
    assert next(runs).reply is not None
    abort.set()
    assert [r.aborted for r in runs] == [True, True]


def test_a_batch_larger_than_a_pipe_goes_in_chunks(batch_worker: pyworker.Worker) -> None:
    bodies = ["x" * 5000 + str(n) for n in range(40)]  # 200 KB of requests, more than a pipe holds
    got = batch(batch_worker, bodies)
    assert len(got) == 40 and all(r.reply is not None and r.reply.status == 0 for r, _, _ in got)
    assert len(pyworker._chunk([b"x" * 5000] * 40)) == pyworker.BATCH_BYTES // 5004

"""The request directory: its parser (fed by user code), the CLI's answers it renders, and the
in-container helper (POSIX sh) against the launcher's side of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalebox_hpc import taskapi
from scalebox_hpc.errors import InvalidValueError, NotFoundError
from scalebox_hpc.runtime.svcdir import RequestDir, sweep

HELPER = Path(__file__).resolve().parents[2] / "scalebox_hpc" / "runtime" / "container_bin" / "scalebox"
KEYS = ["task_id", "cmd", "name", "value", "app", "json", "op", "x"]
texts = st.text(max_size=12)
cmds = st.sampled_from([*taskapi.COMMANDS, "task add", "semaphore drop", ""])


@given(st.binary(max_size=2000))
def test_any_bytes_give_a_call_or_a_one_line_error(data: bytes) -> None:
    try:
        call = taskapi.parse_file_call(data)
    except InvalidValueError as exc:
        assert "\n" not in str(exc)
    else:
        assert call.cmd in taskapi.COMMANDS and call.task_id > 0


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)  # a loaded CI machine
@given(st.dictionaries(st.sampled_from(KEYS), texts | cmds | st.integers() | st.none(), max_size=7), cmds)
def test_any_json_object_gives_a_call_or_a_clear_error(doc: dict[str, Any], cmd: str) -> None:
    doc.setdefault("cmd", cmd)
    try:
        call = taskapi.parse_file_call(json.dumps(doc).encode())
    except InvalidValueError:
        return
    # only texts, only known keys; what was given is what the call holds
    assert set(doc) <= set(KEYS[:6]) and all(isinstance(v, str) for v in doc.values())
    assert call.cmd == doc["cmd"] and call.task_id == int(doc["task_id"])
    assert call.name == doc.get("name", "") and call.value == doc.get("value") and call.app == doc.get("app")


def test_a_key_given_twice_is_refused() -> None:
    with pytest.raises(InvalidValueError, match="JSON"):
        taskapi.parse_file_call(b'{"task_id": "1", "cmd": "semaphore get", "name": "a", "name": "b"}')


def _asked(store: dict[str, Any]) -> Any:
    def ask(request: taskapi.Request) -> Any:
        # what goes down the socket is a request the socket's own parser takes back unchanged
        assert taskapi.parse_request(request.encode().rstrip(b"\n")) == request
        store.setdefault("asked", []).append(request)
        if request.op == "semaphore.get" and request.name == "missing":
            raise NotFoundError("semaphore", request.name)
        return {"semaphore.list": {"a\tb": "x\ny\x1b[31m"}, "variable.list": {"k": "v"}}.get(request.op, 3)
    return ask


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS[:6]), texts | cmds | st.sampled_from(["3", "4", " 3", "x"]), max_size=6),
       st.sampled_from(["7", "8"]))
def test_any_request_file_gets_an_answer_never_an_exception(doc: dict[str, str], task: str) -> None:
    doc["task_id"] = task
    store: dict[str, Any] = {}
    try:
        reply = taskapi.answer_file(json.dumps(doc).encode(), _asked(store), 7, "3")
    except Exception as exc:  # pragma: no cover - the property
        pytest.fail(f"answer_file raised {exc!r}")
    assert reply.status in (0, 1, 2)
    if "asked" in store:  # only this task's calls, only for its own app, reach the socket
        assert task == "7" and (doc.get("app") is None or int(doc["app"]) == 3), doc
    if reply.status == 0:
        assert reply.stderr == ""


@pytest.mark.parametrize("doc, status, stdout, stderr", [
    ({"cmd": "semaphore get", "name": "n"}, 0, "3\n", ""),
    ({"cmd": "semaphore get", "name": "missing"}, 1, "", "scalebox: error: semaphore 'missing' not found"),
    ({"cmd": "semaphore list"}, 0, "a b\tx y\n", ""),
    ({"cmd": "variable list", "json": "1"}, 0, '{\n  "k": "v"\n}\n', ""),
    ({"cmd": "variable set", "name": "k", "value": "v"}, 0, "", ""),
    ({"cmd": "variable set", "name": "_stage.python", "value": "/x"}, 1, "", "is reserved"),
    ({"cmd": "semaphore create", "name": "n", "value": "x"}, 2, "", "'x' is not a valid integer"),
    ({"cmd": "semaphore create", "name": "n", "value": "2147483648"}, 2, "", "is not in the range"),
    ({"cmd": "semaphore decrement", "name": "n", "value": "-2147483648"}, 1, "", "32-bit"),
    ({"cmd": "semaphore get", "name": "n", "app": "4"}, 1, "", "own app's semaphores and variables (app 3)"),
    ({"cmd": "semaphore get", "name": "n", "app": "0"}, 2, "", "Invalid value for '--app'"),
    ({"cmd": "semaphore get", "name": "n", "app": "3"}, 0, "3\n", ""),
    ({"cmd": "semaphore get", "name": "n", "task_id": "8"}, 1, "", "task 8 is not running in this launcher"),
    ({"cmd": "semaphore get"}, 2, "", "needs a NAME"),
])
def test_answers_are_the_python_clis(doc: dict[str, str], status: int, stdout: str, stderr: str) -> None:
    doc = {"task_id": "7", **doc}
    reply = taskapi.answer_file(json.dumps(doc).encode(), _asked({}), 7, "3")
    assert (reply.status, reply.stdout) == (status, stdout), reply
    assert stderr in reply.stderr


def test_decrement_asks_for_minus_delta() -> None:
    store: dict[str, Any] = {}
    doc = {"task_id": "7", "cmd": "semaphore decrement", "name": "n", "value": "5"}
    taskapi.answer_file(json.dumps(doc).encode(), _asked(store), 7, "3")
    assert store["asked"] == [taskapi.Request("semaphore.add", 7, "n", -5)]


# -- the helper (sh) against the launcher's side ---------------------------------------------------
SHELLS = [s for s in (["sh"], ["busybox", "sh"], ["dash"]) if shutil.which(s[0])]


@pytest.fixture
def served(tmp_path: Path) -> Any:
    store: dict[str, Any] = {}
    directory = RequestDir(tmp_path, _asked(store), 7, "3").start()
    yield directory, store
    directory.stop()


def _helper(shell: list[str], directory: RequestDir, *argv: str) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": os.environ["PATH"], taskapi.SERVICES_DIR_ENV: str(directory.path), "TASK_ID": "7",
           "SCALEBOX_SERVICES_WAIT": "20"}
    return subprocess.run([*shell, str(HELPER), *argv], env=env, capture_output=True, timeout=60, check=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(SHELLS), st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                                         max_size=40),
       st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40))
def test_the_helper_sends_every_argument_as_it_is(served: Any, shell: list[str], name: str, value: str) -> None:
    """No argument can add a key or end the request: what the launcher reads is what was typed."""
    directory, store = served
    store.clear()
    argv = ["variable", "set", "--", name, value]
    proc = _helper(shell, directory, *argv)
    assert proc.returncode in (0, 1), proc
    if name.startswith("_") or not name or len(name) > taskapi.MAX_NAME_CHARS:
        return
    assert proc.returncode == 0, proc
    assert store["asked"] == [taskapi.Request("variable.set", 7, name, value)]


@pytest.mark.parametrize("shell", SHELLS)
def test_the_helper_prints_the_answer_and_returns_its_status(served: Any, shell: list[str]) -> None:
    directory, _ = served
    ok = _helper(shell, directory, "semaphore", "get", "n")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, b"3\n", b"")
    missing = _helper(shell, directory, "semaphore", "get", "missing")
    assert missing.returncode == 1 and missing.stdout == b"" and b"not found" in missing.stderr
    usage = _helper(shell, directory, "semaphore", "get", "n", "--bogus")
    assert usage.returncode == 2 and usage.stdout == b""
    assert not [p for p in directory.path.iterdir()], list(directory.path.iterdir())  # nothing left behind


def test_planted_links_are_never_followed(served: Any, tmp_path: Path) -> None:
    directory, store = served
    target = tmp_path / "target"
    target.write_text("keep\n")
    (directory.path / "11.req").symlink_to(target)  # a request that is a link: not read
    (directory.path / "12.out").symlink_to(target)  # a reply name planted as a link: not written through
    (directory.path / "12.req").write_text('{"task_id": "7", "cmd": "semaphore get", "name": "n"}\n')
    for _ in range(200):
        if (directory.path / "12.rc").exists():
            break
        directory.scan()
        time.sleep(0.01)
    assert target.read_text() == "keep\n"
    assert (directory.path / "12.rc").read_text() == "0\n" and not (directory.path / "12.out").is_symlink()
    assert (directory.path / "12.out").read_text() == "3\n"
    assert not (directory.path / "11.req").exists() and len(store["asked"]) == 1


def test_a_new_run_sweeps_the_directories_earlier_runs_left(tmp_path: Path) -> None:
    (tmp_path / "svc-1-abc").mkdir()
    (tmp_path / "svc-1-abc" / "1.req").write_text("{}")
    (tmp_path / "svc-file").write_text("not a dir")
    (tmp_path / "other").mkdir()
    sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "svc-file"]


def test_bytes_that_are_not_utf8_are_one_error_on_both_paths(tmp_path: Path) -> None:
    """argv's surrogate escapes: the socket's client says so (it crashed with a traceback) and the
    request directory gives the same error and exit status."""
    with pytest.raises(InvalidValueError, match="not UTF-8"):
        taskapi.call(str(tmp_path / "no-socket"), taskapi.Request("variable.set", 7, "k", "a\udcffb"))
    data = b'{"task_id": "7", "cmd": "variable set", "name": "k", "value": "a\xffb"}'
    reply = taskapi.answer_file(data, _asked({}), 7, "3")
    assert reply.status == 1 and taskapi.NOT_UTF8 in reply.stderr

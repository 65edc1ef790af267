"""The task-services protocol (fed by user code: parsed strictly), the socket, and the allow-list
of what a script inherits from its launcher."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalebox_hpc import taskapi
from scalebox_hpc.errors import InvalidValueError, NotFoundError, ScaleboxError
from scalebox_hpc.launcher import services, taskenv


@given(st.binary(max_size=2000))
def test_any_bytes_give_a_request_or_a_clear_error(data: bytes) -> None:
    try:
        request = taskapi.parse_request(data)
    except InvalidValueError as exc:
        assert "\n" not in str(exc)
    else:
        assert request.op in taskapi.OPS and request.task_id > 0


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=10)


@given(st.dictionaries(st.sampled_from(["op", "task_id", "name", "value", "module", "headers", "bodies", "x"]),
                       json_values, max_size=7))
def test_any_json_object_gives_a_request_or_a_clear_error(doc: dict[str, object]) -> None:
    try:
        request = taskapi.parse_request(json.dumps(doc).encode())
    except InvalidValueError:
        return
    assert request.op == doc["op"] and request.task_id == doc["task_id"]
    if request.op == "variable.set":
        assert not request.name.startswith("_")


@given(st.sampled_from(sorted(taskapi.OPS)), st.text(min_size=1, max_size=30).filter(lambda s: "\x00" not in s),
       st.integers(taskapi.INT32_MIN, taskapi.INT32_MAX))
def test_a_request_reads_back_as_it_was_written(op: str, name: str, value: int) -> None:
    if op == "variable.set":
        name = "v" + name
        request = taskapi.Request(op, 7, name, str(value))  # type: ignore[arg-type]
    elif op == "tasks.deliver":
        request = taskapi.Request(op, 7, module=name, headers={"k": "v"}, bodies=("b",))  # type: ignore[arg-type]
    elif op in ("semaphore.create", "semaphore.add"):
        request = taskapi.Request(op, 7, name, value)  # type: ignore[arg-type]
    elif op in ("semaphore.list", "variable.list", "app.state"):
        request = taskapi.Request(op, 7)  # type: ignore[arg-type]
    else:
        request = taskapi.Request(op, 7, name)  # type: ignore[arg-type]
    assert taskapi.parse_request(request.encode().rstrip(b"\n")) == request


@pytest.mark.parametrize("line, reason", [
    (b'{"op": "semaphore.add", "task_id": 1, "name": "n", "value": 2147483648}', "32-bit"),
    (b'{"op": "semaphore.add", "task_id": 1, "name": "n", "value": true}', "32-bit"),
    (b'{"op": "variable.set", "task_id": 1, "name": "_stage.python", "value": "/tmp/x"}', "reserved"),
    (b'{"op": "drop.table", "task_id": 1}', "unknown op"),
    (b'{"op": "app.state", "task_id": 0}', "task_id"),
    (b'{"op": "app.state", "task_id": 1, "value": NaN}', "JSON"),
    (b'{"op": "tasks.deliver", "task_id": 1, "module": "m", "bodies": []}', "bodies"),
    (b'[1]', "object"),
])
def test_bad_requests_are_refused_with_the_reason(line: bytes, reason: str) -> None:
    with pytest.raises(InvalidValueError, match=reason):
        taskapi.parse_request(line)


def test_the_answer_refuses_a_task_that_does_not_run_here_and_carries_errors() -> None:
    line = taskapi.Request("semaphore.get", 5, "n").encode()
    refused = services.answer(line, lambda r: 1, lambda task_id: False)
    assert not refused.ok and "task 5 is not running" in refused.error

    def missing(request: taskapi.Request) -> object:
        raise NotFoundError("semaphore", request.name)

    failed = services.answer(line, missing, lambda task_id: True)
    assert not failed.ok and "semaphore" in failed.error and failed.hint
    assert services.answer(line, lambda r: 42, lambda task_id: True) == taskapi.Reply(True, 42)


def test_the_socket_is_private_and_answers_one_call_per_connection(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    server = services.TaskServices(directory / "s", lambda r: {"op": r.op, "name": r.name}, lambda t: t == 3)
    server.start()
    try:
        assert os.stat(directory / "s").st_mode & 0o777 == 0o600
        got = taskapi.call(str(directory / "s"), taskapi.Request("variable.get", 3, "x"))
        assert got == {"op": "variable.get", "name": "x"}
        with pytest.raises(taskapi.ServiceError, match="not running"):
            taskapi.call(str(directory / "s"), taskapi.Request("variable.get", 4, "x"))
        with socket.socket(socket.AF_UNIX) as raw:  # garbage in, one line of reason out
            raw.connect(str(directory / "s"))
            raw.sendall(b"\xff\xfe garbage\n")
            reply = taskapi.parse_reply(taskapi.read_line(raw))
        assert not reply.ok and "JSON" in reply.error
    finally:
        server.stop()
    assert not (directory / "s").exists()
    with pytest.raises(taskapi.ServiceError, match="cannot reach") as info:
        taskapi.call(str(directory / "s"), taskapi.Request("variable.get", 3, "x"))
    assert "has ended" in info.value.hint


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_starting_leaves_the_process_umask_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The umask is the whole process's: launchers start in threads, and a umask changed around
    the bind was seen by their mkdirs (0600 directories) and, with two starts overlapping, stuck."""
    seen: list[int] = []
    bind = socket.socket.bind

    def watching(sock: socket.socket, address: Any) -> None:
        seen.append(current_umask())
        bind(sock, address)

    monkeypatch.setattr(socket.socket, "bind", watching)
    before = current_umask()
    servers = []
    for n in range(8):
        directory = tmp_path / f"d{n}"
        directory.mkdir(mode=0o700)
        servers.append(services.TaskServices(directory / "s", lambda r: None, lambda t: False))
    threads = [threading.Thread(target=server.start) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert seen == [before] * 8 and current_umask() == before
        assert all(os.stat(server.path).st_mode & 0o777 == 0o600 for server in servers)
    finally:
        for server in servers:
            server.stop()


def test_a_directory_others_may_enter_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o755)
    with pytest.raises(ScaleboxError, match="not a private directory"):
        services.TaskServices(directory / "s", lambda r: None, lambda t: False).start()
    assert not (directory / "s").exists()


def test_a_script_inherits_the_allow_list_only() -> None:
    environ = {
        "PATH": "/usr/bin", "HOME": "/home/u", "LC_ALL": "C", "SLURM_JOB_ID": "7", "LD_LIBRARY_PATH": "/opt/lib",
        "SCALEBOX_DSN": "postgresql://u:pw@h/db", "PGPASSWORD": "pw", "PGHOST": "h", "AWS_SECRET_ACCESS_KEY": "x",
        "GITHUB_TOKEN": "t", "SLURM_JWT": "jwt", "RANDOM_SETTING": "r", "SITE_LICENSE": "lic",
        "SCALEBOX_PASS_ENV": "SITE_LICENSE,PGPASSWORD,MY_API_KEY", "MY_API_KEY": "k",
    }
    got = taskenv.script_base_env(environ)
    assert got == {"PATH": "/usr/bin", "HOME": "/home/u", "LC_ALL": "C", "SLURM_JOB_ID": "7",
                   "LD_LIBRARY_PATH": "/opt/lib", "SITE_LICENSE": "lic"}

"""The task-exec collector against what a buggy or hostile run leaves behind (audit F1, F3, F14-F16).

Every case: ``collect`` returns (never raises, never blocks), the fixed-name files are gone,
and what could not be used is in ``invalid`` (wrong shape/type/size/kind, -103) or ``problems``
(rejected messages, -102).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.launcher import taskexec
from scalebox_hpc.launcher.taskexec import ExecReport, collect, parse_sink_line
from scalebox_hpc.models import MAX_HEADERS_BYTES, Message

MODULES = {"calc", "gather"}
FIXED = (taskexec.TASK_EXEC, taskexec.TIMESTAMPS, taskexec.USER_FILE, taskexec.SINK_TASKS,
         taskexec.OUTPUT_FILES, taskexec.REMOVED_FILES)
CONTAINER_BIN = Path(taskexec.__file__).parents[1] / "runtime" / "container_bin"
DEEP = 10_000


def run(work: Path, **kwargs: Any) -> ExecReport:
    """collect() on ``work`` (emit buffer ``work/emit.jsonl``); checks that every file is gone."""
    report = collect(work, work / "emit.jsonl", MODULES, **kwargs)
    left = {p.name for p in work.iterdir()} & {*FIXED, "emit.jsonl"}
    assert not left, f"not removed: {left}"
    assert not any("internal error" in note for note in report.invalid), report.invalid
    return report


def task_exec(work: Path, data: Any) -> ExecReport:
    (work / taskexec.TASK_EXEC).write_text(json.dumps(data))
    return run(work)


# -- F1: the triggers that reach the collector ----------------------------------------------------

def test_nul_in_user_text_and_user_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / taskexec.TASK_EXEC).write_text(json.dumps({"userText": "a\x00b"}))
    (tmp_path / taskexec.USER_FILE).write_bytes(b"c\x00d")
    report = run(tmp_path)
    assert report.user_text == "a\ufffdb\nc\ufffdd"
    assert report.invalid == [] and report.problems == []


@pytest.mark.parametrize("where", ["task-exec", "sink-headers", "emit-line", "emit-headers"])
def test_nesting_10000_deep(tmp_path: Path, where: str) -> None:
    deep = "[" * DEEP + "]" * DEEP
    if where == "task-exec":
        (tmp_path / taskexec.TASK_EXEC).write_text(deep)
    elif where == "sink-headers":
        (tmp_path / taskexec.SINK_TASKS).write_text('ok\nb,{"h":' + deep + "}\n")
    elif where == "emit-line":
        (tmp_path / "emit.jsonl").write_text(deep + "\n")
    else:
        (tmp_path / "emit.jsonl").write_text('{"body": "b", "headers": {"h": ' + deep + "}}\n")
    report = run(tmp_path)
    if where == "task-exec":
        assert report.invalid == ["task-exec.json: nested too deeply"]
    else:
        assert len(report.problems) == 1 and "nested too deeply" in report.problems[0]
    assert all(m.body == "ok" for m in report.messages)


def test_parse_sink_line_is_total_for_deep_and_moderately_deep_headers() -> None:
    with pytest.raises(InvalidMessageError, match="nested too deeply"):
        parse_sink_line('b,{"h":' + "[" * DEEP + "]" * DEEP + "}", MODULES)
    with pytest.raises(InvalidMessageError, match="nested deeper than 64"):
        parse_sink_line('b,{"h":' + "[" * 100 + "]" * 100 + "}", MODULES)
    assert parse_sink_line('b,{"h":' + "[" * 10 + "]" * 10 + "}", MODULES).headers["h"] == [[[[[[[[[[]]]]]]]]]]


@pytest.mark.parametrize(("data", "field"), [
    ({"inputFiles": 5}, "inputFiles"),
    ({"timestamps": 5}, "timestamps"),
    ({"outputFiles": "x"}, "outputFiles"),
    ({"inputFiles": ["a", 5]}, "inputFiles.1"),
    ({"userText": {"a": 1}}, "userText"),
    ({"messageBody": ["b"]}, "messageBody"),
])
def test_wrong_types_are_invalid_not_exceptions(tmp_path: Path, data: dict[str, Any], field: str) -> None:
    report = task_exec(tmp_path, {**data, "statusCode": 3})
    assert len(report.invalid) == 1 and report.invalid[0].startswith(f"task-exec.json: {field}: ")
    assert report.status == 3  # the valid fields are still used


def test_nul_in_a_path_is_kept_cleaned_and_not_sized(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 3)
    report = task_exec(tmp_path, {"outputFiles": ["a\x00b", "a", "\ud800"]})
    assert report.output_files == ["a\ufffdb", "a", "\ufffd"]
    assert report.output_bytes == 3 and report.invalid == []


def test_headers_over_the_limit_are_a_problem(tmp_path: Path) -> None:
    big = json.dumps({"h": "x" * MAX_HEADERS_BYTES})
    (tmp_path / taskexec.SINK_TASKS).write_text(f"b,{big}\n")
    (tmp_path / "emit.jsonl").write_text(json.dumps({"body": "e", "headers": {"h": "x" * MAX_HEADERS_BYTES}}) + "\n")
    report = run(tmp_path)
    assert report.messages == [] and len(report.problems) == 2
    assert all("exceed" in p for p in report.problems)


@pytest.mark.parametrize("field", ["inputBytes", "outputBytes"])
@pytest.mark.parametrize("value", [100000000000000000000, -1, 1.5, True, "10"])
def test_byte_counts_out_of_bigint_or_of_the_wrong_type(tmp_path: Path, field: str, value: Any) -> None:
    (tmp_path / "f").write_bytes(b"z" * 4)
    report = task_exec(tmp_path, {field: value, "inputFiles": ["f"], "outputFiles": ["f"]})
    assert len(report.invalid) == 1 and report.invalid[0].startswith(f"task-exec.json: {field}: ")
    assert (report.input_bytes, report.output_bytes) == (4, 4)  # computed instead


def test_byte_counts_at_the_bigint_limit_are_kept(tmp_path: Path) -> None:
    report = task_exec(tmp_path, {"inputBytes": 2**63 - 1, "outputBytes": 0})
    assert (report.input_bytes, report.output_bytes, report.invalid) == (2**63 - 1, 0, [])


def test_unhashable_sink_job(tmp_path: Path) -> None:
    report = task_exec(tmp_path, {"sinkJob": ["x"], "messageBody": "b"})
    assert report.invalid == ["task-exec.json: sinkJob: Input should be a valid string; ignored"]
    assert report.messages == [Message("b")]
    assert all(isinstance(m.module, str | None) for m in report.messages)


# -- F3: statusCode ---------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [-1, -3, -9, 256, "0", True, False, 1.0, None, 2**64])
def test_status_codes_outside_0_255_are_invalid(tmp_path: Path, code: Any) -> None:
    report = task_exec(tmp_path, {"statusCode": code})
    assert report.status is None
    if code is None:  # null means absent, as before
        assert report.invalid == []
    else:
        assert len(report.invalid) == 1 and report.invalid[0].startswith("task-exec.json: statusCode: ")


@pytest.mark.parametrize("code", [0, 1, 123, 255])
def test_status_codes_0_255_are_kept(tmp_path: Path, code: int) -> None:
    assert task_exec(tmp_path, {"statusCode": code}).status == code


# -- F14: FIFOs, symlinks, directories, devices ---------------------------------------------------

HANG = 30.0
"""How long collect() may take before it counts as blocked (on a FIFO, a device): a bound on a
hang, far from what a slow machine needs, not a timing window."""


def collect_within(work: Path) -> ExecReport:
    """collect() in a daemon thread; fails (instead of hanging the suite) if it blocks."""
    box: list[ExecReport] = []
    thread = threading.Thread(target=lambda: box.append(collect(work, work / "emit.jsonl", MODULES)), daemon=True)
    thread.start()
    thread.join(HANG)
    assert not thread.is_alive(), f"collect blocked for more than {HANG:g} s"
    return box[0]


@pytest.mark.parametrize("name", [*FIXED, "emit.jsonl"])
def test_fifo_does_not_block(tmp_path: Path, name: str) -> None:
    os.mkfifo(tmp_path / name)
    report = collect_within(tmp_path)
    assert report.invalid == [f"{'emit buffer' if name == 'emit.jsonl' else name}: is a FIFO, "
                              "not a regular file; removed unread"]
    assert not (tmp_path / name).exists()


def test_all_fifos_at_once(tmp_path: Path) -> None:
    for name in (*FIXED, "emit.jsonl"):
        os.mkfifo(tmp_path / name)
    assert len(collect_within(tmp_path).invalid) == 7
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [*FIXED, "emit.jsonl"])
def test_symlink_to_a_file_outside_is_removed_not_followed(tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "secret"
    content = '{"statusCode": 7, "messageBody": "leak", "userText": "leak"}\nleak-line\n'
    target.write_text(content)
    os.chmod(target, 0o644)
    before = os.stat(target)
    work = tmp_path / "w"
    work.mkdir()
    (work / name).symlink_to(target)
    report = run(work)
    assert report.status is None and report.messages == [] and report.user_text is None
    assert report.timestamps == [] and report.output_files == [] and report.removed_files == []
    assert len(report.invalid) == 1 and "symbolic link" in report.invalid[0]
    assert target.read_text() == content and os.stat(target).st_mtime_ns == before.st_mtime_ns
    assert not (work / name).is_symlink()


def test_symlink_to_dev_zero_and_a_dangling_one(tmp_path: Path) -> None:
    (tmp_path / taskexec.TASK_EXEC).symlink_to("/dev/zero")
    (tmp_path / taskexec.SINK_TASKS).symlink_to(tmp_path / "nowhere")
    report = collect_within(tmp_path)
    assert len(report.invalid) == 2 and Path("/dev/zero").exists()
    assert list(tmp_path.iterdir()) == []


def test_symlink_swapped_in_after_the_lstat_is_refused_by_o_nofollow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "target.json"
    target.write_text('{"statusCode": 9}')
    link = tmp_path / "w" / taskexec.TASK_EXEC
    link.parent.mkdir()
    link.symlink_to(target)
    real_lstat = os.lstat

    def lying_lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(path) == link:  # as if a regular file stood there when we looked
            return real_lstat(target)
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(taskexec.os, "lstat", lying_lstat)
    report = collect(link.parent, link.parent / "emit.jsonl", MODULES)
    monkeypatch.undo()
    assert report.status is None
    assert len(report.invalid) == 1 and "cannot be opened" in report.invalid[0]
    assert not link.is_symlink() and target.read_text() == '{"statusCode": 9}'


@pytest.mark.parametrize("name", FIXED)
def test_directory_in_place_of_a_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name / "sub").mkdir(parents=True)
    (tmp_path / name / "sub" / "f").write_text("x")
    report = run(tmp_path)
    assert report.invalid == [f"{name}: is a directory, not a regular file; removed unread"]
    assert not (tmp_path / name).exists()


def test_directory_with_a_symlink_inside_removes_the_link_not_its_target(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("p")
    work = tmp_path / "w"
    (work / taskexec.TASK_EXEC).mkdir(parents=True)
    (work / taskexec.TASK_EXEC / "link").symlink_to(keep)
    run(work)
    assert (keep / "precious").read_text() == "p"


def test_socket_and_device(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / taskexec.SINK_TASKS))
        try:
            os.mknod(tmp_path / taskexec.TASK_EXEC, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            device = True
        except OSError:  # no CAP_MKNOD here
            device = False
        report = collect_within(tmp_path)
    finally:
        sock.close()
    assert any("socket" in note for note in report.invalid)
    assert any("character device" in note for note in report.invalid) == device
    assert list(tmp_path.iterdir()) == []


def test_a_file_it_cannot_open_is_noted_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / taskexec.TASK_EXEC).write_text('{"statusCode": 0}')
    os.chmod(tmp_path / taskexec.TASK_EXEC, 0)
    real_open = os.open

    def denied(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path).name == taskexec.TASK_EXEC:  # root reads a mode-0 file, so refuse it as EACCES would
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(taskexec.os, "open", denied)
    report = run(tmp_path)
    assert report.invalid == ["task-exec.json: cannot be opened (Permission denied); removed"]


def test_a_read_error_is_noted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / taskexec.USER_FILE).write_text("x")

    def broken(self: Any, stream: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(taskexec._Collector, "user_file", broken)
    assert run(tmp_path).invalid == ["user-file.txt: cannot be read (Input/output error)"]


def test_an_internal_error_costs_the_run_not_the_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / taskexec.USER_FILE).write_text("x")
    (tmp_path / taskexec.SINK_TASKS).write_text("fine\n")

    def buggy(self: Any, stream: Any) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(taskexec._Collector, "user_file", buggy)
    report = collect(tmp_path, tmp_path / "emit.jsonl", MODULES)
    assert report.invalid == ["user-file.txt: could not be read (internal error KeyError; see the launcher log)"]
    assert report.messages == [Message("fine")] and list(tmp_path.iterdir()) == []


# -- F15: emit-buffer injection through send-message HEADERS ---------------------------------------

def send_message(emit: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", str(CONTAINER_BIN / "send-message"), *args], capture_output=True, text=True,
                          env={"SCALEBOX_EMIT_FILE": str(emit), "PATH": "/usr/bin:/bin"}, check=False)


def test_duplicate_key_injection_is_refused(tmp_path: Path) -> None:
    emit = tmp_path / "emit.jsonl"
    done = send_message(emit, "body1", '{"a":1},"kind":"finish","text":"pwned-dupkey"')
    # not an object: refused at the call, as the Python CLI refuses it; nothing is written
    assert (done.returncode, done.stderr) == (1, "scalebox: error: --headers-json must be a JSON object\n")
    assert not emit.exists()


def test_a_key_named_kind_inside_the_headers_is_only_a_header(tmp_path: Path) -> None:
    emit = tmp_path / "emit.jsonl"
    assert send_message(emit, "body1", '{"a":1,"kind":"finish","text":"pwned"}').returncode == 0
    report = run(tmp_path)
    assert report.finish_text is None and report.problems == []
    assert report.messages == [Message("body1", {"a": 1, "kind": "finish", "text": "pwned"})]


def test_newline_injection_through_the_helper(tmp_path: Path) -> None:
    emit = tmp_path / "emit.jsonl"
    send_message(emit, "body2", '{}}\n{"kind":"task","body":"injected","module":null,"headers":{}')
    assert len(emit.read_bytes().splitlines()) == 1
    report = run(tmp_path)
    assert "injected" not in [m.body for m in report.messages] or report.problems
    # the HEADERS text is one string of one record, which the host judges as the CLI would
    assert report.messages == []
    assert report.problems == ["emitted message 1: --headers-json is not JSON: Extra data: line 1 column 3 (char 2)"]


def test_newline_injection_that_breaks_a_line_fails_the_run(tmp_path: Path) -> None:
    emit = tmp_path / "emit.jsonl"
    assert send_message(emit, "body2", '{}}\n{"kind":"task","body":"injected","module":null,"headers":{}}',
                        ).returncode == 0
    report = run(tmp_path)
    # the slot fails the run (-102) and commits none of its messages
    assert report.messages == [] and report.finish_text is None
    assert report.problems == ["emitted message 1: --headers-json is not JSON: Extra data: line 1 column 3 (char 2)"]


@pytest.mark.parametrize(("args", "why"), [
    (["b\xff"], "task body is not valid UTF-8"),
    (["-m", "calc\xfe", "--", "b"], "module name contains NUL or an invalid character"),
    (["-H", "k=v\xfe", "--", "b"], "task headers are not valid JSON text"),
    (["--headers-json", '{"k": "\xfe"}', "--", "b"], "task headers are not valid JSON text"),
])
def test_bytes_that_are_not_utf8_are_refused_not_replaced(tmp_path: Path, args: list[str], why: str) -> None:
    argv = [os.fsencode(a).replace(b"\xc3\xbf", b"\xff").replace(b"\xc3\xbe", b"\xfe") for a in args]
    subprocess.run([b"/bin/sh", os.fsencode(CONTAINER_BIN / "scalebox"), b"task", b"add", *argv], check=True,
                   env={"SCALEBOX_EMIT_FILE": str(tmp_path / "emit.jsonl"), "PATH": "/usr/bin:/bin"})
    report = run(tmp_path)
    assert report.messages == [] and len(report.problems) == 1 and why in report.problems[0], report.problems


def test_finish_text_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    subprocess.run([b"/bin/sh", os.fsencode(CONTAINER_BIN / "scalebox"), b"app", b"set-finished", b"r\xffr"],
                   check=True, env={"SCALEBOX_EMIT_FILE": str(tmp_path / "emit.jsonl"), "PATH": "/usr/bin:/bin"})
    report = run(tmp_path)
    assert report.finish_text is None and report.problems == ["emitted message 1: finish text is not valid UTF-8"]


@pytest.mark.parametrize(("record", "why"), [
    ({"kind": "task", "body": "b", "extra": 1}, "unknown key(s) 'extra'"),
    ({"kind": "finish", "text": "t", "body": "b"}, "unknown key(s) 'body'"),
    ({"kind": "destroy", "body": "b"}, "unknown kind 'destroy'"),
    ({"kind": None, "body": "b"}, "unknown kind NoneType"),
    ({"kind": "task", "body": 5}, "body must be a string, not int"),
    ({"body": "b", "headers": []}, "headers must be a JSON object, not list"),
    ({"body": "b", "headers": None}, "headers must be a JSON object, not NoneType"),
    ({"body": "b", "module": 7}, "module must be a string or null, not int"),
    ({"body": "b", "module": "m\x00"}, "module name contains NUL"),
    ({"kind": "finish", "text": 1}, "finish text must be a string, not int"),
    ({"body": "b\ud800"}, "not valid UTF-8"),
    ({"body": "b\x00"}, "NUL"),
    (["body"], "not a JSON object"),
    ({"body": "b", "headers": {"x": {"y": 1, "y ": 2}}}, ""),
])
def test_emit_records_of_the_wrong_shape(tmp_path: Path, record: Any, why: str) -> None:
    (tmp_path / "emit.jsonl").write_text(json.dumps(record) + "\n")
    report = run(tmp_path)
    if why:
        assert report.messages == [] and report.finish_text is None
        assert len(report.problems) == 1 and why in report.problems[0], report.problems
    else:
        assert report.problems == [] and len(report.messages) == 1


@pytest.mark.parametrize("line", ['{"body": "b", "headers": {"x": NaN}}', '{"body": "b", "headers": {"x": 1e999}}',
                                  '{"body": "b", "headers": {"x": -Infinity}}'])
def test_emit_numbers_jsonb_cannot_store(tmp_path: Path, line: str) -> None:
    (tmp_path / "emit.jsonl").write_text(line + "\n")
    report = run(tmp_path)
    assert report.messages == [] and len(report.problems) == 1


def test_emit_missing_kind_means_task_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "emit.jsonl").write_text(
        '\n{"body": "b", "headers": {"k": 1}}\n  \n{"kind": "finish", "text": "t\\u0000"}\n')
    report = run(tmp_path)
    assert report.messages == [Message("b", {"k": 1})] and report.finish_text == "t\ufffd"
    assert report.problems == []


# -- F16: sizes ----------------------------------------------------------------------------------

def test_sparse_1gb_task_exec_json_is_refused_without_reading(tmp_path: Path) -> None:
    with open(tmp_path / taskexec.TASK_EXEC, "wb") as fh:
        fh.truncate(1 << 30)
    start = time.monotonic()
    report = run(tmp_path)
    assert time.monotonic() - start < 1.0
    assert report.invalid == [f"task-exec.json: more than {taskexec.MAX_TASK_EXEC_BYTES} bytes; not read"]


def test_task_exec_json_at_the_limit_is_read(tmp_path: Path) -> None:
    text = json.dumps({"statusCode": 4, "pad": ""})
    pad = taskexec.MAX_TASK_EXEC_BYTES - len(text)
    (tmp_path / taskexec.TASK_EXEC).write_text(text.replace('""', '"' + "p" * pad + '"'))
    assert (tmp_path / taskexec.TASK_EXEC).stat().st_size == taskexec.MAX_TASK_EXEC_BYTES
    report = run(tmp_path)
    assert report.status == 4 and report.invalid == []


@pytest.mark.parametrize("unit", ["[],", "{},", "1,"])
def test_millions_of_tiny_values_are_refused_before_parsing(tmp_path: Path, unit: str) -> None:
    n = (taskexec.MAX_TASK_EXEC_BYTES - 20) // len(unit)
    (tmp_path / taskexec.TASK_EXEC).write_text('{"x": [' + unit * (n - 1) + unit[:-1] + "]}")
    start = time.monotonic()
    report = run(tmp_path)
    assert time.monotonic() - start < 1.0
    assert report.invalid == [f"task-exec.json: more than {taskexec.MAX_TASK_EXEC_VALUES} JSON values; not read"]


def test_full_file_lists_and_timestamps_are_within_the_value_limit(tmp_path: Path) -> None:
    cap, stamps = taskexec.MAX_FILE_ENTRIES, taskexec.MAX_TIMESTAMPS
    report = task_exec(tmp_path, {
        "inputFiles": [f"/nonexistent/in,{i}" for i in range(cap)],
        "outputFiles": [f"/nonexistent/out,{i}" for i in range(cap)],
        "timestamps": [{"time": f"t{i}", "label": "l", "extra": [1, 2, {"a": 1}]} for i in range(stamps)],
    })
    assert report.invalid == [] and len(report.timestamps) == stamps and len(report.output_files) == cap


def test_user_text_is_cut_to_1_mib_silently(tmp_path: Path) -> None:
    (tmp_path / taskexec.TASK_EXEC).write_text(json.dumps({"userText": "j" * 1000}))
    (tmp_path / taskexec.USER_FILE).write_bytes("é".encode() * taskexec.MAX_USER_TEXT_BYTES)
    report = run(tmp_path)
    assert report.user_text is not None and report.user_text.startswith("j" * 1000 + "\né")
    assert len(report.user_text.encode()) <= taskexec.MAX_USER_TEXT_BYTES
    assert report.user_text.endswith(f"[scalebox: cut to {taskexec.MAX_USER_TEXT_BYTES} bytes]")
    assert report.invalid == [] and report.problems == []


def test_user_text_of_2_mib_in_json_is_cut(tmp_path: Path) -> None:
    report = task_exec(tmp_path, {"userText": "u" * (2 << 20)})
    assert report.user_text is not None and len(report.user_text.encode()) <= taskexec.MAX_USER_TEXT_BYTES
    assert report.invalid == []


@pytest.mark.parametrize(("key", "cap"), [("inputFiles", taskexec.MAX_FILE_ENTRIES),
                                          ("outputFiles", taskexec.MAX_FILE_ENTRIES),
                                          ("timestamps", taskexec.MAX_TIMESTAMPS)])
def test_json_lists_are_capped(tmp_path: Path, key: str, cap: int) -> None:
    report = task_exec(tmp_path, {key: [f"/nonexistent/{i}" for i in range(cap + 5)]})
    kept = {"inputFiles": report.input_files, "outputFiles": report.output_files, "timestamps": report.timestamps}[key]
    assert len(kept) == cap
    assert report.invalid == [f"task-exec.json: {key}: {cap + 5} entries, more than {cap}; the rest is ignored"]


@pytest.mark.parametrize(("name", "cap"), [(taskexec.OUTPUT_FILES, taskexec.MAX_FILE_ENTRIES),
                                           (taskexec.REMOVED_FILES, taskexec.MAX_FILE_ENTRIES),
                                           (taskexec.TIMESTAMPS, taskexec.MAX_TIMESTAMPS)])
def test_list_files_are_capped(tmp_path: Path, name: str, cap: int) -> None:
    (tmp_path / name).write_text("".join(f"e{i}\n" for i in range(cap * 3)))
    report = run(tmp_path)
    kept = {taskexec.OUTPUT_FILES: report.output_files, taskexec.REMOVED_FILES: report.removed_files,
            taskexec.TIMESTAMPS: report.timestamps}[name]
    assert len(kept) == cap and len(report.invalid) == 1 and "the rest is ignored" in report.invalid[0]


def test_output_files_from_json_and_txt_share_the_cap(tmp_path: Path) -> None:
    (tmp_path / taskexec.TASK_EXEC).write_text(json.dumps({"outputFiles": ["j"] * (taskexec.MAX_FILE_ENTRIES - 1)}))
    (tmp_path / taskexec.OUTPUT_FILES).write_text("a\nb\n")
    report = run(tmp_path)
    assert len(report.output_files) == taskexec.MAX_FILE_ENTRIES and report.output_files[-1] == "a"
    assert len(report.invalid) == 1


def test_long_list_lines_are_ignored(tmp_path: Path) -> None:
    (tmp_path / taskexec.OUTPUT_FILES).write_text("a\n" + "x" * 10_000 + "\nb\n")
    report = run(tmp_path)
    assert report.output_files == ["a", "b"]
    assert report.invalid == [f"output-files.txt:2: longer than {taskexec.MAX_ENTRY_BYTES} bytes; ignored"]


def test_long_sink_line_is_a_problem_and_the_rest_is_read(tmp_path: Path) -> None:
    (tmp_path / taskexec.SINK_TASKS).write_bytes(b"a\n" + b"x" * (300 * 1024) + b"\nb\r\nc")
    report = run(tmp_path)
    assert report.messages == [Message("a"), Message("b"), Message("c")]
    assert report.problems == [f"sink-tasks.txt:2: longer than {taskexec.MAX_LINE_BYTES} bytes; skipped"]


def test_a_line_of_exactly_the_limit_is_read_one_byte_more_is_not(tmp_path: Path) -> None:
    line = json.dumps({"body": "x"})
    exact = line[:-1] + " " * (taskexec.MAX_LINE_BYTES - len(line)) + "}"
    assert len(exact) == taskexec.MAX_LINE_BYTES
    # the last line has no newline at the end of the file
    (tmp_path / "emit.jsonl").write_text(exact + "\n" + exact[:-1] + " }\r\n" + exact)
    report = run(tmp_path)
    assert report.messages == [Message("x"), Message("x")]
    assert report.problems == [f"emitted message 2: longer than {taskexec.MAX_LINE_BYTES} bytes; skipped"]


def test_line_splitting_is_on_newline_only(tmp_path: Path) -> None:
    (tmp_path / taskexec.SINK_TASKS).write_text("a\u2028b\x85c\x0cd\n", encoding="utf-8")
    (tmp_path / "emit.jsonl").write_text(json.dumps({"body": "e\u2028f"}, ensure_ascii=False) + "\n")
    report = run(tmp_path)
    assert [m.body for m in report.messages] == ["a\u2028b\x85c\x0cd", "e\u2028f"]


def test_invalid_utf8_becomes_replacement_characters(tmp_path: Path) -> None:
    (tmp_path / taskexec.SINK_TASKS).write_bytes(b"ok\xff\xfe\n")
    (tmp_path / taskexec.OUTPUT_FILES).write_bytes(b"o\xc3\n")
    (tmp_path / taskexec.TIMESTAMPS).write_bytes(b"t\xed\xa0\x80,l\x00\n")  # an encoded surrogate, NUL
    (tmp_path / taskexec.TASK_EXEC).write_bytes(b'{"userText": "\xff", "inputFiles": ["\\ud800x"], '
                                                b'"timestamps": [{"k\\u0000": ["\\udfff"]}, 5, "s"]}')
    report = run(tmp_path)
    assert report.messages == [Message("ok\ufffd\ufffd")]
    assert report.output_files == ["o\ufffd"]
    assert report.user_text == "\ufffd" and report.input_files == ["\ufffdx"]
    assert report.timestamps == [{"k\ufffd": ["\ufffd"]}, {"time": "5"}, {"time": "s"},
                                 {"time": "t\ufffd\ufffd\ufffd", "label": "l\ufffd"}]
    assert report.invalid == [] and report.problems == []


def test_bad_timestamp_entries(tmp_path: Path) -> None:
    deep = json.loads("[" * 70 + "]" * 70)
    report = task_exec(tmp_path, {"timestamps": [None, [1], {"a": [[[[]]]] * 2}, {"d": deep}]})
    assert report.timestamps == [{"a": [[[[]]]] * 2}]
    assert [n.split(":")[1] for n in report.invalid] == [" timestamps.0", " timestamps.1", " timestamps.3"]
    text = '{"timestamps": [{"t": 1e999}], "userText": 1e999}'
    (tmp_path / taskexec.TASK_EXEC).write_text(text)
    report = run(tmp_path)
    assert report.timestamps == [] and report.user_text == "inf"
    assert report.invalid == ["task-exec.json: timestamps.0: number out of range; ignored"]


def test_nan_in_task_exec_json_is_not_json(tmp_path: Path) -> None:
    (tmp_path / taskexec.TASK_EXEC).write_text('{"statusCode": 0, "userText": NaN}')
    assert run(tmp_path).invalid == ["task-exec.json: not JSON (NaN is not valid JSON)"]


def test_huge_integer_in_task_exec_json(tmp_path: Path) -> None:
    (tmp_path / taskexec.TASK_EXEC).write_text('{"statusCode": ' + "9" * 5000 + "}")
    report = run(tmp_path)
    assert len(report.invalid) == 1 and report.invalid[0].startswith("task-exec.json: not JSON (Exceeds the limit")
    assert len(report.invalid[0].encode()) <= taskexec.MAX_NOTE_BYTES


def test_bom_and_non_object(tmp_path: Path) -> None:
    (tmp_path / taskexec.TASK_EXEC).write_bytes(b'\xef\xbb\xbf{"statusCode": 2}')
    assert run(tmp_path).status == 2
    (tmp_path / taskexec.TASK_EXEC).write_text("[1, 2]")
    assert run(tmp_path).invalid == ["task-exec.json: not a JSON object"]


def test_notes_are_capped(tmp_path: Path) -> None:
    (tmp_path / taskexec.SINK_TASKS).write_text("bad\x00\n" * 1000)
    report = run(tmp_path)
    assert len(report.problems) == taskexec.MAX_NOTES + 1 and report.problems[-1] == "... and 900 more"


def test_messages_over_the_byte_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(taskexec, "MAX_MESSAGE_BYTES", 1000)
    (tmp_path / taskexec.SINK_TASKS).write_text("".join(f"m{i:08d}\n" for i in range(200)))
    report = run(tmp_path)
    assert report.messages == [] and len(report.problems) == 1 and "1000 bytes" in report.problems[0]


# -- max_messages: all or nothing, in constant memory ----------------------------------------------

def test_one_million_lines_over_max_messages_in_small_memory(tmp_path: Path) -> None:
    with open(tmp_path / taskexec.SINK_TASKS, "w") as fh:
        for start in range(0, 1_000_000, 10_000):
            fh.write("".join(f"f{i:09d}\n" for i in range(start, start + 10_000)))
    (tmp_path / "emit.jsonl").write_text('{"kind": "finish", "text": "done"}\n')
    tracemalloc.start()
    try:
        report = run(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.messages == [] and report.finish_text is None
    assert report.problems == ["more than 100000 messages (arguments.max_messages); "
                               "emit fewer per task or split the work"]
    assert peak < 50 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_max_messages_counts_every_source(tmp_path: Path) -> None:
    def fill(n_sink: int, n_emit: int) -> None:
        (tmp_path / taskexec.TASK_EXEC).write_text(json.dumps({"messageBody": "j"}))
        (tmp_path / taskexec.SINK_TASKS).write_text("".join(f"s{i}\n\n" for i in range(n_sink)))
        (tmp_path / "emit.jsonl").write_text("".join(json.dumps({"body": f"e{i}"}) + "\n" for i in range(n_emit))
                                             + '{"kind": "finish", "text": "t"}\n')

    fill(4, 5)
    report = run(tmp_path, max_messages=10)
    assert len(report.messages) == 10 and report.problems == [] and report.finish_text == "t"
    fill(4, 6)
    report = run(tmp_path, max_messages=10)
    assert report.messages == [] and report.problems == [
        "more than 10 messages (arguments.max_messages); emit fewer per task or split the work"]


def test_malformed_lines_count_as_messages_seen(tmp_path: Path) -> None:
    (tmp_path / taskexec.SINK_TASKS).write_text("bad\x00\n" * 5 + "ok\n")
    report = run(tmp_path, max_messages=3)
    assert report.messages == [] and len(report.problems) == 4 and report.problems[0].startswith("more than 3")


def test_the_overflow_problem_survives_the_note_cap(tmp_path: Path) -> None:
    (tmp_path / taskexec.SINK_TASKS).write_text("bad\x00\n" * 500)
    report = run(tmp_path, max_messages=300)
    assert report.problems[0].startswith("more than 300 messages") and report.problems[-1] == "... and 200 more"

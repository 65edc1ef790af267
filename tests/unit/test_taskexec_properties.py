"""Property tests: whatever a run writes into its task-exec files, ``collect`` returns a report
that PostgreSQL can store (UTF-8 text, no NUL, numbers in range) and removes the files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.launcher import taskexec
from scalebox_hpc.launcher.taskexec import ExecReport, collect, parse_sink_line
from scalebox_hpc.models import Message

MODULES = {"calc", "gather"}
EMIT = "emit.jsonl"
FILES = (taskexec.TASK_EXEC, taskexec.SINK_TASKS, taskexec.TIMESTAMPS, taskexec.USER_FILE,
         taskexec.OUTPUT_FILES, taskexec.REMOVED_FILES, EMIT)
# modest by default (the file runs in a few seconds); TASKEXEC_EXAMPLES=5000 for a longer hunt
SETTINGS = settings(max_examples=int(os.environ.get("TASKEXEC_EXAMPLES", "100")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Fragments that make random bytes likely to be (almost) JSON, (almost) a sink line, or hostile.
FRAGMENTS = [
    b"{", b"}", b"[", b"]", b",", b":", b'"', b"\n", b"\r\n", b" ", b"\\", b"\\u0000", b"\\ud800", b"\\udfff",
    b"\x00", b"\xff", b"\xed\xa0\x80", b"\xc3", b"\xef\xbb\xbf", b"\xe2\x80\xa8", b"NaN", b"-Infinity", b"1e999",
    b"null", b"true", b"false", b"0", b"-1", b"256", b"9" * 25, b"1.5", b'"kind"', b'"task"', b'"finish"',
    b'"body"', b'"headers"', b'"module"', b'"text"', b'"statusCode"', b'"inputFiles"', b'"outputFiles"',
    b'"inputBytes"', b'"userText"', b'"timestamps"', b'"sinkJob"', b'"messageBody"', b"calc", b"gather",
    b'"to_slot"', b"x",
]
hostile_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(b"".join),
)
any_text = st.text(st.characters(exclude_categories=()), max_size=20)  # NUL and lone surrogates included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=20,
)
TASK_EXEC_KEYS = ["statusCode", "inputBytes", "outputBytes", "inputFiles", "outputFiles", "userText",
                  "timestamps", "sinkJob", "messageBody"]
task_exec_objects = st.dictionaries(st.sampled_from(TASK_EXEC_KEYS) | any_text, json_values, max_size=8)
emit_records = st.dictionaries(st.sampled_from(["kind", "body", "headers", "module", "text"]) | any_text,
                               st.sampled_from(["task", "finish"]) | json_values, max_size=5)


def storable(text: object, what: str) -> None:
    assert isinstance(text, str), (what, text)
    text.encode("utf-8")  # no lone surrogate
    assert "\x00" not in text, what


def storable_json(value: object, what: str) -> None:
    """Every key and string of a JSON value is storable, and the whole is strict JSON."""
    storable(json.dumps(value, ensure_ascii=False, allow_nan=False), what)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            storable(item, what)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def assert_storable(report: ExecReport, max_messages: int = 100_000) -> None:
    """What the slot hands to PostgreSQL: every text valid UTF-8 without NUL, numbers in range."""
    assert report.status is None or 0 <= report.status <= 255
    for size in (report.input_bytes, report.output_bytes):
        assert size is None or (isinstance(size, int) and 0 <= size < 2**63)
    assert len(report.messages) <= max_messages
    for message in report.messages:
        assert isinstance(message, Message)
        storable(message.body, "body")
        if message.module is not None:
            storable(message.module, "module")
        storable_json(message.headers, "headers")
    for text in (report.user_text, report.finish_text):
        if text is not None:
            storable(text, "text")
    for name in (*report.input_files, *report.output_files, *report.removed_files):
        storable(name, "file")
    storable_json(report.timestamps, "timestamps")
    for note in (*report.problems, *report.invalid):
        storable(note, "note")
        assert "\n" not in note and len(note.encode()) <= taskexec.MAX_NOTE_BYTES
    assert not any("internal error" in note for note in report.invalid), report.invalid


def collect_files(files: dict[str, bytes], max_messages: int = 100_000) -> ExecReport:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, data in files.items():
            (work / name).write_bytes(data)
        report = collect(work, work / EMIT, MODULES, max_messages=max_messages)
        assert list(work.iterdir()) == []
    assert_storable(report, max_messages)
    return report


@pytest.mark.parametrize("name", FILES)
@SETTINGS
@given(data=hostile_bytes)
def test_any_bytes_in_any_file(name: str, data: bytes) -> None:
    collect_files({name: data})


@SETTINGS
@given(files=st.fixed_dictionaries({}, optional={name: hostile_bytes for name in FILES}),
       max_messages=st.integers(min_value=1, max_value=5))
def test_any_bytes_in_all_files_at_once(files: dict[str, bytes], max_messages: int) -> None:
    collect_files(files, max_messages)


@SETTINGS
@given(data=task_exec_objects | json_values)
def test_any_json_value_as_task_exec_json(data: Any) -> None:
    report = collect_files({taskexec.TASK_EXEC: json.dumps(data).encode()})  # NaN/Infinity included
    if isinstance(data, dict) and data.get("statusCode") in range(256) and not isinstance(data["statusCode"], bool):
        assert report.status == data["statusCode"]


@SETTINGS
@given(records=st.lists(emit_records | json_values, max_size=6))
def test_any_json_records_in_the_emit_buffer(records: list[Any]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    report = collect_files({EMIT: lines})
    assert len(report.messages) + len(report.problems) <= len(records)


@SETTINGS
@given(lines=st.lists(st.text(st.characters(exclude_categories=(), exclude_characters="\n"), max_size=40)
                      | st.builds(lambda b, h: f"{b},{json.dumps(h)}", any_text, json_values), max_size=8))
def test_any_text_lines_in_sink_tasks(lines: list[str]) -> None:
    data = "\n".join(lines).encode("utf-8", "surrogatepass")  # an encoded surrogate is invalid UTF-8
    collect_files({taskexec.SINK_TASKS: data})


@SETTINGS
@given(line=st.text(st.characters(exclude_categories=()), max_size=60)
       | st.builds(lambda b, h: f"{b},{json.dumps(h)}", any_text, json_values))
def test_parse_sink_line_returns_a_message_or_raises_invalid_message(line: str) -> None:
    try:
        message = parse_sink_line(line, MODULES)
    except InvalidMessageError:
        return
    assert isinstance(message, Message)
    storable(message.body, "body")
    json.dumps(message.headers, allow_nan=False)

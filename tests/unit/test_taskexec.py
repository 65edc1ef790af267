"""Parsing of the task-exec files a run leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalebox_hpc.launcher import taskexec
from scalebox_hpc.launcher.taskexec import collect, parse_sink_line
from scalebox_hpc.models import Message

MODULES = {"calc", "gather"}


@pytest.mark.parametrize(("line", "expected"), [
    ("plain body", Message("plain body")),
    ("0000001,168", Message("0000001,168")),
    ('b,{"k": 1}', Message("b", {"k": 1})),
    ("gather,0000001,168", Message("0000001,168", module="gather")),
    ('calc,x,{"to_host": "n1"}', Message("x", {"to_host": "n1"}, module="calc")),
    ("a,{not json", Message("a,{not json")),
    ('x,{"a":1},{"b":2}', Message('x,{"a":1}', {"b": 2})),
])
def test_sink_lines(line: str, expected: Message) -> None:
    assert parse_sink_line(line, MODULES) == expected


def test_collect_reads_and_removes_every_file(tmp_path: Path) -> None:
    (tmp_path / "out.dat").write_bytes(b"x" * 1000)
    (tmp_path / "in.dat").write_bytes(b"y" * 10)
    (tmp_path / "task-exec.json").write_text(json.dumps({
        "statusCode": 0, "inputFiles": ["in.dat"], "outputFiles": ["out.dat", "missing"],
        "userText": "from json", "sinkJob": "gather", "messageBody": "m1",
    }))
    (tmp_path / "timestamps.txt").write_text("2026-01-01T00:00:00,start\n2026-01-01T00:00:01\n")
    (tmp_path / "user-file.txt").write_text("user notes")
    (tmp_path / "sink-tasks.txt").write_text("s1\ncalc,s2\n\n")
    emit = tmp_path / "emit.jsonl"
    emit.write_text(json.dumps({"kind": "task", "body": "e1", "headers": {"h": "v"}, "module": None}) + "\n"
                    + json.dumps({"kind": "finish", "text": "done!"}) + "\n")
    report = collect(tmp_path, emit, MODULES)
    assert (report.input_bytes, report.output_bytes) == (10, 1000)
    assert report.user_text == "from json\nuser notes"
    assert report.timestamps == [{"time": "2026-01-01T00:00:00", "label": "start"}, {"time": "2026-01-01T00:00:01"}]
    assert report.messages == [Message("m1", module="gather"), Message("s1"), Message("s2", module="calc"),
                               Message("e1", {"h": "v"})]
    assert report.finish_text == "done!" and report.problems == []
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out.dat", "in.dat"}


def test_malformed_files_become_problems_not_silence(tmp_path: Path) -> None:
    (tmp_path / "task-exec.json").write_text("{broken")
    (tmp_path / "sink-tasks.txt").write_text("ok\nbad\x00body\n")
    emit = tmp_path / "emit.jsonl"
    emit.write_text("not json\n")
    report = collect(tmp_path, emit, MODULES)
    assert report.messages == [Message("ok")]
    # a task-exec.json that is not JSON is output of the wrong shape (-103), the rest are messages (-102)
    assert len(report.problems) == 2 and len(report.invalid) == 1
    assert any("sink-tasks.txt:2" in p for p in report.problems)
    assert report.invalid[0].startswith("task-exec.json: not JSON")


def test_absent_files_give_an_empty_report(tmp_path: Path) -> None:
    report = collect(tmp_path, tmp_path / "none.jsonl", MODULES)
    assert report == taskexec.ExecReport()

"""`scalebox metrics` output without a database: the families built from query rows, the text
format (escaping) read back by the official parser, and the atomic write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from scalebox_hpc.report import metrics


def parse(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(s.name, dict(s.labels), s.value) for s in fam.samples]
        out[fam.name + ":type"] = [(fam.type, {}, 0)]
    return out


@given(st.text())
def test_any_label_value_reads_back(value: str) -> None:
    f = metrics.Family("scalebox_x", "gauge", "help with \\ and\nnewline")
    f.add(1, module=value, host="h")
    [fam] = text_string_to_metric_families(metrics.render([f]))
    [sample] = fam.samples
    assert sample.labels == {"module": value, "host": "h"}
    assert fam.documentation == "help with \\ and\nnewline"


def test_values() -> None:
    assert metrics.format_value(3) == "3" and metrics.format_value(0.5) == "0.5"
    assert metrics.format_value(float("nan")) == "NaN" and metrics.format_value(float("inf")) == "+Inf"
    assert metrics.escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def _rows() -> tuple[list[dict[str, object]], ...]:
    apps = [{"id": 3, "name": 'we"ird\\app\n', "status": "RUNNING"}]
    tasks = [
        {"app_id": 3, "module": "calc", "status": 0, "n": 8, "last_minute": 6, "oldest_ready_age": 12.5},
        {"app_id": 3, "module": "calc", "status": 1, "n": 2, "last_minute": 0, "oldest_ready_age": 12.5},
        {"app_id": 3, "module": "calc", "status": -1, "n": 4, "last_minute": 0, "oldest_ready_age": 12.5},
        {"app_id": 3, "module": "calc", "status": -3, "n": 1, "last_minute": 0, "oldest_ready_age": 12.5},
        {"app_id": 3, "module": "idle", "status": None, "n": 0, "last_minute": 0, "oldest_ready_age": None},
    ]
    execs = [{"app_id": 3, "module": "calc", "status": 0, "n": 8, "seconds": 4.0},
             {"app_id": 3, "module": "calc", "status": 1, "n": 3, "seconds": 1.5}]
    slots = [{"app_id": 3, "module": "calc", "host": "h1", "status": "RUNNING", "n": 2, "live": 2},
             {"app_id": 3, "module": "calc", "host": "h1", "status": "LOST", "n": 1, "live": 0}]
    jobs = [{"app_id": 3, "module": "calc", "state": "RUNNING", "n": 1}]
    return apps, tasks, execs, slots, jobs


def test_families_from_rows() -> None:
    apps, tasks, execs, slots, jobs = _rows()
    got = parse(metrics.render(metrics.families(apps, tasks, execs, slots, jobs, now=1e9)))
    lab = {"app": "3", "module": "calc"}
    assert ("scalebox_tasks", {**lab, "status": "ready"}, 4) in got["scalebox_tasks"]
    assert ("scalebox_tasks", {**lab, "status": "exit_1"}, 2) in got["scalebox_tasks"]
    assert got["scalebox_tasks_created:type"][0][0] == "counter"
    assert ("scalebox_tasks_created_total", lab, 15) in got["scalebox_tasks_created"]
    assert ("scalebox_tasks_created_total", {"app": "3", "module": "idle"}, 0) in got["scalebox_tasks_created"]
    assert ("scalebox_tasks_finished_total", {**lab, "outcome": "failed"}, 2) in got["scalebox_tasks_finished"]
    assert ("scalebox_queue_depth", lab, 4) in got["scalebox_queue_depth"]
    assert ("scalebox_oldest_ready_age_seconds", lab, 12.5) in got["scalebox_oldest_ready_age_seconds"]
    assert ("scalebox_tasks_finished_recent_per_second", lab, 0.1) in got["scalebox_tasks_finished_recent_per_second"]
    assert ("scalebox_task_executions_total", {**lab, "status": "exit_1"}, 3) in got["scalebox_task_executions"]
    assert ("scalebox_task_execution_seconds_total", lab, 5.5) in got["scalebox_task_execution_seconds"]
    assert ("scalebox_live_slots", {**lab, "host": "h1"}, 2) in got["scalebox_live_slots"]
    assert ("scalebox_slots", {**lab, "host": "h1", "status": "lost"}, 1) in got["scalebox_slots"]
    assert ("scalebox_stage_jobs", {**lab, "state": "running"}, 1) in got["scalebox_stage_jobs"]
    [info] = got["scalebox_app_info"]
    assert info[1] == {"app": "3", "name": 'we"ird\\app\n', "status": "RUNNING"}


def test_no_apps_is_still_valid() -> None:
    text = metrics.render(metrics.families([], [], [], [], [], now=5))
    assert parse(text)["scalebox_metrics_generated_timestamp_seconds"] == [
        ("scalebox_metrics_generated_timestamp_seconds", {}, 5)]


def test_write_atomically(tmp_path: Path) -> None:
    target = tmp_path / "scalebox.prom"
    target.write_text("old\n")
    metrics.write_atomically(target, "new\n")
    assert target.read_text() == "new\n" and oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scalebox.prom"]  # no temporary file left


def test_write_atomically_leaves_the_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "scalebox.prom"
    target.write_text("old\n")

    def refuse(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        metrics.write_atomically(target, "new\n")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["scalebox.prom"]

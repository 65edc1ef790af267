"""The log formats the entry points install (scalebox_hpc.logs): JSON lines that carry a record's extras."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from scalebox_hpc import logs
from scalebox_hpc.errors import InvalidValueError
from scalebox_hpc.settings import Settings


def record(msg: str, *args: object, extra: dict[str, object] | None = None,
           exc_info: bool = False) -> logging.LogRecord:
    """A record as ``logger.warning(msg, *args, extra=extra)`` makes it."""
    info = sys.exc_info() if exc_info else None
    return logging.getLogger("scalebox_hpc.test").makeRecord(
        "scalebox_hpc.test", logging.WARNING, __file__, 1, msg, args, info, extra=extra)


def test_json_line_parses_and_carries_the_facts_and_the_extras() -> None:
    line = logs.JsonFormatter().format(record("task %s: lease expired, now %s", 7, "READY",
                                              extra={"action": "lease_expired", "task_id": 7, "host": "n1"}))
    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == "task 7: lease expired, now READY"
    assert data["level"] == "WARNING"
    assert data["logger"] == "scalebox_hpc.test"
    assert data["ts"].endswith("+00:00")
    assert {k: data[k] for k in ("action", "task_id", "host")} == {"action": "lease_expired", "task_id": 7,
                                                                    "host": "n1"}


def test_plain_records_have_no_extras() -> None:
    assert logs.record_extras(record("plain")) == {}
    assert set(json.loads(logs.JsonFormatter().format(record("plain")))) == {"ts", "level", "logger", "msg",
                                                                             "thread"}


def test_values_json_cannot_hold_are_text_and_fixed_keys_win() -> None:
    data = json.loads(logs.JsonFormatter().format(record("x", extra={"path": logs, "level": "mine",
                                                                     "argv": ["sacct", "-X"]})))
    assert data["path"].startswith("<module 'scalebox_hpc.logs'")
    assert data["level"] == "WARNING"
    assert data["argv"] == ["sacct", "-X"]


def test_a_traceback_stays_inside_the_one_line() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        line = logs.JsonFormatter().format(record("failed", exc_info=True))
    assert "\n" not in line
    assert "RuntimeError: boom" in json.loads(line)["exc"]


def test_the_format_comes_from_the_option_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_chosen", None)
    assert logs.chosen_format(None) == "text"
    assert logs.chosen_format(Settings.from_environ({logs.LOG_FORMAT_ENV: " JSON "}).log_format) == "json"
    assert logs.chosen_format(" JSON ") == "json"
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "json")  # read by the roots (settings, --log-format), not here
    assert logs.chosen_format() == "text"
    logs.use_format("text")
    assert logs.chosen_format("json") == "text"
    assert isinstance(logs.formatter("json"), logs.JsonFormatter)
    assert not isinstance(logs.formatter("text"), logs.JsonFormatter)


def test_an_unknown_format_is_an_error_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_chosen", None)
    with pytest.raises(InvalidValueError, match="log format 'xml' is not one of text, json") as exc:
        logs.chosen_format("xml")
    assert "SCALEBOX_LOG_FORMAT" in exc.value.hint


# -- the text line carries the extras too -------------------------------------------------------
def text(msg: str, *args: object, extra: dict[str, object] | None = None, exc_info: bool = False) -> str:
    return logs.TextFormatter(logs.TEXT_FORMAT).format(record(msg, *args, extra=extra, exc_info=exc_info))


def test_the_text_line_ends_with_the_extras_as_key_value_pairs() -> None:
    line = text("sacct failed: %s", "connection refused",
                extra={"action": "slurm_sacct_failed", "returncode": 1, "argv": ["sacct", "-X"]})
    assert line.endswith(" WARNING scalebox_hpc.test [MainThread] sacct failed: connection refused "
                         'action=slurm_sacct_failed returncode=1 argv=["sacct","-X"]'), line


def test_text_values_that_could_be_misread_are_quoted() -> None:
    line = text("x", extra={"stderr": 'a b="c"', "empty": "", "path": Path("/w/app-1"), "none": None,
                            "eq": "k=v", "nl": "one\ntwo"})
    assert line.endswith(' x stderr="a b=\\"c\\"" empty="" path=/w/app-1 none=null eq="k=v" nl="one\\ntwo"'), line
    assert "\n" not in line


def test_a_plain_text_line_is_unchanged_and_a_traceback_follows_the_pairs() -> None:
    assert text("plain %s", 1).endswith("[MainThread] plain 1")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        line = text("failed", extra={"task_id": 7}, exc_info=True)
    first, *rest = line.splitlines()
    assert first.endswith("failed task_id=7") and rest[0] == "Traceback (most recent call last):"


def test_the_roots_install_the_text_formatter() -> None:
    assert type(logs.formatter("text")) is logs.TextFormatter
    assert type(logs.formatter("json")) is logs.JsonFormatter

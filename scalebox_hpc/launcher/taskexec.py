"""The task-exec files a run leaves in its work dir, read (then removed) after every run.

- ``task-exec.json``: ``statusCode``, ``inputBytes``, ``outputBytes``, ``inputFiles``, ``outputFiles``
  (sizes computed), ``userText``, ``timestamps``, ``sinkJob`` + ``messageBody``;
- ``timestamps.txt``: ``time[,label]`` per line;
- ``user-file.txt``: free text kept with the execution;
- ``sink-tasks.txt``: ``body`` | ``body,{headers}`` | ``module,body[,{headers}]`` per line;
- ``output-files.txt`` / ``removed-files.txt``: one path per line, files the run created in /
  removed from the node-local scratch (kept in the scratch index for location-aware dispatch);
- the emit buffer (JSON lines) that ``scalebox task add`` / ``send-message`` /
  ``scalebox app set-finished`` write while run.sh runs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.models import Message

logger = logging.getLogger(__name__)

TASK_EXEC = "task-exec.json"
TIMESTAMPS = "timestamps.txt"
USER_FILE = "user-file.txt"
SINK_TASKS = "sink-tasks.txt"
OUTPUT_FILES = "output-files.txt"
REMOVED_FILES = "removed-files.txt"
EMIT_BUFFER_ENV = "SCALEBOX_EMIT_FILE"


@dataclass
class ExecReport:
    """What the task-exec files said about one run."""

    status: int | None = None
    input_bytes: int | None = None
    output_bytes: int | None = None
    input_files: list[str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)
    user_text: str | None = None
    timestamps: list[dict[str, Any]] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    finish_text: str | None = None
    problems: list[str] = field(default_factory=list)
    """Malformed lines or files, reported in the execution's stderr, never silently dropped."""
    invalid: list[str] = field(default_factory=list)
    """Task-exec output of the wrong shape, type, size or kind: the task becomes -103."""


def _split_headers(line: str) -> tuple[str, dict[str, Any] | None]:
    """Split a trailing ``,{json}`` headers object off a line, when it parses as an object."""
    pos = line.rfind(",{")
    while pos >= 0:
        try:
            headers = json.loads(line[pos + 1:])
        except ValueError:
            pos = line.rfind(",{", 0, pos)
            continue
        if isinstance(headers, dict):
            return line[:pos], headers
        pos = line.rfind(",{", 0, pos)
    return line, None


def parse_sink_line(line: str, modules: Collection[str]) -> Message:
    """One sink-tasks.txt line; the module form applies when the first field names a module."""
    text, headers = _split_headers(line)
    module: str | None = None
    head, sep, rest = text.partition(",")
    if sep and head in modules:
        module, text = head, rest
    return Message(body=text, headers=headers or {}, module=module)


HostPath = Callable[[str], str | None]
"""A reported path → its host path (None: only the container has it); see ``Session.host_path``."""


def _sizes(work_dir: Path, files: list[str], host_path: HostPath | None) -> int:
    total = 0
    for name in files:
        where = host_path(name) if host_path is not None else name
        if where is None:
            continue
        path = Path(where) if os.path.isabs(where) else work_dir / where
        try:
            total += path.stat().st_size
        except OSError:
            continue
    return total


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    finally:
        path.unlink(missing_ok=True)


def _parse_task_exec(text: str, work_dir: Path, report: ExecReport, host_path: HostPath | None) -> None:
    try:
        data = json.loads(text)
    except ValueError as exc:
        report.problems.append(f"{TASK_EXEC}: not JSON ({exc})")
        return
    if not isinstance(data, dict):
        report.problems.append(f"{TASK_EXEC}: not a JSON object")
        return
    if isinstance(data.get("statusCode"), int):
        report.status = data["statusCode"]
    report.input_files = [str(f) for f in data.get("inputFiles") or []]
    report.output_files = [str(f) for f in data.get("outputFiles") or []]
    report.input_bytes = _int_or(data.get("inputBytes"), _sizes(work_dir, report.input_files, host_path))
    report.output_bytes = _int_or(data.get("outputBytes"), _sizes(work_dir, report.output_files, host_path))
    if data.get("userText") is not None:
        report.user_text = str(data["userText"])
    for stamp in data.get("timestamps") or []:
        report.timestamps.append(stamp if isinstance(stamp, dict) else {"time": str(stamp)})
    if data.get("messageBody") is not None:
        report.messages.append(Message(body=str(data["messageBody"]), module=data.get("sinkJob") or None))


def _int_or(value: Any, fallback: int) -> int | None:
    if isinstance(value, int):
        return value
    return fallback if fallback else None


def _parse_timestamps(text: str, report: ExecReport) -> None:
    for line in text.splitlines():
        if line.strip():
            time, _, label = line.strip().partition(",")
            report.timestamps.append({"time": time, "label": label} if label else {"time": time})


def _parse_sink_tasks(text: str, modules: Collection[str], report: ExecReport) -> None:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            report.messages.append(parse_sink_line(line, modules))
        except InvalidMessageError as exc:
            report.problems.append(f"{SINK_TASKS}:{n}: {exc}")


def _parse_emit_buffer(text: str, report: ExecReport) -> None:
    for n, line in enumerate(text.splitlines(), 1):
        try:
            item = json.loads(line)
            if item.get("kind") == "finish":
                report.finish_text = str(item["text"])
            else:
                report.messages.append(
                    Message(body=item["body"], headers=item.get("headers") or {}, module=item.get("module"))
                )
        except (ValueError, KeyError, TypeError, AttributeError, InvalidMessageError) as exc:
            report.problems.append(f"emitted message {n}: {exc}")


def collect(
    work_dir: Path, emit_file: Path, modules: Collection[str], host_path: HostPath | None = None,
    *, max_messages: int = 100_000,
) -> ExecReport:
    """Read and remove the task-exec files of the run that just ended. ``host_path`` maps the
    paths a containerised run wrote (``/work/x``, ``/local/x``) to the host, for the sizes;
    the file lists are kept as the run wrote them."""
    report = ExecReport()
    text = _read_text(work_dir / TASK_EXEC)
    if text is not None:
        _parse_task_exec(text, work_dir, report, host_path)
    text = _read_text(work_dir / TIMESTAMPS)
    if text is not None:
        _parse_timestamps(text, report)
    text = _read_text(work_dir / USER_FILE)
    if text is not None:
        report.user_text = (report.user_text + "\n" + text) if report.user_text else text
    text = _read_text(work_dir / SINK_TASKS)
    if text is not None:
        _parse_sink_tasks(text, modules, report)
    text = _read_text(emit_file)
    if text is not None:
        _parse_emit_buffer(text, report)
    for name, into in ((OUTPUT_FILES, report.output_files), (REMOVED_FILES, report.removed_files)):
        text = _read_text(work_dir / name)
        if text is not None:
            into.extend(line.strip() for line in text.splitlines() if line.strip())
    return report

"""`scalebox task add --file` as a user runs it: many lines by COPY, errors with the line
number and nothing added, blank lines skipped, and inside run.sh the emit buffer (all or none)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.acceptance.test_cli import sbx
from tests.helpers import write_app

pytestmark = pytest.mark.pg

APP = """
name: bulk
modules:
  a: {}
  b:
    arguments: {conflict_action: IGNORE}
"""


@pytest.fixture
def app_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    app = write_app(tmp_path / "app", APP, {"a/run.sh": "true\n", "b/run.sh": "true\n"})
    app_id = sbx(cli_env, "app", "create", str(app)).stdout.strip()
    return dict(cli_env, SCALEBOX_APP_ID=app_id)


def _tasks(env: dict[str, str], module: str) -> list[dict[str, object]]:
    return json.loads(sbx(env, "task", "list", "-m", module, "-n", "100000", "--json").stdout)


def test_a_file_of_many_lines_goes_in_in_order(app_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "bodies.txt"
    path.write_text("".join(f"f{i}\n" for i in range(5000)) + "\n  \n  spaced \r\n", encoding="utf-8")
    proc = sbx(app_env, "task", "add", "-H", "k=v", "--file", str(path), "first")
    assert proc.stdout.strip() == "added 5002 task(s)"
    tasks = _tasks(app_env, "a")
    assert [t["body"] for t in tasks] == ["first", *(f"f{i}" for i in range(5000)), "  spaced "]
    assert all(t["headers"] == {"k": "v"} for t in tasks)
    # IGNORE: a second submit of the same file adds only what is new
    path.write_text("f1\nf2\nnew\nnew\n", encoding="utf-8")
    assert sbx(app_env, "task", "add", "-m", "b", "--file", str(path)).stdout.strip() == "added 3 task(s)"
    assert sbx(app_env, "task", "add", "-m", "b", "--file", str(path)).stdout.strip() == "added 0 task(s)"


def test_a_bad_line_adds_nothing_and_says_where(app_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "bodies.txt"
    cases = {
        b"ok1\nok2\nok1\n": "line 3: body 'ok1' repeats line 1 (CONFLICT_ACTION=FAIL)",
        b"ok1\n\nnul\x00byte\n": "line 3: task body contains a NUL byte",
        b"ok1\nok2\n\xff\xfe\n": "line 3 is not UTF-8 text (invalid start byte at byte 8)",
    }
    for data, message in cases.items():
        path.write_bytes(data)
        proc = sbx(app_env, "task", "add", "--file", str(path), check=False)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith(f"scalebox: error: {path} {message}"), proc.stderr
        assert "Traceback" not in proc.stderr
    assert _tasks(app_env, "a") == []
    path.write_text("\n \n\t\n", encoding="utf-8")
    proc = sbx(app_env, "task", "add", "--file", str(path), check=False)
    assert proc.returncode == 2 and "every line is blank" in proc.stderr


def test_inside_run_sh_a_file_goes_to_the_emit_buffer_whole(app_env: dict[str, str], tmp_path: Path) -> None:
    buffer = tmp_path / "emit.jsonl"
    buffer.write_text('{"kind": "task", "body": "earlier", "headers": {}, "module": null}\n', encoding="utf-8")
    env = dict(app_env, SCALEBOX_EMIT_FILE=str(buffer))
    path = tmp_path / "bodies.txt"
    path.write_text("".join(f"e{i}\n" for i in range(3000)), encoding="utf-8")
    sbx(env, "task", "add", "-m", "b", "-H", "x=1", "--file", str(path), "argv")
    records = [json.loads(line) for line in buffer.read_text(encoding="utf-8").splitlines()]
    assert [r["body"] for r in records] == ["earlier", "argv", *(f"e{i}" for i in range(3000))]
    assert records[1] == {"kind": "task", "body": "argv", "headers": {"x": "1"}, "module": "b"}
    before = buffer.read_bytes()
    path.write_bytes(b"fine\n" * 100 + b"bad\x00\n")
    proc = sbx(env, "task", "add", "--file", str(path), check=False)
    assert proc.returncode == 1 and "line 101: task body contains a NUL byte" in proc.stderr
    assert buffer.read_bytes() == before  # all or none
    assert not [p for p in os.listdir(tmp_path) if p.startswith("tmp")]  # no scratch file left

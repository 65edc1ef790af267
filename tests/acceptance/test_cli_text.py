"""Task-controlled text through the real `scalebox` command (audit F24): rich markup in a result is
shown literally, and terminal escapes in a task's output never reach the viewer's terminal."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import write_app

pytestmark = pytest.mark.pg

SCALEBOX = [sys.executable, "-m", "scalebox_hpc"]


def sbx(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SCALEBOX, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"scalebox {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def on_terminal(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, bytes]:
    """`scalebox ARGS` with a pseudo-terminal as stdout and stderr, as a user would see it (click
    strips some escapes itself when the output is not a terminal): (exit code, bytes written)."""
    leader, follower = os.openpty()
    with subprocess.Popen([*SCALEBOX, *args], env=env, stdin=subprocess.DEVNULL, stdout=follower,
                          stderr=follower) as proc:
        os.close(follower)
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=10)
    os.close(leader)
    return code, b"".join(chunks)


def test_markup_in_a_result_is_shown_literally(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "r", "name: r\nmodules:\n  a: {}\n", {"a/run.sh": "true\n"})
    app_id = sbx(cli_env, "app", "create", str(app)).stdout.strip()
    sbx(cli_env, "app", "set-finished", "--app", app_id, "[/] result")
    status = sbx(cli_env, "status", app_id)
    assert "[/] result" in status.stdout and "Traceback" not in status.stderr
    assert "[/] result" in sbx(cli_env, "app", "list").stdout
    assert "result: [/] result" in sbx(cli_env, "app", "show", app_id).stdout
    assert json.loads(sbx(cli_env, "status", app_id, "--json").stdout)["app"]["result"] == "[/] result"


def test_terminal_escapes_in_task_output_are_stripped(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "e", """
        name: e
        modules:
          a:
            arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2}
    """, {"a/run.sh": r"""
        printf 'before \033]0;pwned\007 red:\033[31mRED\033[0m after\n'
        printf 'err \033[2J\033]52;c;Y2xpcA==\007 end\n' >&2
        scalebox app set-finished "$(printf '[bold]done[/] \033[5m')"
    """})
    app_id = sbx(cli_env, "app", "create", str(app)).stdout.strip()
    sbx(cli_env, "task", "add", "--app", app_id, "--", "body \x1b[1mB\x1b[0m \x1b]0;title\x07")
    sbx(cli_env, "launcher", "--app", app_id, "--slots", "1")
    [task] = json.loads(sbx(cli_env, "task", "list", "--app", app_id, "--json").stdout)
    shown = json.loads(sbx(cli_env, "task", "show", str(task["id"]), "--json").stdout)
    assert shown["status"] == 0, shown
    # the data is kept as the task wrote it: only its display is cleaned
    assert "\x1b]0;pwned\x07" in shown["execs"][0]["stdout"] and "\x1b[31m" in shown["execs"][0]["stdout"]

    code, out = on_terminal(cli_env, "task", "show", str(task["id"]))
    assert code == 0, out
    assert b"\x1b" not in out and b"\x07" not in out, out
    text = out.decode()
    assert "before  red:RED after" in text and "err  end" in text and "body B " in text, text
    assert "pwned" not in text

    code, out = on_terminal(cli_env, "task", "list", "--app", app_id)
    assert code == 0 and b"\x1b" not in out and b"body B" in out, out
    code, out = on_terminal(cli_env, "app", "list")
    assert code == 0 and b"\x1b" not in out and b"[bold]done[/]" in out, out

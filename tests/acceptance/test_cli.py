"""`scalebox` run as a subprocess, like a user would, against a real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_app

pytestmark = pytest.mark.pg

REPO = Path(__file__).resolve().parents[2]
SCALEBOX = [sys.executable, "-m", "scalebox_hpc"]


def sbx(env: dict[str, str], *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SCALEBOX, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"scalebox {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_app_primes_end_to_end(cli_env: dict[str, str]) -> None:
    proc = sbx(cli_env, "run", str(REPO / "examples/app-primes/app.yaml"))
    assert proc.stdout.strip().splitlines()[-1] == "Result is 1229"
    status = json.loads(sbx(cli_env, "status", "--json").stdout)
    by_module = {m["module"]: m for m in status["modules"]}
    assert by_module["calc"]["ok"] == 10 and by_module["gather"]["ok"] == 10
    assert all(m["failed"] == 0 for m in status["modules"])


def test_app_primes_settable_from_env(cli_env: dict[str, str]) -> None:
    env = dict(cli_env, NUM_GROUPS="4", LENGTH="25")
    proc = sbx(env, "run", str(REPO / "examples/app-primes/app.yaml"))
    assert proc.stdout.strip().splitlines()[-1] == "Result is 25"  # primes below 100


def test_hello_scalebox(cli_env: dict[str, str]) -> None:
    proc = sbx(cli_env, "run", str(REPO / "examples/hello-scalebox/app.yaml"))
    assert "Hello scalebox, it is OK!" in proc.stdout
    [task] = json.loads(sbx(cli_env, "task", "list", "--json").stdout)
    shown = json.loads(sbx(cli_env, "task", "show", str(task["id"]), "--json").stdout)
    assert "Input message:scalebox" in shown["execs"][0]["stdout"]


def test_metacharacters_reach_run_sh_verbatim(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "meta", """
        name: meta
        modules:
          echo:
            arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2}
    """, {"echo/run.sh": 'printf "%s" "$1" > "$WORK_DIR/body-$(printf %s "$1" | sha256sum | cut -c1-16)"\n'
                         'printf "%s" "$2" >> "$WORK_DIR/headers.log"\n'})
    app_id = sbx(cli_env, "app", "create", str(app)).stdout.strip()
    nasty = ["$(touch /tmp/pwned)", "a b; rm -rf /", "`id`", "'\"", "*", "line1\nline2", "-n", "--help",
             "ünïcödé ✓", "a|b&c>d<e"]
    for body in nasty:
        sbx(cli_env, "task", "add", "--app", app_id, "-H", "k=$(id);`x`", "--", body)
    sbx(cli_env, "launcher", "--app", app_id, "--slots", "1")
    rows = json.loads(sbx(cli_env, "task", "list", "--app", app_id, "--json").stdout)
    assert sorted(r["body"] for r in rows) == sorted(nasty)
    assert all(r["status"] == 0 for r in rows), rows
    work = next(Path(cli_env["SCALEBOX_WORK_ROOT"]).rglob("headers.log")).parent
    seen = sorted(p.read_text() for p in work.glob("body-*"))
    assert seen == sorted(nasty)
    assert not Path("/tmp/pwned").exists()
    assert '"k": "$(id);`x`"' in (work / "headers.log").read_text()


def test_bad_pipeline_files_create_nothing(cli_env: dict[str, str], tmp_path: Path) -> None:
    good = {"a/run.sh": "true\n", "b/run.sh": "true\n"}
    cases = {
        "unknown-sink": ("name: x\nmodules:\n  a:\n    sink_modules: [bb]\n  b: {}\n", "did you mean 'b'"),
        "malformed": ("name: x\nmodules:\n  a: [\n", "app.yaml:"),
        "duplicate": ("name: x\nmodules:\n  a: {}\n  a: {}\n", "duplicate"),
        "no-run-sh": ("name: x\nmodules:\n  zz: {}\n", "run.sh"),
        "unknown-key": ("name: x\nmodules:\n  a:\n    sink_moduls: [b]\n  b: {}\n", "sink_modules"),
    }
    for name, (text, expected) in cases.items():
        app = write_app(tmp_path / name, text, good)
        proc = sbx(cli_env, "app", "create", str(app), check=False)
        assert proc.returncode != 0, name
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and "Traceback" not in proc.stderr, (name, proc.stderr)
    assert json.loads(sbx(cli_env, "app", "list", "--json").stdout) == []


def test_unreachable_database_is_one_line_without_password(cli_env: dict[str, str]) -> None:
    env = dict(cli_env, SCALEBOX_DSN="postgresql://alice:topsecret@127.0.0.1:9/scalebox")
    proc = sbx(env, "app", "list", check=False)
    assert proc.returncode == 1
    warning, *lines = proc.stderr.strip().splitlines()
    assert warning.startswith("warning: SCALEBOX_DSN holds a password") and len(lines) == 1, proc.stderr
    assert "127.0.0.1:9/scalebox" in lines[0] and "topsecret" not in proc.stderr and "hint:" in lines[0]
    quiet = sbx(dict(env, SCALEBOX_DSN_PASSWORD_OK="1"), "app", "list", check=False)
    assert len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr


def test_bad_task_bodies(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "b", "name: b\nmodules:\n  a: {}\n", {"a/run.sh": "true\n"})
    app_id = sbx(cli_env, "app", "create", str(app)).stdout.strip()
    # non-UTF-8 argv bytes
    proc = subprocess.run([*SCALEBOX, "task", "add", "--app", app_id, b"\xff\xfe".decode("utf-8", "surrogateescape")],
                          env=cli_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "UTF-8" in proc.stderr
    # 1 MiB body: refused with the reason, nothing stored
    big = tmp_path / "big.txt"
    big.write_text("x" * (1024 * 1024) + "\n")
    proc = sbx(cli_env, "task", "add", "--app", app_id, "--file", str(big), check=False)
    assert proc.returncode == 1 and "limit" in proc.stderr
    # unknown module
    proc = sbx(cli_env, "task", "add", "--app", app_id, "-m", "nope", "x", check=False)
    assert proc.returncode == 1 and "module 'nope' not found" in proc.stderr
    assert json.loads(sbx(cli_env, "task", "list", "--app", app_id, "--json").stdout) == []


def test_failed_tasks_make_run_exit_nonzero(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "f", """
        name: f
        parameters: {start_task: go}
        modules:
          a: {}
    """, {"a/run.sh": "echo failing >&2\nexit 3\n"})
    proc = sbx(cli_env, "run", str(app), check=False)
    assert proc.returncode == 1 and "1 failed" in proc.stderr
    [task] = json.loads(sbx(cli_env, "task", "list", "--json").stdout)
    assert task["status"] == 3
    shown = json.loads(sbx(cli_env, "task", "show", str(task["id"]), "--json").stdout)
    assert shown["execs"][0]["stderr"] == "failing\n"

"""A bare run started with posix_spawn (runtime/spawn.py) gets what Popen gave it: its session,
cwd, environment (exactly), stdin from /dev/null, output files, no other descriptor, SIGPIPE at
its default, argv[0] looked up in the run's PATH; a start failure is a ScriptError as before
(real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from scalebox_hpc.errors import ScriptError
from scalebox_hpc.runtime import spawn
from scalebox_hpc.runtime.local import popen, start_process

pytestmark = pytest.mark.skipif(not spawn.available(), reason="this C library has no posix_spawn closefrom")

PROBE = r"""
echo "sid=$(ps -o sid= -p $$ | tr -d ' ') pgid=$(ps -o pgid= -p $$ | tr -d ' ') pid=$$"
echo "cwd=$(pwd)"
echo "stdin=$(readlink /proc/$$/fd/0)"
echo "fds=$(ls /proc/$$/fd | sort -n | tr '\n' ' ')"
echo "sigign=$(grep SigIgn /proc/$$/status | cut -f2)"
env | sort > env.txt
echo oops >&2
"""


def probe(tmp_path: Path, start: object) -> tuple[dict[str, str], str, str]:
    work = tmp_path / "work"
    work.mkdir(parents=True)
    script = tmp_path / "probe.sh"
    script.write_text(PROBE)
    env = {"PATH": os.environ["PATH"], "ONLY": "this", "SPACE": "a b=c"}
    proc = start(["sh", str(script), "arg"], cwd=work, env=env,  # type: ignore[operator]
                 stdout_path=tmp_path / "out", stderr_path=tmp_path / "err")
    assert proc.wait() == 0
    said = dict(line.split("=", 1) for line in (tmp_path / "out").read_text().splitlines())
    env_seen = (work / "env.txt").read_text()
    return said, env_seen, (tmp_path / "err").read_text()


def test_a_spawned_run_gets_what_a_popen_run_got(tmp_path: Path) -> None:
    leaked = os.open(os.devnull, os.O_RDONLY)  # inheritable: neither start may pass it on
    os.set_inheritable(leaked, True)
    try:
        (said, env_seen, err), (p_said, p_env, p_err) = (probe(tmp_path / "a", start_process),
                                                         probe(tmp_path / "b", popen))
    finally:
        os.close(leaked)
    sid, pgid, pid = (part.split("=")[1] for part in f"sid={said['sid']}".split())
    assert sid == pgid == pid  # a session (and process group) of its own
    assert said["cwd"] == str(tmp_path / "a" / "work")
    assert said["stdin"] == "/dev/null" == p_said["stdin"]
    assert said["fds"] == p_said["fds"]  # 0 1 2 and the one ls opens itself
    assert said["sigign"] == p_said["sigign"]
    # exactly the run's environment (sh adds PWD and the like in both)
    assert env_seen.replace("/a/work", "/b/work") == p_env
    assert "ONLY=this" in env_seen and "SPACE=a b=c" in env_seen
    assert err == p_err == "oops\n"


def test_sigpipe_is_at_its_default(tmp_path: Path) -> None:
    proc = start_process(["sh", "-c", "yes | head -1"], cwd=tmp_path, env={"PATH": os.environ["PATH"]},
                         stdout_path=tmp_path / "out", stderr_path=tmp_path / "err")
    assert proc.wait() == 0
    assert (tmp_path / "err").read_text() == ""  # `yes` died of SIGPIPE quietly, no "Broken pipe"
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # the launcher's own stays


def test_argv0_is_looked_up_in_the_runs_path(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "only-here"
    tool.write_text("#!/bin/sh\necho found\n")
    tool.chmod(0o755)
    proc = start_process(["only-here"], cwd=tmp_path, env={"PATH": f"{tmp_path / 'none'}:{bin_dir}"},
                         stdout_path=tmp_path / "out", stderr_path=tmp_path / "err")
    assert proc.wait() == 0 and (tmp_path / "out").read_text() == "found\n"
    with pytest.raises(ScriptError, match="cannot start only-here: No such file or directory"):
        start_process(["only-here"], cwd=tmp_path, env={"PATH": "/nonexistent"},
                      stdout_path=tmp_path / "out", stderr_path=tmp_path / "err")


@pytest.mark.parametrize("mode, reason", [(0o644, "Permission denied"), (0o755, "Exec format error")])
def test_a_start_failure_is_the_script_error_popen_gave(tmp_path: Path, mode: int, reason: str) -> None:
    script = tmp_path / "run.sh"
    script.write_bytes(b"\x7fELF-not-really" if mode == 0o755 else b"#!/bin/sh\n")
    script.chmod(mode)
    for start in (start_process, popen):
        with pytest.raises(ScriptError) as caught:
            start([str(script)], cwd=tmp_path, env={}, stdout_path=tmp_path / "out", stderr_path=tmp_path / "err")
        assert str(caught.value) == f"cannot start {script}: {reason}"


def test_a_missing_cwd_is_a_start_failure(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match="No such file or directory"):
        start_process(["true"], cwd=tmp_path / "gone", env={"PATH": os.environ["PATH"]},
                      stdout_path=tmp_path / "out", stderr_path=tmp_path / "err")


def test_a_nul_in_the_environment_is_refused_as_by_popen(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        start_process(["true"], cwd=tmp_path, env={"PATH": os.environ["PATH"], "X": "a\0b"},
                      stdout_path=tmp_path / "out", stderr_path=tmp_path / "err")


def test_without_posix_spawn_runs_start_with_popen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spawn, "available", lambda: False)
    proc = start_process(["sh", "-c", "echo via-popen"], cwd=tmp_path, env={"PATH": os.environ["PATH"]},
                         stdout_path=tmp_path / "out", stderr_path=tmp_path / "err")
    assert isinstance(proc, subprocess.Popen)
    assert proc.wait() == 0 and (tmp_path / "out").read_text() == "via-popen\n"


def test_the_spawned_process_is_reaped_by_its_run(tmp_path: Path) -> None:
    """LocalRun reaps it with wait4 (its usage): the run's outcome, and no zombie left."""
    from scalebox_hpc.runtime.base import RunSpec
    from scalebox_hpc.runtime.local import LocalRuntime

    run = LocalRuntime().start(RunSpec(argv=["sh", "-c", "exit 7"], cwd=tmp_path, env={"PATH": os.environ["PATH"]},
                                       stdout_path=tmp_path / "out", stderr_path=tmp_path / "err"))
    assert isinstance(run.proc, spawn.Spawned)
    outcome = run.wait(10)
    assert outcome is not None and outcome.returncode == 7 and outcome.usage is not None
    with pytest.raises(ChildProcessError):
        os.waitpid(run.proc.pid, os.WNOHANG)

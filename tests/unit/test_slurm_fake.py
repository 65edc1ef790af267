"""SlurmClient and StatusWatcher against fake ``sbatch``/``squeue``/``sacct``/``scancel``/``scontrol`` on PATH.

The fakes are small bash scripts written into tmp_path; a real ``SubprocessRunner`` finds
them first on the ``PATH`` it passes to its children. Each fake appends its argv to a log
file, which is how the tests count calls. Job states live in files under ``state/``; error
messages are the stderr captured from the real Slurm 22.05 (slurm_fixtures/).
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from scalebox_hpc.slurm.client import SlurmClient
from scalebox_hpc.slurm.commands import SlurmCommandError, SubprocessRunner
from scalebox_hpc.slurm.parse import SlurmState
from scalebox_hpc.slurm.watcher import StatusWatcher

FIXTURES = Path(__file__).parent / "slurm_fixtures"

FAKES = {
    "sbatch": r"""
        echo "sbatch $*" >> "$FAKE_LOG"
        if [ -n "${FAKE_SBATCH_FAIL:-}" ]; then cat "$FIXTURES/$FAKE_SBATCH_FAIL" >&2; exit 1; fi
        last="${@: -1}"
        if [ -f "$last" ]; then cp "$last" "$FAKE_DIR/submitted.sh"; else cat > "$FAKE_DIR/submitted.sh"; fi
        echo "${FAKE_SBATCH_OUT:-4242}"
    """,
    "squeue": r"""
        echo "squeue $*" >> "$FAKE_LOG"
        if [ -n "${FAKE_SQUEUE_SLEEP:-}" ]; then sleep "$FAKE_SQUEUE_SLEEP"; fi
        if [ -n "${FAKE_SQUEUE_FAIL:-}" ]; then echo "squeue: error: $FAKE_SQUEUE_FAIL" >&2; exit 1; fi
        ids=""
        for a in "$@"; do
          case "$a" in
            --help) echo "Usage: squeue [OPTIONS]"
                    if [ -n "${FAKE_JSON:-}" ]; then echo "      --json    Produce JSON output"; fi
                    exit 0;;
            --json) cat "$FAKE_DIR/squeue.json"; exit 0;;
            --jobs=*) ids="${a#--jobs=}";;
          esac
        done
        n=0
        for id in ${ids//,/ }; do
          f="$FAKE_DIR/state/$id"
          [ -f "$f" ] || continue
          n=$((n + 1))
          echo "$id|$id|$(cat "$f")|node1|None|NONE|5:00|0|job $id|"
        done
        if [ "$n" = 0 ] && [ "${ids//,/}" = "$ids" ]; then
          cat "$FIXTURES/squeue_unknown.txt" >&2; exit 1
        fi
    """,
    "sacct": r"""
        echo "sacct $*" >> "$FAKE_LOG"
        comp=0; ids=""
        for a in "$@"; do case "$a" in -c) comp=1;; --jobs=*) ids="${a#--jobs=}";; esac; done
        if [ "$comp" = 0 ]; then cat "$FIXTURES/sacct_disabled.txt" >&2; exit 1; fi
        for id in ${ids//,/ }; do
          f="$FAKE_DIR/done/$id"
          [ -f "$f" ] && echo "$id|$id|$(cat "$f")|0:0|node1|2026-01-01T00:00:00|5||job$id"
        done
        exit 0
    """,
    "scancel": r"""
        echo "scancel $*" >> "$FAKE_LOG"
        for a in "$@"; do
          case "$a" in -*) ;; *) echo CANCELLED > "$FAKE_DIR/state/$a";; esac
        done
    """,
    "sinfo": r"""
        echo "sinfo $*" >> "$FAKE_LOG"
        if [ -f "$FAKE_DIR/sinfo.txt" ]; then cat "$FAKE_DIR/sinfo.txt"; fi
    """,
    "scontrol": r"""
        echo "scontrol $*" >> "$FAKE_LOG"
        f="$FAKE_DIR/scontrol/${@: -1}"
        if [ -f "$f" ]; then cat "$f"; else cat "$FIXTURES/scontrol_unknown.txt" >&2; exit 1; fi
    """,
}


@dataclass
class FakeSlurm:
    root: Path

    @property
    def log(self) -> Path:
        return self.root / "calls.log"

    def runner(self, **env: str) -> SubprocessRunner:
        path = f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        return SubprocessRunner(extra_env={"PATH": path, "FAKE_DIR": str(self.root), "FAKE_LOG": str(self.log),
                                           "FIXTURES": str(FIXTURES), "SLURM_TIME_FORMAT": "standard", **env})

    def calls(self, command: str | None = None) -> list[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line for line in lines if command is None or line.split(" ", 1)[0] == command]

    def set_state(self, job_id: str, state: str) -> None:
        (self.root / "state" / job_id).write_text(state + "\n")

    def finish(self, job_id: str, state: str) -> None:
        """The job left squeue; only sacct -c knows it now."""
        (self.root / "state" / job_id).unlink(missing_ok=True)
        (self.root / "done" / job_id).write_text(state + "\n")


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeSlurm]:
    for sub in ("bin", "state", "done", "scontrol"):
        (tmp_path / sub).mkdir()
    for name, body in FAKES.items():
        exe = tmp_path / "bin" / name
        exe.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
        exe.chmod(0o755)
    yield FakeSlurm(tmp_path)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- submit / cancel


def test_nodes_one_sinfo_call_for_the_asked_nodes(fake: FakeSlurm) -> None:
    (fake.root / "sinfo.txt").write_text("node2|debug*|idle|0/2/0/2\nnode3|debug*|mixed|1/1/0/2\n")
    client = SlurmClient(fake.runner())
    nodes = client.nodes(["node2", "node3", "node2"], partition="debug")
    assert {n: (i.state, i.idle_cpus) for n, i in nodes.items()} == {"node2": ("idle", 2), "node3": ("mixed", 1)}
    assert fake.calls("sinfo") == ["sinfo --noheader --Node --nodes=node2,node3 --format=%N|%P|%T|%C --partition=debug"]
    assert client.nodes([]) == {} and len(fake.calls("sinfo")) == 1


def test_submit_script_text_via_stdin(fake: FakeSlurm) -> None:
    client = SlurmClient(fake.runner(), use_json=False)
    job_id = client.submit("#!/bin/bash\necho stage\n", ["-J", "stage a", "--time=5"])
    assert job_id == "4242"
    assert fake.calls("sbatch") == ["sbatch --parsable -J stage a --time=5"]
    assert (fake.root / "submitted.sh").read_text() == "#!/bin/bash\necho stage\n"


def test_submit_script_path_goes_last_and_cluster_is_dropped(fake: FakeSlurm, tmp_path: Path) -> None:
    script = tmp_path / "my job.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    client = SlurmClient(fake.runner(FAKE_SBATCH_OUT="77;c1"), use_json=False)
    assert client.submit(script, ["--nodes=2"]) == "77"
    assert client.submit(str(script)) == "77"
    assert fake.calls("sbatch") == [f"sbatch --parsable --nodes=2 {script}", f"sbatch --parsable {script}"]


def test_sbatch_refusal_carries_stderr(fake: FakeSlurm) -> None:
    client = SlurmClient(fake.runner(FAKE_SBATCH_FAIL="sbatch_error.txt"), use_json=False)  # captured stderr
    with pytest.raises(SlurmCommandError) as err:
        client.submit("#!/bin/bash\ntrue\n", ["-p", "nosuch"])
    assert err.value.returncode == 1
    assert err.value.argv[:2] == ["sbatch", "--parsable"]
    assert "Invalid partition name specified" in err.value.stderr
    assert "Batch job submission failed: Invalid partition name specified" in str(err.value)


def test_missing_executable_is_a_command_error(tmp_path: Path) -> None:
    runner = SubprocessRunner(extra_env={"PATH": str(tmp_path)})
    with pytest.raises(SlurmCommandError) as err:
        SlurmClient(runner, use_json=False).submit("#!/bin/bash\n")
    assert err.value.returncode == 127


def test_cancel_and_signal(fake: FakeSlurm) -> None:
    client = SlurmClient(fake.runner(), use_json=False)
    fake.set_state("5", "RUNNING")
    client.cancel(["5", "6", "5"])
    client.cancel(["7"], signal="USR1")
    client.cancel([])
    assert fake.calls("scancel") == ["scancel -- 5 6", "scancel --signal=USR1 --full -- 7"]
    assert client.status(["5"])["5"].state is SlurmState.CANCELLED


# ---------------------------------------------------------------- status


def test_squeue_timeout_raises_with_returncode_none(fake: FakeSlurm) -> None:
    client = SlurmClient(fake.runner(FAKE_SQUEUE_SLEEP="20"), use_json=False, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(SlurmCommandError) as err:
        client.status(["1"])
    assert err.value.returncode is None
    assert "timed out" in str(err.value)
    assert time.monotonic() - started < 5  # the whole process group was killed, not waited for


def test_status_one_squeue_then_one_sacct(fake: FakeSlurm) -> None:
    client = SlurmClient(fake.runner(), use_json=False)
    fake.set_state("1", "RUNNING")
    fake.set_state("2", "PENDING")
    fake.finish("3", "TIMEOUT")
    result = client.status(["1", "2", "3", "4"])
    assert {k: v.state for k, v in result.items()} == {
        "1": SlurmState.RUNNING, "2": SlurmState.PENDING, "3": SlurmState.TIMEOUT}
    assert result["1"].name == "job 1" and result["3"].state.is_resubmittable
    assert len(fake.calls("squeue")) == 1
    # first time: plain sacct says "accounting storage is disabled", so sacct -c is tried and remembered
    assert [c.split()[1] for c in fake.calls("sacct")] == ["-X", "-c"]
    fake.finish("1", "COMPLETED")
    assert client.status(["1", "3"])["1"].state is SlurmState.COMPLETED
    assert len(fake.calls("squeue")) == 2
    assert [c.split()[1] for c in fake.calls("sacct")] == ["-X", "-c", "-c"]


def test_status_single_unknown_id_is_not_an_error(fake: FakeSlurm) -> None:
    client = SlurmClient(fake.runner(), use_json=False)
    assert client.status(["999"]) == {}
    assert client.status([]) == {}
    assert len(fake.calls("squeue")) == 1


def test_status_squeue_failure_raises(fake: FakeSlurm) -> None:
    client = SlurmClient(fake.runner(FAKE_SQUEUE_FAIL="Unable to contact slurm controller"), use_json=False)
    with pytest.raises(SlurmCommandError, match="Unable to contact slurm controller"):
        client.status(["1"])


def test_json_probed_once_and_filtered(fake: FakeSlurm) -> None:
    (fake.root / "squeue.json").write_text((FIXTURES / "squeue.json").read_text())
    client = SlurmClient(fake.runner(FAKE_JSON="1"))
    assert client.status(["31", "33_2"])["31"].state is SlurmState.RUNNING
    assert set(client.status(["30", "34"])) == {"30", "34"}  # 34 is array task 33_1's raw id
    calls = fake.calls("squeue")
    assert calls[0] == "squeue --help" and len(calls) == 3
    assert all("--json" in c for c in calls[1:])


def test_json_not_offered_uses_delimited(fake: FakeSlurm) -> None:
    fake.set_state("8", "RUNNING")
    client = SlurmClient(fake.runner())
    assert client.status(["8"])["8"].state is SlurmState.RUNNING
    assert not client.json_enabled()
    assert [c.split()[1] for c in fake.calls("squeue")] == ["--help", "--noheader"]


def test_job_end_time_via_scontrol(fake: FakeSlurm) -> None:
    (fake.root / "scontrol" / "31").write_text((FIXTURES / "scontrol_running.txt").read_text())
    client = SlurmClient(fake.runner(), use_json=False)
    assert client.job_end_time("31") == datetime(2026, 11, 25, 8, 40, 30).astimezone()
    assert client.job_end_time("999") is None
    assert fake.calls("scontrol") == ["scontrol -o show job 31", "scontrol -o show job 999"]


# ---------------------------------------------------------------- watcher


def test_watcher_one_squeue_call_for_50_jobs(fake: FakeSlurm) -> None:
    ids = [str(i) for i in range(100, 150)]
    for job_id in ids:
        fake.set_state(job_id, "RUNNING")
    clock = FakeClock()
    watcher = StatusWatcher(SlurmClient(fake.runner(), use_json=False), clock, interval=10)
    watcher.register(*ids)
    assert watcher.poll() is True
    assert len(fake.calls("squeue")) == 1
    assert {watcher.state(i) for i in ids} == {SlurmState.RUNNING}
    assert watcher.poll() is False  # not due yet
    clock.now += 5
    assert watcher.poll() is False
    assert len(fake.calls("squeue")) == 1
    for job_id in ids[:40]:
        fake.set_state(job_id, "COMPLETED")
    clock.now += 5
    assert watcher.poll() is True
    assert len(fake.calls("squeue")) == 2
    clock.now += 10
    watcher.poll()
    last = fake.calls("squeue")[-1]
    assert len(fake.calls("squeue")) == 3
    assert f"--jobs={','.join(ids[40:])}" in last  # terminal jobs are cached, not asked again
    assert watcher.state(ids[0]) is SlurmState.COMPLETED


def test_watcher_backoff_on_failure(fake: FakeSlurm) -> None:
    fake.set_state("1", "RUNNING")
    clock = FakeClock()
    broken = StatusWatcher(SlurmClient(fake.runner(FAKE_SQUEUE_FAIL="down"), use_json=False), clock,
                           interval=10, max_interval=35)
    broken.register("1")
    assert broken.poll() is False and broken.current_interval == 20
    clock.now += 15
    assert broken.poll() is False and len(fake.calls("squeue")) == 1  # backing off: not asked
    clock.now += 5
    broken.poll()
    assert broken.current_interval == 35 and len(fake.calls("squeue")) == 2
    assert broken.state("1") is SlurmState.UNKNOWN


def test_watcher_lost_jobs_and_nothing_to_ask(fake: FakeSlurm) -> None:
    clock = FakeClock()
    watcher = StatusWatcher(SlurmClient(fake.runner(), use_json=False), clock, interval=1, lost_after=2)
    assert watcher.poll() is False and fake.calls() == []  # no jobs, no call
    watcher.register("404")
    for _ in range(2):
        assert watcher.poll() is True
        clock.now += 1
    assert watcher.is_lost("404") and watcher.info("404") is None
    watcher.forget("404")
    assert watcher.snapshot() == {}


def test_watcher_wait_until_terminal(fake: FakeSlurm) -> None:
    fake.set_state("9", "RUNNING")
    clock = FakeClock()
    watcher = StatusWatcher(SlurmClient(fake.runner(), use_json=False), clock, interval=1)

    def sleep(seconds: float) -> None:
        clock.now += seconds
        if clock.now > 1002:
            fake.set_state("9", "FAILED")

    info = watcher.wait("9", timeout=10, sleep=sleep, step=0.5)
    assert info.state is SlurmState.FAILED
    fake.set_state("10", "RUNNING")
    with pytest.raises(TimeoutError, match="RUNNING"):
        watcher.wait("10", timeout=3, sleep=sleep, step=0.5)

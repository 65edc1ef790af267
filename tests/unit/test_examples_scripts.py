"""The example module scripts, run without a launcher: fake ``send-message``, ``send-job-message``
and ``scalebox`` record their argv, so each script's emitted messages can be checked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from scalebox_hpc.pipeline import SlotSpec, load_pipeline

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PRIMES = EXAMPLES / "app-primes"
HELLO = EXAMPLES / "hello-scalebox"
FAKE = '#!/usr/bin/env bash\nprintf "%s\\t" "$(basename "$0")" "$@" >>"$FAKE_LOG"\nprintf "\\n" >>"$FAKE_LOG"\n'


class Fakes:
    """A PATH with fake helper commands and the calls they recorded."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.log = root / "calls.log"
        for name in ("send-message", "send-job-message", "scalebox"):
            (self.bin / name).write_text(FAKE)
            (self.bin / name).chmod(0o755)

    def calls(self) -> list[list[str]]:
        """Every recorded call as [command, *args], then forget them."""
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        self.log.unlink()
        return [line.split("\t")[:-1] for line in lines]

    def run(self, script: Path, body: str, work_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
        """Run ``script BODY HEADERS`` in ``work_dir`` as the launcher would (argv, cwd, env)."""
        work_dir.mkdir(parents=True, exist_ok=True)
        environ = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', os.defpath)}", "FAKE_LOG": str(self.log),
            "APP_ID": "1", "MODULE_NAME": script.parent.name, "SLOT_ID": "1", "HOST": "localhost",
            "WORK_DIR": str(work_dir), "SINK_MODULE": "", **env,
        }
        argv = [str(script)] if script.name != "run.sh" else [str(script), body, '{"from_module": "test"}']
        return subprocess.run(argv, cwd=work_dir, env=environ, capture_output=True, text=True, timeout=60,
                              check=True)


PRIMES_ENV = {"NUM_GROUPS": "10", "LENGTH": "1000"}


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    return Fakes(tmp_path)


def test_scripts_are_executable() -> None:
    scripts = sorted(EXAMPLES.rglob("*.sh"))
    assert len(scripts) == 5
    for script in scripts:
        assert os.access(script, os.X_OK), script
        assert "set -euo pipefail" in script.read_text(), script


def test_hello(fakes: Fakes, tmp_path: Path) -> None:
    proc = fakes.run(HELLO / "hello" / "run.sh", "scalebox", tmp_path / "w")
    assert proc.stdout == "Input message:scalebox\n"
    assert fakes.calls() == [["scalebox", "app", "set-finished", "Hello scalebox, it is OK!"]]


def test_scatter_emits_zero_padded_starts(fakes: Fakes, tmp_path: Path) -> None:
    fakes.run(PRIMES / "scatter" / "run.sh", "start", tmp_path / "w", SINK_MODULE="calc", **PRIMES_ENV)
    starts = [f"{1 + i * 1000:010d}" for i in range(10)]
    assert fakes.calls() == [["send-message", s] for s in starts]
    assert starts[:2] == ["0000000001", "0000001001"]


def test_calc_counts_primes(fakes: Fakes, tmp_path: Path) -> None:
    for body, expected in [("0000000001", 168), ("0000001001", 135), ("0000000008", 164)]:  # 0008: not octal
        fakes.run(PRIMES / "calc" / "run.sh", body, tmp_path / "w", SINK_MODULE="gather", **PRIMES_ENV)
        assert fakes.calls() == [["send-message", f"{body},{expected}"]]


def test_calc_rejects_bad_input(fakes: Fakes, tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        fakes.run(PRIMES / "calc" / "run.sh", "$(id)", tmp_path / "w", **PRIMES_ENV)
    assert info.value.returncode == 2 and fakes.calls() == []


def test_scatter_calc_gather(fakes: Fakes, tmp_path: Path) -> None:
    fakes.run(PRIMES / "scatter" / "run.sh", "start", tmp_path / "scatter", **PRIMES_ENV)
    starts = [args[1] for args in fakes.calls()]
    counts = []
    for start in starts:
        fakes.run(PRIMES / "calc" / "run.sh", start, tmp_path / "calc", **PRIMES_ENV)
        [[command, message]] = fakes.calls()
        assert command == "send-message"
        counts.append(message)
    assert len(counts) == 10
    work = tmp_path / "gather"
    fakes.run(PRIMES / "gather" / "setup.sh", "", work, **PRIMES_ENV)
    assert (work / "parts").is_dir() and not list((work / "parts").iterdir())
    for index, message in enumerate(counts):
        fakes.run(PRIMES / "gather" / "run.sh", message, work, **PRIMES_ENV)
        calls = fakes.calls()
        assert calls == ([] if index < 9 else [["scalebox", "app", "set-finished", "Result is 1229"]])
    assert sum(int(p.read_text()) for p in (work / "parts").iterdir()) == 1229


def test_gather_is_idempotent(fakes: Fakes, tmp_path: Path) -> None:
    """A re-run of the same message (after a crash) must not count it twice."""
    work = tmp_path / "gather"
    fakes.run(PRIMES / "gather" / "setup.sh", "", work, **PRIMES_ENV)
    for message in ["0000000001,168", "0000000001,168", "0000001001,135"]:
        fakes.run(PRIMES / "gather" / "run.sh", message, work, **dict(PRIMES_ENV, NUM_GROUPS="2"))
    assert fakes.calls()[-1] == ["scalebox", "app", "set-finished", "Result is 303"]


def test_gather_needs_setup(fakes: Fakes, tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        fakes.run(PRIMES / "gather" / "run.sh", "0000000001,168", tmp_path / "w", **PRIMES_ENV)
    assert info.value.returncode == 3 and "setup.sh" in info.value.stderr


def test_example_pipelines_load(tmp_path: Path) -> None:
    hello = load_pipeline(HELLO / "app.yaml", environ={})
    assert hello.parameters.start_task == "scalebox" and [m.name for m in hello.modules] == ["hello"]
    assert hello.modules[0].script("run.sh") == HELLO / "hello" / "run.sh"

    primes = load_pipeline(PRIMES / "app.yaml", environ={})
    assert [m.name for m in primes.modules] == ["scatter", "calc", "gather"]
    assert primes.variables == PRIMES_ENV
    assert primes.module("scatter").parameters.start_task == "start"
    assert primes.module("scatter").sink_modules == ["calc"] and primes.module("calc").sink_modules == ["gather"]
    assert primes.module("calc").slots == [SlotSpec(host_regex=".*", count=2)]
    for module in primes.modules:
        assert module.environments == PRIMES_ENV
        assert module.code_path == PRIMES / module.name and module.script("run.sh") is not None
    assert primes.module("gather").script("setup.sh") == PRIMES / "gather" / "setup.sh"

    override = tmp_path / "small.env"
    override.write_text("NUM_GROUPS=2\n")
    small = load_pipeline(PRIMES / "app.yaml", env_files=[override], environ={"LENGTH": "50"})
    assert small.module("calc").environments == {"NUM_GROUPS": "2", "LENGTH": "50"}

"""The launcher's signals (issue 14): the first drains, a second interactive one stops now, later
ones are only said; a stage job's Slurm signals (USR1 at the walltime warning, TERM twice on
scancel) never turn its drain into a kill; after the slots ended a signal exits quietly."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import cast

import pytest

from scalebox_hpc import early_signals
from scalebox_hpc.launcher.launcher import Launcher
from scalebox_hpc.launcher.slot import SlotControl
from scalebox_hpc.node import Interrupts, SignalPolicy


class FakeLauncher:
    """What the handler uses of a Launcher: its flags, and how many tasks run."""

    def __init__(self, running: int) -> None:
        self.control = SlotControl()
        self.running = running

    def running_tasks(self) -> int:
        return self.running

    def stop_now(self) -> int:
        self.control.draining.set()
        self.control.abort.set()
        return self.running


def handler(policy: SignalPolicy, running: int = 3) -> tuple[Interrupts, FakeLauncher, list[str]]:
    said: list[str] = []
    fake = FakeLauncher(running)
    interrupts = Interrupts(cast(Launcher, fake), threading.Event(), 30.0, SignalPolicy(
        stop_now_on=policy.stop_now_on, say=said.append))
    return interrupts, fake, said


def test_first_signal_drains_and_says_how_many_run_and_for_how_long() -> None:
    interrupts, fake, said = handler(SignalPolicy())
    interrupts.handle(signal.SIGINT, None)
    assert fake.control.draining.is_set() and interrupts.stop.is_set() and not fake.control.abort.is_set()
    assert said == ["stopping: no new tasks; 3 running task(s) get up to 30 s to finish, then are killed and "
                    "put back READY (SIGINT; Ctrl-C again stops them now)"]


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_now_once_and_a_third_is_only_said(second: int) -> None:
    interrupts, fake, said = handler(SignalPolicy())
    interrupts.handle(signal.SIGTERM, None)
    interrupts.handle(second, None)
    assert fake.control.abort.is_set()
    name = signal.Signals(second).name
    assert said[1] == f"stopping now: 3 running task(s) killed and given back ({name})"
    fake.running = 0  # they are being killed: not counted twice
    interrupts.handle(signal.SIGINT, None)
    assert said[2:] == ["already stopping now (SIGINT ignored)"]


def test_usr1_never_stops_now() -> None:
    interrupts, fake, said = handler(SignalPolicy())
    interrupts.handle(signal.SIGUSR1, None)
    interrupts.handle(signal.SIGUSR1, None)
    assert fake.control.draining.is_set() and not fake.control.abort.is_set()
    assert said[1] == "still draining (SIGUSR1 ignored; Ctrl-C again stops them now)"


@pytest.mark.parametrize("first", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stage_jobs_slurm_signals_only_drain_a_second_ctrl_c_stops_now(first: int) -> None:
    interrupts, fake, said = handler(SignalPolicy(stop_now_on=frozenset({signal.SIGINT})))
    interrupts.handle(first, None)  # the walltime warning, or scancel's TERM to the step ...
    interrupts.handle(signal.SIGTERM, None)  # ... and scancel's TERM again, through the job script and srun
    interrupts.handle(signal.SIGTERM, None)
    assert fake.control.draining.is_set() and not fake.control.abort.is_set(), said
    interrupts.handle(signal.SIGINT, None)  # a user's Ctrl-C
    assert fake.control.abort.is_set()
    assert said[-1] == "stopping now: 3 running task(s) killed and given back (SIGINT)"


def test_a_signal_after_the_slots_ended_exits_quietly_with_130() -> None:
    interrupts, _, said = handler(SignalPolicy())
    interrupts.handle(signal.SIGINT, None)
    interrupts.ended = True
    with pytest.raises(SystemExit) as exited:
        interrupts.handle(signal.SIGINT, None)
    assert exited.value.code == 130 and len(said) == 1


def test_a_failing_message_does_not_escape_the_handler() -> None:
    def broken(_text: str) -> None:
        raise OSError("stderr closed")

    fake = FakeLauncher(1)
    interrupts = Interrupts(cast(Launcher, fake), threading.Event(), 5.0, SignalPolicy(say=broken))
    interrupts.handle(signal.SIGINT, None)
    interrupts.handle(signal.SIGINT, None)
    assert fake.control.abort.is_set()



def test_a_walltime_warning_before_the_launcher_was_up_drains_it(tmp_path: Path) -> None:
    """`python -m scalebox_hpc launcher --stage-job` records a SIGUSR1 from its first line (Python's
    default ends the process: the job FAILED with 138 when Slurm's warning came 2 s into a short
    job); once the launcher's own handlers are installed it drains for it."""
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        import os, signal
        from scalebox_hpc import early_signals
        early_signals.install()
        os.kill(os.getpid(), signal.SIGUSR1)  # the warning, while the launcher still imports
        print("alive", early_signals.received == [signal.SIGUSR1])
    """))
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["alive", "True"], out

    early_signals.received[:] = [signal.SIGUSR1]
    interrupts, fake, said = handler(SignalPolicy())
    previous = interrupts.install()
    try:
        assert fake.control.draining.is_set() and not fake.control.abort.is_set()
        assert said and said[0].startswith("stopping: no new tasks") and early_signals.received == []
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


def test_an_mpi_stage_rank_drains_for_a_warning_that_came_while_it_started() -> None:
    from scalebox_hpc.launcher import mpi_stage

    early_signals.received[:] = [signal.SIGUSR1]
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        mpi_stage._install_signals(stop, rank=0)
        assert stop.is_set() and early_signals.received == []
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

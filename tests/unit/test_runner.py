"""The one task runner and the rules every claim/record loop shares (launcher/runner.py), on the
in-memory queue and a fake clock: requeue, idle verdict, outage backoff, message stamping, the
script environment, the heartbeat loop, and a TaskRunner running real scripts locally."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from scalebox_hpc.errors import DatabaseError
from scalebox_hpc.launcher.runner import (
    MAX_HANDOFF_BYTES,
    Backoff,
    HeartbeatLoop,
    IdlePolicy,
    SlotContext,
    SlotControl,
    TaskRunner,
    rank_work_dir,
    script_env,
    should_requeue,
    stamp_messages,
)
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import Message, Task, TaskStatus
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.local import LocalRuntime
from scalebox_hpc.testing import InMemoryQueue
from scalebox_hpc.testing.clock import FakeClock


# -- requeue -----------------------------------------------------------------------------------------
def test_a_failure_is_requeued_while_its_rule_gives_attempts() -> None:
    rules = ["1:2"]  # status 1: two more attempts
    assert should_requeue(rules, 1, 1) and should_requeue(rules, 1, 2)
    assert not should_requeue(rules, 1, 3)
    assert not should_requeue(rules, 2, 1)  # no rule for 2
    assert not should_requeue(rules, 0, 1)  # success is never requeued


# -- idle verdict ----------------------------------------------------------------------------------
def test_idle_polls_count_only_while_the_app_runs_and_upstream_is_quiet() -> None:
    idle = IdlePolicy(max_idle_polls=2)
    asked: list[int] = []

    def may() -> bool:
        asked.append(1)
        return True

    assert idle.after_empty_poll("RUNNING", False, may) == "stay"
    assert idle.after_empty_poll("RUNNING", True, may) == "stay"  # upstream busy: the count starts again
    assert idle.polls == 0
    assert idle.after_empty_poll("PAUSED", False, may) == "stay" and idle.polls == 0
    assert idle.after_empty_poll("RUNNING", False, may) == "stay"
    assert asked == []
    assert idle.after_empty_poll("RUNNING", False, may) == "idle"
    assert asked == [1]


def test_an_idle_slot_kept_as_warm_capacity_asks_again_after_another_timeout() -> None:
    idle = IdlePolicy(max_idle_polls=1)
    answers = iter([False, True])
    assert idle.after_empty_poll("RUNNING", False, lambda: next(answers)) == "stay"
    assert idle.polls == 0
    assert idle.after_empty_poll("RUNNING", False, lambda: next(answers)) == "idle"


def test_always_running_never_idles_out_and_finished_always_ends() -> None:
    idle = IdlePolicy(max_idle_polls=1, always_running=True)
    for _ in range(5):
        assert idle.after_empty_poll("RUNNING", False, lambda: True) == "stay"
    assert idle.after_empty_poll("FINISHED", False, lambda: False) == "finished"
    idle.busy()
    assert idle.polls == 0


# -- outage backoff --------------------------------------------------------------------------------
def test_backoff_doubles_from_half_a_second_to_thirty_and_restarts_after_a_success() -> None:
    clock = FakeClock()
    backoff = Backoff(clock.sleep)
    waited = [backoff.failed(DatabaseError("away")) for _ in range(9)]
    assert waited == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert clock.monotonic() == sum(waited)
    backoff.ok()
    assert backoff.failed(DatabaseError("away")) == 0.5


# -- messages --------------------------------------------------------------------------------------
def test_messages_are_stamped_with_their_sender() -> None:
    out, problems = stamp_messages([Message("b1", module="m2", headers={"k": "v"})], module="m1", host="h", seq=3)
    assert problems == []
    assert out[0].body == "b1" and out[0].module == "m2"
    assert out[0].headers == {"k": "v", "from_module": "m1", "from_host": "h", "from_slot": 3}


def test_messages_over_the_hand_off_limit_are_refused_together() -> None:
    out, problems = stamp_messages([Message("x" * 600), Message("y" * 600)], module="m", host="h", seq=0,
                                   limit=1000)
    assert out == [] and len(problems) == 1 and "exceed" in problems[0]
    assert MAX_HANDOFF_BYTES == 64 * 2**20


# -- context, env ----------------------------------------------------------------------------------
def context(tmp_path: Path, run_sh: str, **arguments: object) -> SlotContext:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "run.sh").write_text(run_sh)
    queue = InMemoryQueue()
    app = queue.create_app({"name": "t", "modules": {"m": {}, "n": {}}})
    refs = queue.modules(app)
    spec = ModuleSpec.model_validate({"name": "m", "code_path": str(code), "sink_modules": ["n"],
                                      "environments": {"MINE": "1"}, "arguments": arguments})
    return SlotContext(app_id=app, module=spec, ref=refs["m"], modules=refs, host="h1", seq=2,
                       work_dir=rank_work_dir(tmp_path / "app", "m", "h1", "slot2"), runtime=LocalRuntime(),
                       wakeups=Wakeups(), control=SlotControl(), base_env={"PATH": "/usr/bin:/bin"})


def test_every_runner_sees_the_same_variables_collective_ranks_without_the_base(tmp_path: Path) -> None:
    ctx = context(tmp_path, "true\n")
    full = script_env(ctx, 7)
    assert ctx.work_dir == tmp_path / "app" / "m" / "h1-slot2"
    assert full["SLOT_ID"] == "7" and full["SLOT_SEQ"] == "2" and full["SINK_MODULE"] == "n"
    assert full["MINE"] == "1" and full["PATH"].endswith("/usr/bin:/bin")
    bare = script_env(ctx, 7, base=False)
    assert "PATH" not in bare
    assert {k: v for k, v in full.items() if k != "PATH"} == bare


# -- the runner ------------------------------------------------------------------------------------
def task(i: int = 1, body: str = "b") -> Task:
    return Task(id=i, app_id=1, module_id=1, body=body, headers={}, status=-3, attempts=1)


def test_the_runner_runs_a_task_with_the_slot_env_and_collects_its_output(tmp_path: Path) -> None:
    ctx = context(tmp_path, 'echo "$1 $TASK_ID $SLOT_ID"; exit 0\n')
    runner = TaskRunner(ctx, slot_id=5)
    assert runner.setup()
    result = runner.execute(task(9, "hello"))
    assert result is not None and result.status == 0
    assert result.stdout == "hello 9 5\n"
    runner.slot_id = 6  # the environment follows the slot id
    result = runner.execute(task(10, "again"))
    assert result is not None and result.stdout == "again 10 6\n"
    runner.teardown()
    assert runner.session is None


def test_the_runner_times_a_task_out(tmp_path: Path) -> None:
    ctx = context(tmp_path, "sleep 30\n", task_max_seconds=0.3)
    runner = TaskRunner(ctx)
    runner.open()
    try:
        result = runner.execute(task())
    finally:
        runner.close()
    assert result is not None and result.status == TaskStatus.TIMEOUT


def test_an_aborted_run_gives_no_result(tmp_path: Path) -> None:
    ctx = context(tmp_path, "sleep 30\n")
    runner = TaskRunner(ctx)
    runner.open()
    threading.Timer(0.3, ctx.control.abort.set).start()
    try:
        assert runner.execute(task()) is None
    finally:
        runner.close()


def test_a_missing_run_sh_is_a_system_error_not_a_crash(tmp_path: Path) -> None:
    ctx = context(tmp_path, "true\n")
    (tmp_path / "code" / "run.sh").unlink()
    runner = TaskRunner(ctx)
    runner.open()
    try:
        result = runner.execute(task())
    finally:
        runner.close()
    assert result is not None and result.status == TaskStatus.SYSTEM_ERROR and "no run.sh" in result.stderr


# -- the heartbeat loop ----------------------------------------------------------------------------
class Beats:
    def __init__(self, queue: InMemoryQueue, app: int) -> None:
        self.queue, self.app = queue, app
        self.beats = 0
        self.cancels = 0
        self.recovers = 0
        self.every: list[float] = []
        self.connects = 1
        self.fail = False

    def beat(self) -> None:
        if self.fail:
            raise DatabaseError("away")
        self.beats += 1

    def recover(self, every: float) -> list[tuple[int, int]]:
        self.recovers += 1
        self.every.append(every)
        return self.queue.recover_expired(every=every)

    def loop(self, clock: FakeClock) -> HeartbeatLoop:
        return HeartbeatLoop(beat=self.beat, cancelled=lambda: self.queue.app_cancelled(self.app),
                             on_cancel=self.on_cancel, recover=self.recover, heartbeat_seconds=4.0,
                             lease_seconds=6.0, connects=lambda: self.connects, clock=clock)

    def on_cancel(self) -> None:
        self.cancels += 1


def test_the_recovery_loop_recovers_every_tick_and_asks_cancelled_every_second() -> None:
    clock = FakeClock()
    queue = InMemoryQueue(clock=clock)
    app = queue.create_app({"name": "t", "modules": {"a": {}}})
    b = Beats(queue, app)
    loop = b.loop(clock)
    for _ in range(4):
        assert loop.recover_step()
    assert (b.beats, b.recovers, b.cancels) == (0, 4, 0)  # beats are the other loop's
    assert b.every == [0.5] * 4  # the fleet recovers an app once per eighth heartbeat, not each launcher
    queue.cancel_app(app)
    loop.recover_step()
    loop.recover_step()
    assert b.cancels == 1


def test_a_failed_step_says_so_and_never_raises() -> None:
    clock = FakeClock()
    queue = InMemoryQueue(clock=clock)
    b = Beats(queue, queue.create_app({"name": "t", "modules": {"a": {}}}))
    loop = b.loop(clock)
    b.fail = True
    assert loop.beat_step() is False  # logged
    b.fail = False
    assert loop.beat_step() is True and b.beats == 1


def test_after_a_reconnect_nothing_is_recovered_for_a_lease() -> None:
    clock = FakeClock()
    queue = InMemoryQueue(clock=clock)
    b = Beats(queue, queue.create_app({"name": "t", "modules": {"a": {}}}))
    loop = b.loop(clock)
    loop.recover_step()
    assert b.recovers == 1
    b.connects = 2  # the connection was away and came back
    loop.recover_step()
    clock.advance(5.9)
    loop.recover_step()
    assert b.recovers == 1  # quiet for the lease: the others must renew first
    clock.advance(0.2)
    loop.recover_step()
    assert b.recovers == 2


class Schedule:
    """Drives :meth:`HeartbeatLoop.every` on a fake clock: ``stopped`` waits by advancing it;
    each step takes ``took[i]`` seconds and answers ``ok[i]``; records when steps start."""

    def __init__(self, clock: FakeClock, took: list[float], ok: list[bool] | None = None) -> None:
        self.clock, self.took, self.ok = clock, took, ok or [True] * len(took)
        self.starts: list[float] = []

    def stopped(self, seconds: float) -> bool:
        if len(self.starts) == len(self.took):
            return True
        self.clock.advance(seconds)
        return False

    def step(self) -> bool:
        i = len(self.starts)
        self.starts.append(self.clock.monotonic())
        self.clock.advance(self.took[i])
        return self.ok[i]


def test_beats_keep_their_schedule_when_a_step_waits_long() -> None:
    """A beat that waited 7 s behind the node's batch (half a heartbeat is 2 s here) is followed
    by the next at once, then the schedule goes on: renewals are never a sleep plus every wait
    apart (that expired live leases on a saturated database)."""
    clock = FakeClock()
    loop = HeartbeatLoop(beat=lambda: None, cancelled=lambda: False, on_cancel=lambda: None, recover=lambda every: [],
                         heartbeat_seconds=4.0, lease_seconds=6.0, clock=clock)
    s = Schedule(clock, took=[0.5, 7.0, 0.5, 0.5, 0.1, 0.1], ok=[True, True, True, False, True, True])
    loop.every(2.0, s.step, s.stopped, lambda: True)
    # due at 2 and 4 (ran 4-11), so at once at 11, then 13; that one fails: again a quarter
    # heartbeat (1 s) after it ended (14.5), then the schedule from there (16.5)
    assert s.starts == [2.0, 4.0, 11.0, 13.0, 14.5, 16.5]


def test_the_loops_end_when_told_and_run_beats_and_recovery_apart() -> None:
    queue = InMemoryQueue()
    b = Beats(queue, queue.create_app({"name": "t", "modules": {"a": {}}}))
    stop = threading.Event()
    beats: list[float] = []

    def slow_recover(every: float) -> list[tuple[int, int]]:
        stop.wait(0.5)  # a recovery stuck behind a slow batch must not delay the beats
        return b.recover(every)

    loop = HeartbeatLoop(beat=lambda: beats.append(time.monotonic()), cancelled=lambda: False,
                         on_cancel=lambda: None, recover=slow_recover, heartbeat_seconds=0.08, lease_seconds=0.12)
    runner = threading.Thread(target=loop.run, args=(stop.wait,), daemon=True)
    runner.start()
    try:
        time.sleep(0.45)
    finally:
        stop.set()
        runner.join(5.0)
    assert not runner.is_alive()
    assert len(beats) >= 5, beats  # every 0.04 s while the recovery loop was stuck for 0.5 s
    assert b.recovers <= 1


@pytest.mark.parametrize("label", ["slot0", "rank3"])
def test_work_dirs_of_slots_and_ranks_share_one_layout(tmp_path: Path, label: str) -> None:
    assert rank_work_dir(tmp_path, "m", "h", label) == tmp_path / "m" / f"h-{label}"

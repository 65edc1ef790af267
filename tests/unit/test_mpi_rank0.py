"""MPI rank 0's farm loop in-process: the in-memory queue and a fake communicator whose worker
ranks answer at once (no mpi4py, no srun). Covers farming, per-task retry rules, the drain's
release of what was not handed out, and a lost rank ending the stage."""

from __future__ import annotations

import threading
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from scalebox_hpc import mpi
from scalebox_hpc.launcher import mpi_rank0
from scalebox_hpc.launcher.mpi_wire import (
    EXIT_LOST_RANK,
    STOP,
    TAG_CTRL,
    TAG_READY,
    TAG_RESULT,
    TAG_TASK,
    Opened,
    StageConfig,
)
from scalebox_hpc.models import HAND_OFF_BUSY, Message, Task, TaskResult
from scalebox_hpc.runtime.local import LocalRuntime
from scalebox_hpc.testing import InMemoryQueue

ANY = -1


class Status:
    def __init__(self) -> None:
        self.source, self.tag = ANY, ANY

    def Get_source(self) -> int:
        return self.source

    def Get_tag(self) -> int:
        return self.tag


class FakeComm:
    """Rank 0's view: ``answer(task)`` gives a worker's (status, stdout) for a task, or None to
    stay silent (a hung rank); announcements and barriers are no-ops."""

    def __init__(self, size: int, answer: Any) -> None:
        self.size, self.answer = size, answer
        self.inbox: deque[tuple[int, int, Any]] = deque((r, TAG_READY, True) for r in range(1, size))
        self.sent: list[tuple[int, int, Any]] = []
        self.aborted: int | None = None

    def Get_size(self) -> int:
        return self.size

    def Get_rank(self) -> int:
        return 0

    def Iprobe(self, source: int = ANY, tag: int = ANY, status: Status | None = None) -> bool:
        if not self.inbox:
            return False
        if status is not None:
            status.source, status.tag = self.inbox[0][0], self.inbox[0][1]
        return True

    def recv(self, source: int = ANY, tag: int = ANY) -> Any:
        return self.inbox.popleft()[2]

    def send(self, msg: Any, dest: int, tag: int) -> None:
        self.sent.append((dest, tag, msg))
        if tag == TAG_TASK:
            said = self.answer(msg)
            if said is not None:
                status, out = said
                now = datetime.now(UTC)
                result = TaskResult(status=status, started_at=now, finished_at=now, stdout=out,
                                    messages=[Message(f"from-{msg.body}", module="sink")] if status == 0 else [])
                self.inbox.append((dest, TAG_RESULT, (msg.id, result, "n1")))
                self.inbox.append((dest, TAG_READY, True))

    def Ibarrier(self) -> Any:
        return SimpleNamespace(Wait=lambda: None, Test=lambda: True)

    def bcast(self, msg: Any, root: int = 0) -> Any:
        return msg

    def Abort(self, code: int) -> None:
        self.aborted = code


APP = {"name": "farm", "modules": {
    "work": {"sink_modules": ["sink"], "mpi": {"mode": "farm", "batch": 3},
             "parameters": {"retry_rules": ["3:1"]},
             "arguments": {"heartbeat_seconds": 2, "max_idle_polls": 1, "sleep_interval_seconds": 0.01}},
    "sink": {}}}


@pytest.fixture(autouse=True)
def _no_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpi, "load_mpi", lambda: SimpleNamespace(Status=Status, ANY_SOURCE=ANY, ANY_TAG=ANY))


def stage(tmp_path: Path, queue: InMemoryQueue, app: int, comm: FakeComm, stop: threading.Event | None = None,
          ) -> mpi_rank0.Master:
    (tmp_path / "work").mkdir(exist_ok=True)
    config = StageConfig(module="work", work_root=tmp_path / "work", app_id=app, grace=0.0)
    return mpi_rank0.Master(comm, config, lambda: Opened(queue, app, {}), stop or threading.Event(), LocalRuntime())


def new_app(tmp_path: Path, bodies: list[str], queue: InMemoryQueue | None = None) -> tuple[InMemoryQueue, int]:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    queue = InMemoryQueue() if queue is None else queue
    spec = {**APP, "modules": {**APP["modules"], "work": {**APP["modules"]["work"], "code_path": str(code)}}}
    app = queue.create_app(spec)
    queue.add_tasks(app, "work", bodies)
    return queue, app


def by_body(queue: InMemoryQueue, app: int, module: str) -> dict[str, dict[str, Any]]:
    return {t["body"]: t for t in queue.tasks(app, module=module)}


def test_rank0_farms_tasks_records_results_and_applies_retry_rules(tmp_path: Path) -> None:
    queue, app = new_app(tmp_path, ["a", "b", "c", "d", "flaky"])
    tries: dict[str, int] = {}

    def answer(task: Task) -> tuple[int, str]:
        tries[task.body] = tries.get(task.body, 0) + 1
        return (3, "") if task.body == "flaky" and tries[task.body] == 1 else (0, f"ran {task.body}")

    comm = FakeComm(3, answer)
    assert stage(tmp_path, queue, app, comm).run() == 0
    work = by_body(queue, app, "work")
    assert {b: t["status"] for b, t in work.items()} == {b: 0 for b in ["a", "b", "c", "d", "flaky"]}
    assert tries["flaky"] == 2  # status 3: one more attempt, by the module's retry rule
    assert sorted(by_body(queue, app, "sink")) == ["from-a", "from-b", "from-c", "from-d", "from-flaky"]
    assert {(d, m) for d, t, m in comm.sent if t == TAG_CTRL} == {(1, STOP), (2, STOP)}
    [slot] = [s for s in queue.slots(app) if s["seq"] == 0]
    assert slot["status"] == "EXITED" and slot["tasks_done"] == 6  # every recorded run, the requeued one too


def test_a_drain_releases_what_was_not_handed_out(tmp_path: Path) -> None:
    queue, app = new_app(tmp_path, [f"t{i}" for i in range(6)])
    stop = threading.Event()

    def answer(task: Task) -> tuple[int, str]:
        stop.set()  # the stage is told to drain while the first tasks run
        return 0, ""

    comm = FakeComm(2, answer)
    assert stage(tmp_path, queue, app, comm, stop).run() == 0
    statuses = sorted(t["status"] for t in queue.tasks(app, module="work"))
    assert statuses.count(0) == 1  # the one handed out finished and was recorded
    assert all(s < 0 for s in statuses[:-1]) and len(statuses) == 6  # the rest: READY again
    assert not any(t["status"] == -3 for t in queue.tasks(app, module="work"))  # none left RUNNING


def test_a_silent_rank_ends_the_stage_and_its_task_is_left_to_lease_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue, app = new_app(tmp_path, ["quiet", "b"])
    clock = [0.0]
    monkeypatch.setattr(mpi_rank0.time, "monotonic", lambda: clock[0])

    def answer(task: Task) -> tuple[int, str] | None:
        clock[0] += 10.0  # more than 1.5 heartbeats pass without a word from the rank
        return None

    comm = FakeComm(2, answer)
    master = stage(tmp_path, queue, app, comm)
    assert master.run() == EXIT_LOST_RANK
    assert comm.aborted == EXIT_LOST_RANK
    assert "rank(s) 1 silent" in master.lost_message
    work = by_body(queue, app, "work")
    assert work["quiet"]["status"] == -3  # still RUNNING under the stage's lease: recovery brings it back
    assert work["b"]["status"] != -3  # never handed out: released at once


class BusyFirst(InMemoryQueue):
    """An in-memory queue whose first hand-offs find every row held by another transaction
    (HAND_OFF_BUSY, as PostgreSQL answers while a claim statement looks at the rows: 0030)."""

    def __init__(self, busy_calls: int) -> None:
        super().__init__()
        self.busy_calls, self.hand_offs = busy_calls, 0

    def complete_many(self, items: Any, **kwargs: Any) -> list[int | None]:
        self.hand_offs += 1
        if self.hand_offs <= self.busy_calls:
            return [HAND_OFF_BUSY] * len(items)
        return super().complete_many(items, **kwargs)


def test_rank0_records_results_whose_rows_were_busy_on_the_next_try(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Busy items are neither lost nor counted as lost leases: rank 0 tries them again shortly
    and they are recorded with their messages (the dispatcher's retry has its own tests)."""
    monkeypatch.setattr(mpi_rank0, "BUSY_RETRY_SECONDS", 0.0)
    queue = BusyFirst(busy_calls=2)
    _, app = new_app(tmp_path, ["a", "b"], queue)
    comm = FakeComm(3, lambda task: (0, f"ran {task.body}"))
    assert stage(tmp_path, queue, app, comm).run() == 0
    assert {b: t["status"] for b, t in by_body(queue, app, "work").items()} == {"a": 0, "b": 0}
    assert sorted(by_body(queue, app, "sink")) == ["from-a", "from-b"]
    assert queue.hand_offs > 2  # answered busy twice, then recorded
    [slot] = [s for s in queue.slots(app) if s["seq"] == 0]
    assert slot["tasks_done"] == 2


def test_rank0_gives_busy_results_up_after_the_limit_and_leaves_them_to_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A row held for BUSY_GIVE_UP_SECONDS: the result is given up (logged), the task stays
    RUNNING under the stage's lease, and recovery brings it back; nothing is counted done."""
    monkeypatch.setattr(mpi_rank0, "BUSY_RETRY_SECONDS", 0.0)
    monkeypatch.setattr(mpi_rank0, "BUSY_GIVE_UP_SECONDS", 0.0)
    queue = BusyFirst(busy_calls=10**6)
    _, app = new_app(tmp_path, ["a"], queue)
    stop = threading.Event()

    def answer(task: Task) -> tuple[int, str]:
        stop.set()  # drain after this one: else the stage waits for the RUNNING task's recovery
        return 0, "ran"

    comm = FakeComm(2, answer)
    assert stage(tmp_path, queue, app, comm, stop).run() == 0
    assert by_body(queue, app, "work")["a"]["status"] == -3
    assert by_body(queue, app, "sink") == {}
    [slot] = [s for s in queue.slots(app) if s["seq"] == 0]
    assert slot["tasks_done"] == 0

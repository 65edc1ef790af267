"""How deep a slot's prefetch is: about PREFETCH_SECONDS of work, more when the database is slow
(a refill waits for the batch being served, then its own), never more than PREFETCH."""

from __future__ import annotations

from scalebox_hpc.launcher import dispatcher as dsp
from scalebox_hpc.launcher.dispatcher import Dispatcher
from scalebox_hpc.testing import InMemoryQueue


def depth(task_seconds: float | None, batch_seconds: float | None) -> int:
    d = Dispatcher(lambda: InMemoryQueue())
    if task_seconds is not None:
        d._task_seconds[7] = task_seconds
    d._batch_seconds = batch_seconds
    return d._depth(7)


def test_prefetch_holds_about_a_tenth_of_a_second_of_work_while_the_database_is_quick() -> None:
    assert depth(None, None) == 0  # the tasks' time is not known yet
    assert depth(0.05, None) == 2
    assert depth(0.05, 0.001) == 2
    assert depth(3.0, 0.5) == 0  # long tasks are never held back behind one another


def test_a_slow_database_deepens_the_prefetch_so_the_slot_never_waits() -> None:
    # batches of 50 ms: a refill sent at half the buffer comes back after ~2 of them
    assert depth(0.05, 0.05) == int(dsp.REFILL_BATCHES * 0.05 / 0.05)
    assert depth(0.005, 0.05) == dsp.PREFETCH  # capped

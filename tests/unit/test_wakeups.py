"""Wake-up hints between threads."""

from __future__ import annotations

import threading
import time

from scalebox_hpc.launcher.wakeups import Wakeups


def test_wait_returns_early_on_notify_for_its_module() -> None:
    w = Wakeups()
    seen = w.generation(1)
    threading.Timer(0.05, w.notify, args=(1,)).start()
    t0 = time.monotonic()
    assert w.wait(1, seen, 5.0) is True
    assert time.monotonic() - t0 < 2.0


def test_other_module_does_not_wake() -> None:
    w = Wakeups()
    seen = w.generation(1)
    w.notify(2)
    assert w.wait(1, seen, 0.05) is False


def test_notify_before_wait_is_not_lost() -> None:
    w = Wakeups()
    seen = w.generation(1)
    w.notify(1)  # arrives between the poll and the wait
    assert w.wait(1, seen, 0.01) is True


def test_notify_all_wakes_everyone() -> None:
    w = Wakeups()
    seen = w.generation(7)
    w.notify_all()
    assert w.wait(7, seen, 0.01) is True

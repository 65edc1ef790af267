"""Wake-up hints between threads."""

from __future__ import annotations

import threading

from scalebox_hpc.launcher.wakeups import Wakeups


def test_wait_returns_early_on_notify_for_its_module() -> None:
    # a wait of an hour that only the notify can end: no timing window to lose on a slow machine
    w = Wakeups()
    seen = w.generation(1)
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(w.wait(1, seen, 3600.0)), daemon=True)
    waiter.start()
    w.notify(1)
    waiter.join(30.0)
    assert woke == [True]


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

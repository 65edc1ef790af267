"""Wake-ups per module: NOTIFY hints (or local hand-offs) wake the slots waiting on a module."""

from __future__ import annotations

import threading


class Wakeups:
    """A generation counter per module; waiters sleep until it moves or their timeout ends."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._gen: dict[int, int] = {}

    def notify(self, module_id: int) -> None:
        """New work may be claimable in ``module_id``."""
        with self._cond:
            self._gen[module_id] = self._gen.get(module_id, 0) + 1
            self._cond.notify_all()

    def notify_all(self) -> None:
        """Wake every waiter (shutdown, app state change)."""
        with self._cond:
            for key in list(self._gen):
                self._gen[key] += 1
            self._gen[-1] = self._gen.get(-1, 0) + 1
            self._cond.notify_all()

    def generation(self, module_id: int) -> int:
        """The current generation of ``module_id`` (take it BEFORE polling, then wait on it)."""
        with self._cond:
            return self._gen.get(module_id, 0) + self._gen.get(-1, 0)

    def wait(self, module_id: int, seen: int, timeout: float) -> bool:
        """Wait until the generation differs from ``seen``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._gen.get(module_id, 0) + self._gen.get(-1, 0) != seen, timeout
            )

"""Wake-ups per module: NOTIFY hints (or local hand-offs) wake the slots waiting on a module."""

from __future__ import annotations

import threading
import time
from collections import deque

ECHO_SECONDS = 0.25
"""How long a local wake-up waits for its NOTIFY echo (normally a few ms away) to swallow it."""


class Wakeups:
    """A generation counter per module; waiters sleep until it moves or their timeout ends."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._gen: dict[int, int] = {}
        self._echoes: dict[int, deque[float]] = {}
        """Per module: until when each local wake-up's NOTIFY echo is expected."""

    def notify(self, module_id: int) -> None:
        """New work may be claimable in ``module_id`` (a NOTIFY hint). The echo of a local
        wake-up (:meth:`notify_local`) is swallowed: its slots were woken already, and a second
        wake-up would only make them claim again for nothing."""
        with self._cond:
            echoes = self._echoes.get(module_id)
            now = time.monotonic()
            while echoes and echoes[0] < now:
                echoes.popleft()  # its echo never came (no LISTEN, a reconnect): forget it
            if echoes:
                echoes.popleft()
                return
            self._gen[module_id] = self._gen.get(module_id, 0) + 1
            self._cond.notify_all()

    def notify_local(self, module_id: int, echoes: int = 1) -> None:
        """Wake the slots of ``module_id`` now: this node's own transactions (``echoes`` of them)
        made tasks READY there; their NOTIFY hints, when they come back, are swallowed."""
        with self._cond:
            self._gen[module_id] = self._gen.get(module_id, 0) + 1
            until = time.monotonic() + ECHO_SECONDS
            self._echoes.setdefault(module_id, deque()).extend([until] * echoes)
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

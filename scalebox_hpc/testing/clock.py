"""The clocks of the in-memory queue: real time, and time that moves only when told."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


# -- clocks ------------------------------------------------------------------------------------
class QueueClock(Protocol):
    """What the queue needs of time: the wall clock its leases and records use."""

    def now(self) -> datetime: ...


class SystemClock:
    """Real time."""

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def now(self) -> datetime:
        """The current UTC time."""
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        """``time.sleep``."""
        time.sleep(seconds)


class FakeClock:
    """Time that moves only when told (:meth:`advance`, :meth:`sleep`); thread-safe. Also
    satisfies ``launcher.ports.Clock``."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 0.0
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        """Seconds advanced so far."""
        with self._lock:
            return self._mono

    def now(self) -> datetime:
        """The fake wall clock."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        with self._lock:
            self._mono += seconds
            self._now += timedelta(seconds=seconds)

    def sleep(self, seconds: float) -> None:
        """Sleeping is advancing: no real time passes."""
        self.advance(seconds)


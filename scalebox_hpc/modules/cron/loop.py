"""The cron task's loop: at each tick, the tick's time to its modules, through a sink, now.

Rules (the clock and the sink are injected, so tests drive them):

- A tick is due when its time has come and it is later than the entry's last handled tick.
  Ticks at or before the task's start are not sent (as cron, a start does not fire at once).
- Only the **latest** due tick of an entry is sent. Ticks that a later one superseded while
  the task could not send (the database down, the process stopped, the machine suspended)
  are skipped and logged in one line once the latest is delivered, never replayed in a burst:
  a tick is dropped once it is more than one period late.
- All the ticks due at one moment go in one delivery (one transaction). When the sink reports
  an outage (DatabaseError) the same ticks are tried again with backoff, until the next tick
  of their entry supersedes them; the outage is logged when it starts and when it ends.
- The sink writes a tick's time as the message body under IGNORE, so a tick already in the
  queue (sent before a restart of this task, or by a second cron task) is not sent twice.
- While the app is PAUSED ticks are skipped (queued ticks would burst out at resume); once it
  has ended (FINISHED, or this task is no longer this slot's) the loop returns. The app's state
  comes with every delivery and, between ticks, at least every ``poll`` seconds.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, Protocol

from scalebox_hpc.errors import DatabaseError
from scalebox_hpc.modules.cron.schedule import Entry, format_tick

logger = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 5.0
"""The longest wait between two tries of a delivery during an outage: short, so a tick sent
late is still sent within seconds of the database's return."""

_COUNT_CAP = 1000


class AppState(enum.Enum):
    """What the sink reports of the app: send, skip, or stop."""

    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    ENDED = "ENDED"
    """FINISHED, or this cron task is no longer running in this slot (cancelled, recovered)."""


@dataclass(frozen=True)
class Tick:
    """One message to send: the tick's time to one module."""

    time: datetime
    entry: Entry
    index: int = 0
    """The entry's place in the loop's list."""

    @property
    def body(self) -> str:
        """``YYYY-MM-DDTHH:MM:SS`` (UTC): the message body, and the key that dedupes the tick."""
        return format_tick(self.time)


class Delivered(NamedTuple):
    """What a delivery did."""

    state: AppState
    written: int
    """Ticks inserted (0 for those already in the queue, and for all of them unless RUNNING)."""


class TickSink(Protocol):
    """Where ticks go (the queue): one call, one transaction."""

    def deliver(self, ticks: Sequence[Tick]) -> Delivered:
        """Read the app's state and, when RUNNING, insert ``ticks`` (none: only the state).
        Raises DatabaseError while the database cannot be reached."""
        ...


class Clock(Protocol):
    """Wall-clock time (UTC, aware) and sleeping; a fake one in tests."""

    def now(self) -> datetime:
        """The current time."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        """``datetime.now(UTC)``."""
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        """``time.sleep``."""
        time.sleep(seconds)


def backoff(failures: int) -> float:
    """Seconds before the next try after ``failures`` failed deliveries: 0.5, 1, 2, 4, 5, 5 ..."""
    return min(MAX_BACKOFF_SECONDS, 0.5 * 2.0 ** (failures - 1))


class CronLoop:
    """Runs the entries' schedules against ``clock``, delivering ticks to ``sink``."""

    def __init__(
        self, entries: Sequence[Entry], sink: TickSink, clock: Clock, *,
        run_for: timedelta | None = None, poll: float = 5.0,
    ) -> None:
        if not entries:
            raise ValueError("a cron loop needs at least one entry")
        self.entries = list(entries)
        self.sink = sink
        self.clock = clock
        self.run_for = run_for
        self.poll = poll
        self.sent = 0
        """Ticks written to the queue."""
        self.skipped = 0
        """Ticks not sent: superseded while the sink was unreachable, or due while the app was paused."""
        self._handled: list[datetime] = []
        self._state = AppState.RUNNING
        self._failures = 0
        self._outage_since: datetime | None = None

    def run(self) -> str:
        """Loop until the app ends or ``run_for`` has passed; returns why it stopped."""
        start = self.clock.now()
        self._handled = [start] * len(self.entries)
        end = None if self.run_for is None else start + self.run_for
        contact = start
        while True:
            now = self.clock.now()
            if end is not None and now >= end:
                return f"ran for {self.run_for}: {self.sent} tick(s) sent, {self.skipped} skipped"
            due = self._due(now)
            if due or (now - contact).total_seconds() >= self.poll:
                delivered = self._deliver(due)
                if delivered is None:  # an outage: try again soon, the same ticks if still the latest
                    self.clock.sleep(self._until(backoff(self._failures), end))
                    continue
                contact = now
                if delivered.state is AppState.ENDED:
                    return f"the app ended: {self.sent} tick(s) sent, {self.skipped} skipped"
                self._handle(due, delivered)
            wake = min(e.schedule.next_after(h) for e, h in zip(self.entries, self._handled, strict=True))
            wait = max(0.0, (wake - self.clock.now()).total_seconds()) + 0.001  # land just past the tick
            self.clock.sleep(self._until(min(wait, self.poll), end))

    def _until(self, seconds: float, end: datetime | None) -> float:
        """``seconds``, but not past ``end``."""
        if end is None:
            return seconds
        return max(0.0, min(seconds, (end - self.clock.now()).total_seconds()))

    def _due(self, now: datetime) -> list[Tick]:
        """The latest due tick of each entry that has one."""
        due = []
        for i, entry in enumerate(self.entries):
            latest = entry.schedule.latest_at_or_before(now)
            if latest > self._handled[i]:
                due.append(Tick(latest, entry, i))
        return due

    def _log_skipped(self, tick: Tick) -> None:
        """Count and log (one line) the ticks of ``tick``'s entry that ``tick`` superseded."""
        entry, handled = tick.entry, self._handled[tick.index]
        first = entry.schedule.next_after(handled)
        if first >= tick.time:
            return
        missed = self._count(entry, first, tick.time)
        self.skipped += missed
        last = entry.schedule.latest_at_or_before(tick.time - timedelta(seconds=1))
        logger.warning("line %d (%s -> %s): skipped %s late tick(s) from %s to %s; sending only the latest, %s",
                       entry.line, entry.schedule.text, entry.module,
                       f"{missed}+" if missed >= _COUNT_CAP else missed, format_tick(first), format_tick(last),
                       tick.body)

    @staticmethod
    def _count(entry: Entry, first: datetime, latest: datetime) -> int:
        """Ticks from ``first`` up to (not including) ``latest``, counted up to _COUNT_CAP."""
        n, t = 0, first
        while t < latest and n < _COUNT_CAP:
            n += 1
            t = entry.schedule.next_after(t)
        return n

    def _deliver(self, due: list[Tick]) -> Delivered | None:
        """One delivery; None during an outage (logged when it starts)."""
        try:
            delivered = self.sink.deliver(due)
        except DatabaseError as exc:
            self._failures += 1
            if self._outage_since is None:
                self._outage_since = self.clock.now()
                what = ", ".join(f"{t.body} -> {t.entry.module}" for t in due) or "the app's state"
                logger.warning("database unreachable (%s); retrying %s until the next tick", exc, what)
            return None
        if self._outage_since is not None:
            away = (self.clock.now() - self._outage_since).total_seconds()
            logger.warning("database reachable again after %.1f s (%d tries)", away, self._failures)
            self._outage_since = None
        self._failures = 0
        return delivered

    def _handle(self, due: list[Tick], delivered: Delivered) -> None:
        """Mark the delivered ticks handled; log state changes and what was sent."""
        if delivered.state is not self._state:
            logger.warning("the app is %s: %s", delivered.state.value,
                           "ticks are skipped until it runs again" if delivered.state is AppState.PAUSED
                           else "sending ticks again")
            self._state = delivered.state
        for tick in due:
            self._log_skipped(tick)
            self._handled[tick.index] = tick.time
        if not due:
            return
        if delivered.state is AppState.PAUSED:
            self.skipped += len(due)
            return
        self.sent += delivered.written
        for tick in due:
            logger.info("%s -> %s", tick.body, tick.entry.module)
        if delivered.written < len(due):
            logger.info("%d of these ticks were in the queue already (sent before a restart): not sent again",
                        len(due) - delivered.written)

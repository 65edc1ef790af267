"""cron.txt: lines ``SCHEDULE,MODULE``, and the ticks of each schedule (pure: no clock, no I/O).

A schedule is ``@every DURATION`` (Go's duration syntax, as Scalebox's cron took it from
robfig/cron: ``1m``, ``1m30s``, ``2h``), a descriptor (``@hourly``, ``@daily`` / ``@midnight``,
``@weekly``, ``@monthly``, ``@yearly`` / ``@annually``) or a standard 5-field cron expression
(minute hour day-of-month month day-of-week, evaluated by croniter). Every time is UTC, so no
tick is skipped or doubled at a daylight-saving change. ``@every`` ticks are aligned to the Unix
epoch (``@every 1m`` fires at every full minute, ``@every 1m30s`` whenever the epoch seconds are
a multiple of 90), not to the start of the task as in robfig/cron: a restarted cron task then
computes the same tick times, which is what makes a tick's time a key that dedupes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Protocol

from croniter import croniter

from scalebox_hpc.errors import PipelineError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SECOND = timedelta(seconds=1)
TICK_FORMAT = "%Y-%m-%dT%H:%M:%S"
"""The body of a tick message (Go's ``2006-01-02T15:04:05``, as Scalebox's cron sent it)."""

MAX_EVERY = timedelta(days=366)
"""The longest ``@every`` (longer periods are clearer as a cron expression)."""

DESCRIPTORS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
"""robfig/cron's predefined schedules, as the 5-field expressions they stand for."""

_NAMES = frozenset({
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    "sun", "mon", "tue", "wed", "thu", "fri", "sat", "l", "w", "lw"})
"""Words a field may hold: month and day names, and croniter's last-day / weekday marks. croniter's
``H`` (hashed) and ``R`` (random) are refused: a random schedule differs at each restart, so its
tick times could not dedupe a restarted task's ticks."""

_UNITS = {"ns": Fraction(1, 10**9), "us": Fraction(1, 10**6), "\u00b5s": Fraction(1, 10**6),
          "\u03bcs": Fraction(1, 10**6), "ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60),
          "h": Fraction(3600)}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_MAX_LINE_SHOWN = 80


class CronFileError(PipelineError):
    """A line of cron.txt is not ``SCHEDULE,MODULE`` with a schedule we can compute."""

    hint = ("each line is SCHEDULE,MODULE: '@every 1m30s,mod', '*/5 * * * *,mod' or '@daily,mod' "
            "(times in UTC); '#' starts a comment line")


class Schedule(Protocol):
    """The ticks of one schedule: whole seconds, UTC."""

    @property
    def text(self) -> str:
        """The schedule as written."""
        ...

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after ``t``."""
        ...

    def latest_at_or_before(self, t: datetime) -> datetime:
        """The last tick at or before ``t``."""
        ...


def _floor(t: datetime) -> datetime:
    return t.replace(microsecond=0)


@dataclass(frozen=True)
class Every:
    """``@every DURATION``: a tick whenever the Unix time is a multiple of ``seconds``."""

    text: str
    seconds: int

    def next_after(self, t: datetime) -> datetime:
        """The first multiple of the period after ``t``."""
        n = (t - EPOCH) // SECOND // self.seconds
        return EPOCH + (n + 1) * self.seconds * SECOND

    def latest_at_or_before(self, t: datetime) -> datetime:
        """The last multiple of the period at or before ``t``."""
        n = (t - EPOCH) // SECOND // self.seconds
        return EPOCH + n * self.seconds * SECOND


@dataclass(frozen=True)
class CronExpr:
    """A 5-field cron expression (or a descriptor for one), computed by croniter in UTC."""

    text: str
    expression: str

    def next_after(self, t: datetime) -> datetime:
        """croniter's next time after ``t``."""
        nxt: datetime = croniter(self.expression, _floor(t)).get_next(datetime)
        return nxt

    def latest_at_or_before(self, t: datetime) -> datetime:
        """croniter's previous time before the next second (ticks are whole minutes)."""
        prev: datetime = croniter(self.expression, _floor(t) + SECOND).get_prev(datetime)
        return prev


@dataclass(frozen=True)
class Entry:
    """One line of cron.txt."""

    line: int
    """1-based line number in the file."""
    text: str
    """The line as written (stripped)."""
    schedule: Schedule
    module: str


def format_tick(t: datetime) -> str:
    """A tick's message body: ``YYYY-MM-DDTHH:MM:SS`` in UTC."""
    return t.astimezone(UTC).strftime(TICK_FORMAT)


def parse_duration(text: str) -> Fraction:
    """Go's ``time.ParseDuration`` syntax (``1m30s``, ``1.5h``, ``300ms``), in seconds; ValueError
    when ``text`` is not one (no sign: a negative period means nothing here)."""
    if text == "0":
        return Fraction(0)
    pos, total = 0, Fraction(0)
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"{text!r} is not a duration such as 90s, 1m30s or 2h")
        total += Fraction(match[1]) * _UNITS[match[2]]
        pos = match.end()
    if not text:
        raise ValueError("an empty duration")
    return total


def parse_schedule(text: str) -> Schedule:
    """One schedule (the part of a line before its last comma); ValueError saying what is wrong."""
    if text.startswith("@every"):
        rest = text[len("@every"):]
        if not rest[:1].isspace():
            raise ValueError("write '@every DURATION', e.g. '@every 1m30s'")
        return _every(text, rest.strip())
    if text.startswith("@"):
        if text in DESCRIPTORS:
            return CronExpr(text, DESCRIPTORS[text])
        raise ValueError(f"unknown descriptor {text!r}; known: @every DURATION, {', '.join(DESCRIPTORS)}")
    if re.match(r"(CRON_)?TZ=", text):
        raise ValueError("time zones are not supported: schedules are in UTC")
    return _expression(text)


def _every(text: str, duration: str) -> Every:
    seconds = parse_duration(duration)
    if seconds < 1:
        raise ValueError(f"@every {duration}: the period must be at least 1s")
    if seconds.denominator != 1:
        raise ValueError(f"@every {duration}: the period must be whole seconds (ticks are named by the second)")
    if seconds > MAX_EVERY.total_seconds():
        raise ValueError(f"@every {duration}: the period must be at most {MAX_EVERY.days * 24}h; "
                         "use a cron expression for longer ones")
    return Every(text, int(seconds))


def _expression(text: str) -> CronExpr:
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"a cron expression has 5 fields (minute hour day-of-month month day-of-week), "
                         f"not {len(fields)}")
    for word in re.findall(r"[^\W\d_]+", text):
        if word.lower() not in _NAMES:
            raise ValueError(f"{word!r} is not a month or day name")
    if not all(re.fullmatch(r"[0-9A-Za-z*/,?#-]+", f) for f in fields):
        raise ValueError("a field holds characters other than digits, names and * / , - ? #")
    expression = " ".join(fields)
    try:
        # croniter refuses what it cannot compute; get_next also refuses a date that never comes (Feb 30)
        croniter(expression, EPOCH).get_next(datetime)
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as exc:
        raise ValueError(f"not a valid cron expression: {exc}") from exc
    return CronExpr(text, expression)


def _shown(text: str) -> str:
    """The line, quoted, one line and at most _MAX_LINE_SHOWN characters."""
    short = text if len(text) <= _MAX_LINE_SHOWN else text[:_MAX_LINE_SHOWN - 3] + "..."
    return repr(short)


def parse_line(number: int, line: str, *, file: str = "cron.txt") -> Entry | None:
    """One line: None for a blank or ``#`` comment line; else its Entry, or CronFileError."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    schedule_text, comma, module = text.rpartition(",")
    schedule_text, module = schedule_text.strip(), module.strip()
    try:
        if not comma:
            raise ValueError("no comma: expected SCHEDULE,MODULE")
        if not module:
            raise ValueError("no module name after the last comma")
        if not module.isprintable():
            raise ValueError("the module name holds control characters")
        if not schedule_text:
            raise ValueError("no schedule before the comma")
        schedule = parse_schedule(schedule_text)
    except ValueError as exc:
        raise CronFileError(f"{exc}: {_shown(text)}", file=file, line=number) from None
    return Entry(number, text, schedule, module)


def parse_cron_file(text: str, *, file: str = "cron.txt") -> list[Entry]:
    """Every schedule line of a cron.txt, in order. Lines are split on ``\\n`` only (a stray
    ``\\r`` of a DOS file is whitespace), so line numbers are an editor's. A line that is not
    ``SCHEDULE,MODULE`` raises :class:`CronFileError` naming ``file``, the line number and the
    line; nothing else is raised, whatever the text."""
    entries = []
    for number, line in enumerate(text.split("\n"), 1):
        entry = parse_line(number, line, file=file)
        if entry is not None:
            entries.append(entry)
    return entries

"""The standard cron module's pure parts: cron.txt parsing (with a property test: any text gives
entries or CronFileError), tick computation in UTC, and the loop against a fake clock and sink
(ticks at the right times to the right modules, no burst after a gap, outages, pause, end)."""

from __future__ import annotations

import itertools
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalebox_hpc.errors import DatabaseError, ScaleboxError
from scalebox_hpc.models import ConflictAction, ModuleRef
from scalebox_hpc.modules.cron.__main__ import ConfigError, check_targets, read_table
from scalebox_hpc.modules.cron.loop import AppState, CronLoop, Delivered, Tick, backoff
from scalebox_hpc.modules.cron.schedule import (
    CronExpr,
    CronFileError,
    Every,
    format_tick,
    parse_cron_file,
    parse_duration,
)
from scalebox_hpc.pipeline import STANDARD_MODULES, load_pipeline

T0 = datetime(2026, 3, 28, 23, 59, 0, 250_000, tzinfo=UTC)  # the night of the EU's spring DST change


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# -- parsing -----------------------------------------------------------------------------------

def test_scalebox_cron_txt_parses() -> None:
    # Scalebox's own example file (dockerfiles/cron/cron.txt), plus an expression and a descriptor
    entries = parse_cron_file("# comments\n@every 1m,mod0\n@every 1m30s,mod1\n\n  */5 * * * * , mod2\n@daily,mod3")
    assert [(e.line, e.module, e.schedule) for e in entries] == [
        (2, "mod0", Every("@every 1m", 60)),
        (3, "mod1", Every("@every 1m30s", 90)),
        (5, "mod2", CronExpr("*/5 * * * *", "*/5 * * * *")),
        (6, "mod3", CronExpr("@daily", "0 0 * * *")),
    ]


def test_lists_in_an_expression_keep_their_commas() -> None:
    # split at the LAST comma: Scalebox split at every comma and so refused "0,30 * * * *,mod"
    [entry] = parse_cron_file("0,30 9-17 * * mon-fri,report")
    assert (entry.module, entry.schedule.text) == ("report", "0,30 9-17 * * mon-fri")


@pytest.mark.parametrize(("line", "why"), [
    ("@every 1m", "no comma"),
    ("@every 1m,", "no module name"),
    (",mod", "no schedule"),
    ("@every,mod", "@every DURATION"),
    ("@every 1x,mod", "not a duration"),
    ("@every -1s,mod", "not a duration"),
    ("@every 500ms,mod", "at least 1s"),
    ("@every 1.5s,mod", "whole seconds"),
    ("@every 9000h,mod", "at most"),
    ("@reboot,mod", "unknown descriptor"),
    ("* * * *,mod", "5 fields"),
    ("0 * * * * *,mod", "5 fields"),
    ("61 * * * *,mod", "not a valid cron expression"),
    ("0 0 30 2 *,mod", "not a valid cron expression"),  # Feb 30 never comes
    ("H * * * *,mod", "not a month or day name"),
    ("R * * * *,mod", "not a month or day name"),  # croniter's random: no stable tick times
    ("CRON_TZ=Europe/Paris 0 9 * * *,mod", "UTC"),
    ("0 9 * * *,mo\x01d", "control characters"),
])
def test_a_bad_line_is_an_error_naming_it(line: str, why: str) -> None:
    with pytest.raises(CronFileError) as err:
        parse_cron_file(f"# header\n@every 1m,ok\n{line}\n@every 2m,ok2", file="cron.txt")
    text = str(err.value)
    assert text.startswith("cron.txt:3: "), text
    assert why in text
    assert repr(line.strip())[:40].rstrip("'") in text  # the line itself, quoted
    assert err.value.line == 3 and isinstance(err.value, ScaleboxError)


def test_line_numbers_count_newlines_only() -> None:
    # a DOS file's \r is whitespace; a form feed does not start a line (str.splitlines would)
    with pytest.raises(CronFileError, match=r"^cron.txt:3: "):
        parse_cron_file("@every 1m,a\r\n@every 1m,b\x0c\r\nbad\r\n")


CRONISH = "0123456789*/,-? \t\n#@everyminthsdalwkLWHR.µjanfebsunmon"
"""Characters of near-valid lines: arbitrary text rarely gets past the field count to croniter."""


FIVE_FIELDS = st.lists(st.text(alphabet="0123456789012345*/,-*LW#?", min_size=1, max_size=3),
                       min_size=5, max_size=5).map(lambda fields: " ".join(fields) + ",m")
"""Lines of five fields: what croniter itself gets to judge."""


@given(st.one_of(st.text(max_size=300), st.text(alphabet=CRONISH, max_size=80), FIVE_FIELDS),
       st.integers(min_value=0, max_value=10**9))
@settings(max_examples=800, deadline=None)
def test_any_text_parses_or_raises_cron_file_error(text: str, offset: int) -> None:
    try:
        entries = parse_cron_file(text)
    except CronFileError as exc:
        assert re.match(r"cron\.txt:\d+: ", str(exc))
        assert "\n" not in str(exc)
        return
    at = T0 + timedelta(seconds=offset)
    for e in entries:  # and what parses, computes
        assert e.module and "," not in e.module
        assert e.schedule.latest_at_or_before(at) <= at < e.schedule.next_after(at)


@given(st.lists(st.sampled_from([
    "@every 1m", "@every 1m30s", "@hourly", "*/5 * * * *", "0,30 1-3 * jan,feb sun", "@every 45s", "7 7 7 7 *",
    "@every 1h2m3s", "junk", "* * *", "0 0 L * *", "@weekly",
]), min_size=1, max_size=6), st.lists(st.sampled_from(["a", "b", "", "  c ", "#x"]), min_size=6, max_size=6))
@settings(max_examples=200, deadline=None)
def test_parsing_is_line_by_line(schedules: list[str], modules: list[str]) -> None:
    lines = [f"{s},{m}" for s, m in zip(schedules, modules, strict=False)]
    try:
        entries = parse_cron_file("\n".join(lines))
    except CronFileError as exc:
        bad = exc.line
        assert bad is not None
        assert all(parse_cron_file(ln) is not None for ln in lines[:bad - 1])  # every earlier line was fine
        with pytest.raises(CronFileError):
            parse_cron_file(lines[bad - 1])
        return
    assert [e.line for e in entries] == list(range(1, len(lines) + 1))


def test_durations_follow_go() -> None:
    assert parse_duration("1m30s") == 90
    assert parse_duration("1.5h") == 5400
    assert parse_duration("2h45m0.5s") == Fraction(19801, 2)
    assert parse_duration("300ms") == Fraction(3, 10)
    assert parse_duration("0") == 0
    for bad in ("", "1", "m", "1m 30s", "+1s", "1d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# -- tick computation --------------------------------------------------------------------------

def ticks(schedule: Every | CronExpr, start: datetime, n: int) -> list[str]:
    out, t = [], start
    for _ in range(n):
        t = schedule.next_after(t)
        out.append(format_tick(t))
    return out


def test_every_1m30s_ticks_on_multiples_of_90_epoch_seconds() -> None:
    [entry] = parse_cron_file("@every 1m30s,m")
    # a UTC midnight is a multiple of 90 s (86400 = 960 x 90)
    assert ticks(entry.schedule, T0, 4) == [
        "2026-03-29T00:00:00", "2026-03-29T00:01:30", "2026-03-29T00:03:00", "2026-03-29T00:04:30"]
    assert ticks(entry.schedule, utc("2026-03-29T00:01:30"), 1) == ["2026-03-29T00:03:00"]  # strictly after
    assert entry.schedule.latest_at_or_before(utc("2026-03-29T00:01:30")) == utc("2026-03-29T00:01:30")
    assert entry.schedule.latest_at_or_before(utc("2026-03-29T00:01:29.999")) == utc("2026-03-29T00:00:00")


def test_a_five_field_expression_ticks_in_utc_across_a_dst_change() -> None:
    # 01:00 UTC on 2026-03-29 is when Europe's clocks jump: in UTC nothing is skipped or doubled
    [entry] = parse_cron_file("*/20 0-2 * * *,m")
    assert ticks(entry.schedule, utc("2026-03-29T00:30:00"), 6) == [
        "2026-03-29T00:40:00", "2026-03-29T01:00:00", "2026-03-29T01:20:00", "2026-03-29T01:40:00",
        "2026-03-29T02:00:00", "2026-03-29T02:20:00"]
    assert entry.schedule.latest_at_or_before(utc("2026-03-29T01:00:00")) == utc("2026-03-29T01:00:00")
    assert entry.schedule.latest_at_or_before(utc("2026-03-29T03:59:59")) == utc("2026-03-29T02:40:00")


def test_descriptors_and_names() -> None:
    weekly, monthly = (e.schedule for e in parse_cron_file("@weekly,a\n0 12 1 jan,jul *,b"))
    assert ticks(weekly, T0, 2) == ["2026-03-29T00:00:00", "2026-04-05T00:00:00"]  # Sundays
    assert ticks(monthly, T0, 2) == ["2026-07-01T12:00:00", "2027-01-01T12:00:00"]


# -- the loop ----------------------------------------------------------------------------------

@dataclass
class FakeClock:
    t: datetime
    jumps: dict[datetime, timedelta] = field(default_factory=dict)
    """A suspend: the first sleep that ends at or after KEY adds VALUE on top."""

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.t += timedelta(seconds=seconds)
        for at, extra in list(self.jumps.items()):
            if self.t >= at:
                self.t += extra
                del self.jumps[at]


@dataclass
class FakeSink:
    clock: FakeClock
    down: list[tuple[datetime, datetime]] = field(default_factory=list)
    states: list[tuple[datetime, AppState]] = field(default_factory=list)
    """(from, state): the app's state from that time on."""
    queue: dict[tuple[str, str], datetime] = field(default_factory=dict)
    """(module, body) -> when it was written: what IGNORE keeps."""
    batches: list[list[str]] = field(default_factory=list)
    """The ticks of each delivery that had some."""

    def deliver(self, ticks: Sequence[Tick]) -> Delivered:
        now = self.clock.now()
        if ticks:
            self.batches.append([t.body for t in ticks])
        if any(a <= now < b for a, b in self.down):
            raise DatabaseError("cannot reach PostgreSQL: connection refused")
        state = AppState.RUNNING
        for since, st_ in self.states:
            if now >= since:
                state = st_
        if state is not AppState.RUNNING:
            return Delivered(state, 0)
        written = 0
        for tick in ticks:
            key = (tick.entry.module, tick.body)
            if key not in self.queue:
                self.queue[key] = now
                written += 1
        return Delivered(state, written)

    def bodies(self, module: str) -> list[str]:
        return sorted(b for m, b in self.queue if m == module)


def run(text: str, clock: FakeClock, sink: FakeSink, seconds: float) -> CronLoop:
    loop = CronLoop(parse_cron_file(text), sink, clock, run_for=timedelta(seconds=seconds))
    loop.run()
    return loop


def test_ticks_arrive_at_their_modules_on_time() -> None:
    clock = FakeClock(T0)
    sink = FakeSink(clock)
    loop = run("@every 1m30s,a\n@every 1m,b\n*/2 * * * *,c", clock, sink, 300)
    assert sink.bodies("a") == ["2026-03-29T00:00:00", "2026-03-29T00:01:30", "2026-03-29T00:03:00"]
    assert sink.bodies("b") == [f"2026-03-29T00:0{m}:00" for m in range(5)]
    assert sink.bodies("c") == ["2026-03-29T00:00:00", "2026-03-29T00:02:00", "2026-03-29T00:04:00"]
    for (_, body), written_at in sink.queue.items():  # each at its tick (within the 1 ms landing margin)
        assert timedelta(0) <= written_at - utc(body) < timedelta(milliseconds=5)
    assert (loop.sent, loop.skipped) == (11, 0)
    # the ticks due at one moment go in one delivery
    assert [len(b) for b in sink.batches] == [3, 1, 1, 2, 2, 2]


def test_no_tick_at_the_start_and_none_twice_on_a_restart() -> None:
    clock = FakeClock(utc("2026-03-29T00:00:00"))  # exactly on a tick: it was the previous task's
    sink = FakeSink(clock)
    sink.queue[("a", "2026-03-29T00:00:00")] = clock.t
    run("@every 10s,a", clock, sink, 25)
    assert sink.bodies("a") == ["2026-03-29T00:00:00", "2026-03-29T00:00:10", "2026-03-29T00:00:20"]


def test_two_cron_tasks_at_once_send_each_tick_once() -> None:
    # an orphan of a lost launcher and its replacement: the tick's time is the key that dedupes
    clock = FakeClock(T0)
    sink = FakeSink(clock)
    first = run("@every 5s,a", clock, sink, 30)
    clock.t = T0 + timedelta(seconds=12)  # the second task started while the first still ran
    second = run("@every 5s,a", clock, sink, 30)
    assert len(sink.bodies("a")) == len(set(sink.bodies("a"))) == 8
    assert first.sent == 6 and second.sent == 2  # its first 4 ticks were in the queue already


def test_no_burst_after_a_suspend() -> None:
    # the process stops for 10 minutes: the minute ticks missed are skipped, only the latest is sent
    clock = FakeClock(T0, jumps={utc("2026-03-29T00:01:30"): timedelta(minutes=10)})
    sink = FakeSink(clock)
    loop = run("@every 1m,a", clock, sink, 16 * 60)
    got = sink.bodies("a")
    assert got[:2] == ["2026-03-29T00:00:00", "2026-03-29T00:01:00"]
    assert got[2] == "2026-03-29T00:11:00"  # woke at 00:11:30: 00:02 .. 00:10 skipped
    assert got[3:] == [f"2026-03-29T00:{m}:00" for m in range(12, 16)]
    assert loop.skipped == 9
    # no catching up: the late one went at the wake-up (00:11:30), the next at its own time
    times = sorted(sink.queue.values())
    assert times[2] - utc("2026-03-29T00:11:30") < timedelta(milliseconds=5)
    assert all(b - a >= timedelta(seconds=30) for a, b in itertools.pairwise(times))


def test_an_outage_retries_the_tick_then_skips_to_the_next(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="scalebox_hpc.modules.cron")
    clock = FakeClock(T0)
    # down for 3.2 s around the 00:01:00 tick: it is sent late, when the database is back
    # down for 70 s around 00:03:00: that tick is superseded by 00:04:00, which is sent late
    sink = FakeSink(clock, down=[(utc("2026-03-29T00:00:59.5"), utc("2026-03-29T00:01:02.7")),
                                 (utc("2026-03-29T00:02:50"), utc("2026-03-29T00:04:00.9"))])
    loop = run("@every 1m,a", clock, sink, 6 * 60)
    assert sink.bodies("a") == [f"2026-03-29T00:0{m}:00" for m in (0, 1, 2, 4, 5)]
    assert utc("2026-03-29T00:01:02.7") <= sink.queue[("a", "2026-03-29T00:01:00")] < utc("2026-03-29T00:01:05")
    assert sink.queue[("a", "2026-03-29T00:04:00")] < utc("2026-03-29T00:04:06")
    assert loop.skipped == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("database unreachable" in w for w in warnings) == 2  # one line per outage, not per try
    assert sum("reachable again" in w for w in warnings) == 2
    [skip] = [w for w in warnings if "skipped" in w]
    assert "skipped 1 late tick(s) from 2026-03-29T00:03:00 to 2026-03-29T00:03:00" in skip
    assert "sending only the latest, 2026-03-29T00:04:00" in skip


def test_a_paused_app_gets_no_ticks_and_no_burst_on_resume() -> None:
    clock = FakeClock(T0)
    sink = FakeSink(clock, states=[(utc("2026-03-29T00:00:30"), AppState.PAUSED),
                                   (utc("2026-03-29T00:03:30"), AppState.RUNNING)])
    loop = run("@every 1m,a", clock, sink, 5 * 60)
    assert sink.bodies("a") == ["2026-03-29T00:00:00", "2026-03-29T00:04:00"]
    assert loop.skipped == 3


def test_the_loop_ends_when_the_app_ends() -> None:
    clock = FakeClock(T0)
    sink = FakeSink(clock, states=[(utc("2026-03-29T00:00:10"), AppState.ENDED)])
    loop = CronLoop(parse_cron_file("@hourly,a"), sink, clock, poll=5.0)
    assert "the app ended" in loop.run()
    assert clock.t < utc("2026-03-29T00:00:16")  # noticed within one poll, not at the next tick


def test_backoff_is_short_and_bounded() -> None:
    assert [backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


# -- configuration -----------------------------------------------------------------------------

def refs(*names: str, sinks: tuple[str, ...] = ()) -> dict[str, ModuleRef]:
    return {n: ModuleRef(i, n, sinks if n == "cron" else (), ConflictAction.FAIL) for i, n in enumerate(names)}


def test_targets_must_be_sinks_of_the_cron_module() -> None:
    entries = parse_cron_file("@every 1m,a\n\n@every 1m,b")
    check_targets(entries, refs("cron", "a", "b", sinks=("a", "b")), "cron", "cron.txt")
    with pytest.raises(CronFileError, match=r"cron.txt:3: module 'b' is not in sink_modules of 'cron'"):
        check_targets(entries, refs("cron", "a", "b", sinks=("a",)), "cron", "cron.txt")
    with pytest.raises(CronFileError, match=r"cron.txt:3: no module 'b' in this app \(did you mean 'bb'\?\)"):
        check_targets(entries, refs("cron", "a", "bb", sinks=("a", "bb")), "cron", "cron.txt")


def test_the_table_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "cron.txt"
    path.write_text("@every 1m,a\n")
    assert read_table({"CRON_FILE": str(path)}) == ("@every 1m,a\n", str(path))
    assert read_table({"CRON_TABLE": "@hourly,b"}) == ("@hourly,b", "CRON_TABLE")
    with pytest.raises(ConfigError) as err:
        read_table({"CRON_FILE": str(tmp_path / "nope.txt")})
    assert err.value.code == 10
    for env in ({}, {"CRON_FILE": str(path), "CRON_TABLE": "@hourly,b"}):
        with pytest.raises(ConfigError) as err:
            read_table(env)
        assert err.value.code == 14


def test_cron_is_a_standard_module() -> None:
    run_sh = STANDARD_MODULES / "cron" / "run.sh"
    assert run_sh.is_file() and run_sh.stat().st_mode & 0o111


def test_code_path_scalebox_cron_resolves(tmp_path: Path) -> None:
    app = tmp_path / "app.yaml"
    app.write_text("name: x\nmodules:\n  tick:\n    code_path: scalebox:cron\n    sink_modules: [a]\n"
                   "  a: {code_path: 'scalebox:list-dir'}\n")
    spec = load_pipeline(app, environ={})
    assert spec.modules[0].code_path == STANDARD_MODULES / "cron"


def test_cron_table_as_a_yaml_block(tmp_path: Path) -> None:
    app = tmp_path / "app.yaml"
    app.write_text(textwrap.dedent("""\
        name: x
        modules:
          cron:
            code_path: scalebox:cron
            sink_modules: [a]
            environments:
              CRON_TABLE: |
                # every minute and at 9:30 UTC
                @every 1m,a
                30 9 * * *,a
          a: {code_path: 'scalebox:list-dir'}
    """))
    table = load_pipeline(app, environ={}).modules[0].environments["CRON_TABLE"]
    assert [(e.line, e.schedule.text) for e in parse_cron_file(table)] == [(2, "@every 1m"), (3, "30 9 * * *")]


def program(env: dict[str, str], argv: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEBOX_", "PG", "CRON_"))}
    return subprocess.run(argv or [sys.executable, "-P", "-m", "scalebox_hpc.modules.cron"], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("env", "code", "says"), [
    ({"CRON_TABLE": "@every 1m,a\n\n61 * * * *,b"}, 14, "CRON_TABLE:3: not a valid cron expression"),
    ({"CRON_TABLE": "# nothing\n"}, 14, "has no schedule line"),
    ({"CRON_FILE": "/nonexistent/cron.txt"}, 10, "cannot read CRON_FILE '/nonexistent/cron.txt'"),
    ({"CRON_TABLE": "@every 1m,a", "CRON_DURATION": "soon"}, 14, "CRON_DURATION: 'soon' is not a duration"),
    ({"CRON_TABLE": "@every 1m,a"}, 14, "no SCALEBOX_SERVICES or TASK_ID"),
])
def test_the_program_fails_in_one_line_with_a_hint(env: dict[str, str], code: int, says: str) -> None:
    proc = program(env)
    assert proc.returncode == code, proc.stderr
    first, hint = proc.stderr.splitlines()
    assert first.startswith("cron: ") and says in first and hint.startswith("  hint: "), proc.stderr


def test_run_sh_needs_the_launchers_python() -> None:
    proc = program({"CRON_TABLE": "@every 1m,a"}, [str(STANDARD_MODULES / "cron" / "run.sh"), "ANY", "{}"])
    assert proc.returncode == 14 and "SCALEBOX_PYTHON" in proc.stderr

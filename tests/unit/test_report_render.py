"""The report's pure parts: rendering plain data to HTML/SVG (escaping, empty apps, sampling,
snapshots) and the helpers the data reader uses. No database here (tests/integration and
tests/acceptance have the real runs)."""

from __future__ import annotations

import dataclasses
import html.parser
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from scalebox_hpc.report import html as report_html
from scalebox_hpc.report import svg
from scalebox_hpc.report.data import (
    AppInfo,
    Axis,
    Bar,
    DurationStats,
    Failure,
    FineBin,
    Locality,
    ReportData,
    Retries,
    StageJob,
    StderrLine,
    Timeline,
    duration_stats,
    series,
    stride_for,
)

T0 = 1_800_000_000.0
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>\x1b]0;pwned\x07\x1b[31m"\'&'


def make(**over: Any) -> ReportData:
    """A small finished app; ``over`` replaces fields."""
    app = AppInfo(id=7, name="demo", label=None, status="FINISHED", result="done", cancelled=False,
                  created_at=T0, finished_at=T0 + 100, now=T0 + 200, t0=T0, t1=T0 + 100)
    axis = Axis.over(T0, T0 + 100, 10)
    base = ReportData(
        app=app, axis=axis, modules=("calc",), totals={"calc": {0: 9, 1: 1}},
        throughput={"calc": (1, 2, 3, 0, 0, 1, 1, 1, 0, 1)}, queue_depth={"calc": (5, 4, 3, 2, 2, 1, 1, 1, 0, 0)},
        durations=(DurationStats("calc", 11, 1.5, 1.0, 2.0, 3.0, 4.0, 0.01, ((0, 5), (1, 6))),),
        timeline=Timeline(bars=(Bar("calc", "h1", "calc#0", 0, T0 + 1, T0 + 2, 1),
                                Bar("calc", "h1", "calc#0", 1, T0 + 3, T0 + 5, 2)), executions=2, stride=1),
        failures=(Failure("calc", 1, 1, 2),), top_stderr=(StderrLine("calc", 1, "boom", 2, 2),),
        retries=(Retries("calc", 1, 1, 0, 0),), stalls_by_host=(), locality=(Locality("calc", 3, 1, 0, 6, 10, 20, 30),),
        stage_jobs=(), stage_job_states=(), stage_jobs_total=0, core_hours=None)
    return dataclasses.replace(base, **over)


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "nav", "a", "section",
                "table", "tr", "th", "td", "div", "span", "i", "svg", "line", "text", "polyline", "rect"}


def parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    p.close()
    return p


def test_every_section_is_there() -> None:
    page = report_html.render(make())
    for sid in report_html.SECTIONS:
        assert f'<section id="{sid}">' in page
    assert page.startswith("<!DOCTYPE html>") and "default-src 'none'" in page


def test_hostile_text_cannot_inject_markup() -> None:
    """Task-controlled text everywhere (stderr, module, host, app name, result, job fields) stays text."""
    d = make(
        app=dataclasses.replace(make().app, name=HOSTILE, label=HOSTILE, result=HOSTILE),
        modules=(HOSTILE,), totals={HOSTILE: {0: 1, 1: 1}}, throughput={HOSTILE: (1,) * 10},
        queue_depth={HOSTILE: (1,) * 10},
        durations=(DurationStats(HOSTILE, 1, 1, 1, 1, 1, 1, 0.1, ((0, 1),)),),
        timeline=Timeline(bars=(Bar(HOSTILE, HOSTILE, HOSTILE, 1, T0, T0 + 1, 1),), executions=1, stride=1),
        failures=(Failure(HOSTILE, 1, 1, 1),), top_stderr=(StderrLine(HOSTILE, 1, HOSTILE, 1, 1),),
        retries=(Retries(HOSTILE, 0, 0, 1, 0),), stalls_by_host=((HOSTILE, 1),),
        locality=(Locality(HOSTILE, 0, 0, 0, 1, 0, 0, 0),),
        stage_jobs=(StageJob(HOSTILE, HOSTILE, HOSTILE, HOSTILE, HOSTILE, T0, None),),
        stage_job_states=((HOSTILE, HOSTILE, 1),), stage_jobs_total=1)
    page = report_html.render(d)
    parsed = parse(page)
    assert parsed.tags <= ALLOWED_TAGS, parsed.tags - ALLOWED_TAGS
    assert not [a for a in parsed.attrs if a.startswith("on")]
    assert "<script" not in page.lower() and "\x1b" not in page and "\x07" not in page
    # ... and is still shown, as text
    assert '<script>alert("x")</script>' in "".join(parsed.text)
    assert "&lt;script&gt;" in page


def test_empty_app() -> None:
    d = make(modules=(), totals={}, throughput={}, queue_depth={}, durations=(),
             timeline=Timeline(bars=(), executions=0, stride=1), failures=(), top_stderr=(), retries=(),
             locality=())
    page = report_html.render(d)
    for sid in report_html.SECTIONS:
        assert f'<section id="{sid}">' in page
    assert "No executions yet." in page and "This app has no modules." in page
    assert "No failed task or execution." in page


def test_sampled_timeline_says_so() -> None:
    bars = tuple(Bar("calc", "h1", "calc#0", 0, T0 + i, T0 + i + 0.5, i) for i in range(50))
    sampled = report_html.render(make(timeline=Timeline(bars=bars, executions=350, stride=7)))
    assert "sampled: one execution in 7 is drawn (50 bars)" in sampled
    assert sampled.count("<rect") >= 50
    whole = report_html.render(make(timeline=Timeline(bars=bars, executions=50, stride=1)))
    assert "sampled" not in whole


def test_too_many_lanes_are_cut_and_said() -> None:
    n = report_html.TIMELINE_LANES + 5
    bars = tuple(Bar("calc", f"h{i:04d}", "calc#0", 0, T0, T0 + 1, i) for i in range(n))
    page = report_html.render(make(timeline=Timeline(bars=bars, executions=n, stride=1)))
    assert f"5 of {n} lanes left out" in page


def test_snapshot_banner_only_while_running() -> None:
    running = dataclasses.replace(make().app, status="RUNNING", t1=T0 + 200, now=T0 + 200)
    assert running.snapshot
    assert "Snapshot: the app is still running" in report_html.render(make(app=running))
    assert "Snapshot" not in report_html.render(make())


def test_core_hours_not_recorded_or_shown() -> None:
    assert "not recorded" in report_html.render(make(core_hours=None))
    page = report_html.render(make(core_hours={"calc": 2.5}))
    assert "2.500" in page and "not recorded" not in page


def test_failures_and_stderr_lines_are_listed() -> None:
    page = report_html.render(make())
    assert "EXIT_1" in page and ">boom<" in page
    assert "75.0 %" in page  # locality: 3 of 4 tasks with a preferred host ran there


def test_series_fills_and_carries() -> None:
    rows = [{"module": "a", "bucket": 1, "n": 3}, {"module": "a", "bucket": 3, "n": 1}]
    assert series(rows, ("a", "b"), "n", 5, carry=False) == {"a": (0, 3, 0, 1, 0), "b": (0,) * 5}
    assert series(rows, ("a",), "n", 5, carry=True) == {"a": (0, 3, 3, 1, 1)}


def test_stride_keeps_the_bars_under_the_limit() -> None:
    assert stride_for(0) == 1 and stride_for(5000) == 1 and stride_for(5001) == 2
    for n in (1, 4999, 10_000, 1_000_000, 1_234_567):
        assert n // stride_for(n) <= 5000


def test_duration_stats_from_fine_bins() -> None:
    import math
    import random

    rng = random.Random(7)
    values = [rng.lognormvariate(0, 1.2) for _ in range(20000)]
    fine: dict[int, list[float]] = {}
    for v in values:
        fine.setdefault(math.floor(21 * math.log10(max(0.001, v)) + 1e-9), []).append(v)
    stats = duration_stats("m", [FineBin(k, len(vs), sum(vs), max(vs)) for k, vs in fine.items()])
    ordered = sorted(values)
    assert stats.n == 20000 and stats.max == ordered[-1]
    assert math.isclose(stats.mean, sum(values) / len(values)) and math.isclose(stats.slot_hours, sum(values) / 3600)
    for q, got in ((0.5, stats.p50), (0.9, stats.p90), (0.99, stats.p99)):
        exact = ordered[int(q * len(ordered))]
        assert abs(got - exact) / exact < 0.11, (q, got, exact)
    assert sum(n for _, n in stats.bins) == 20000  # the coarse bins hold every execution
    assert all(k == math.floor(3 * math.log10(max(0.001, v)) + 1e-9) for k, _ in stats.bins[:1] for v in [ordered[0]])


def test_running_bars_are_capped_and_said() -> None:
    bars = tuple(Bar("calc", "h1", f"calc#{i}", -3, T0, T0 + 1, i) for i in range(3))
    page = report_html.render(make(timeline=Timeline(bars=bars, executions=0, stride=1, running=40)))
    assert "sampled: 3 of the 40 running tasks drawn" in page


def test_lanes_sort_naturally() -> None:
    assert sorted(["h10 · a#0", "h2 · a#0", "h1 · a#10", "h1 · a#9"], key=report_html.natural) == [
        "h1 · a#9", "h1 · a#10", "h2 · a#0", "h10 · a#0"]


def test_axis_and_formatting() -> None:
    ax = Axis.over(0, 0)
    assert ax.width == 0.001 and ax.count == 120
    assert svg.nice_ticks(37) == [0, 10, 20, 30, 40]
    assert svg.fmt_seconds(0.25) == "250 ms" and svg.fmt_seconds(200) == "3m20s" and svg.fmt_seconds(7500) == "2h05m"
    assert svg.fmt_bytes(2048) == "2.0 KiB" and svg.fmt_number(1234567) == "1,234,567"


@given(st.text())
def test_escaped_text_is_inert(text: str) -> None:
    out = svg.esc(text)
    assert not set(out) & set("<>\"'") and "\x1b" not in out
    assert all(c in "\t\n" or not (ord(c) < 32 or 0x7F <= ord(c) <= 0x9F) for c in out)


def test_esc_keeps_ordinary_text() -> None:
    assert svg.esc("calc-1 ünï ✓ a&b") == "calc-1 ünï ✓ a&amp;b"
    assert svg.clean("red \x1b[31mtext\x1b[0m\x00") == "red text"

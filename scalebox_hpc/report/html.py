"""The report as one self-contained HTML file: inline CSS and SVG, no script, no network.

:func:`render` takes a :class:`~scalebox_hpc.report.data.ReportData` and returns the page; it
does no I/O. Every text from the database (module, host and app names, stderr lines, results)
goes through :func:`~scalebox_hpc.report.svg.esc`, and the page's Content-Security-Policy allows
neither scripts nor any fetch, so even a slip there could not run code or call out.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from scalebox_hpc.models import TaskStatus
from scalebox_hpc.report import svg
from scalebox_hpc.report.data import Bar, ReportData
from scalebox_hpc.report.svg import esc, fmt_bytes, fmt_number, fmt_seconds

TIMELINE_LANES = 300
"""The most lanes (host · slot) the timeline draws; the others are left out, and it says so."""

SECTIONS = ("summary", "throughput", "queue", "timeline", "durations", "failures", "retries", "locality",
            "stage-jobs", "core-hours")
"""The ids of the report's sections, in order (tests and links use them)."""

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:960px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:2px 10px 2px 0;text-align:right;vertical-align:top}
th{font-weight:600;border-bottom:1px solid #ccc}td.l,th.l{text-align:left}
.note{color:#666;font-size:13px}.snap{background:#fff4d6;border:1px solid #e8c55a;padding:6px 10px;margin:8px 0}
.none{color:#888;font-style:italic}code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
td.line,th.line{text-align:left;white-space:pre-wrap;word-break:break-all;max-width:560px}
.legend{margin:2px 0 8px}.key{margin-right:14px;white-space:nowrap}
.key i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
svg.chart{display:block;max-width:100%;height:auto}
svg .tick{font-size:11px;fill:#555}svg .ax{stroke:#888}svg .grid{stroke:#eee}
nav a{margin-right:10px}
"""


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "—"
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1, line: int | None = None) -> str:
    """A table whose first ``left`` columns are text (left-aligned) and whose column ``line``
    holds a line of output (monospace, wrapped); every cell escaped."""

    def cls(i: int) -> str:
        return "line mono" if i == line else "l" if i < left else ""

    head = "".join(f'<th class="{cls(i)}">{esc(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{cls(i)}">{esc(c)}</td>' for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _none(text: str) -> str:
    return f'<p class="none">{esc(text)}</p>'


def _section(sid: str, title: str, *parts: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{"".join(parts)}</section>'


def _colors(data: ReportData) -> dict[str, str]:
    return {m: svg.color(i) for i, m in enumerate(data.modules)}


def _summary(data: ReportData) -> str:
    a = data.app
    rows: list[tuple[object, ...]] = []
    for m in data.modules:
        c = data.totals.get(m, {})
        failed = sum(n for s, n in c.items() if s > 0 or s < -100)
        rows.append((m, sum(c.values()), c.get(-9, 0), c.get(-1, 0), c.get(-3, 0), c.get(0, 0), failed))
    facts = [("app", f"{a.id} {a.name}"), ("label", a.label or ""), ("status", a.status + (" (cancelled)" if a.cancelled
                                                                                          else "")),
             ("result", a.result or ""), ("created", _when(a.created_at)), ("finished", _when(a.finished_at)),
             ("span", f"{_when(a.t0)} → {_when(a.t1)} ({fmt_seconds(a.t1 - a.t0)})"),
             ("report taken", _when(a.now))]
    parts = [_table(("", ""), facts, left=2)]
    if a.snapshot:
        parts.insert(0, '<p class="snap">Snapshot: the app is still running (or has tasks READY or RUNNING); '
                        f"this report shows it as of {esc(_when(a.now))} and will not change by itself.</p>")
    parts.append(_table(("module", "tasks", "initial", "ready", "running", "ok", "failed"), rows)
                 if rows else _none("This app has no modules."))
    return _section("summary", "Summary", *parts)


def _over_time(data: ReportData, sid: str, title: str, what: dict[str, tuple[int, ...]], per_second: bool,
               explain: str) -> str:
    colors = _colors(data)
    if not any(any(v) for v in what.values()):
        return _section(sid, title, _none("Nothing yet."))
    width = data.axis.width
    values = {m: [v / width for v in what[m]] if per_second else list(what[m]) for m in data.modules if m in what}
    chart = svg.line_chart(values, colors, bucket_seconds=width, label=title)
    return _section(sid, title, f'<p class="note">{esc(explain)} Buckets of {esc(fmt_seconds(width))}; '
                                f"x: time since {esc(_when(data.axis.t0))}.</p>",
                    svg.legend(list(values), [colors[m] for m in values]), chart)


def _timeline(data: ReportData) -> str:
    tl = data.timeline
    if not tl.bars:
        return _section("timeline", "Timeline of executions per host and slot", _none("No executions yet."))
    lanes = sorted({b.lane for b in tl.bars}, key=natural)
    shown = lanes[:TIMELINE_LANES]
    index = {name: i for i, name in enumerate(shown)}
    colors = _colors(data)
    t0 = data.axis.t0
    span = max(data.app.t1 - t0, max(b.end for b in tl.bars) - t0, 0.001)
    bars = [svg.GanttBar(lane=index[b.lane], start=b.start - t0, end=b.end - t0, fill=_bar_fill(b, colors),
                         title=_bar_title(b))
            for b in tl.bars if b.lane in index]
    notes = [f"{fmt_number(tl.executions)} executions"]
    if tl.stride > 1:
        notes.append(f"sampled: one execution in {tl.stride} is drawn ({fmt_number(len(tl.bars))} bars), "
                     "spread evenly over the run; counts elsewhere in this report are exact")
    if tl.running_shown < tl.running:
        notes.append(f"sampled: {fmt_number(tl.running_shown)} of the {fmt_number(tl.running)} running tasks drawn")
    if len(lanes) > len(shown):
        notes.append(f"{len(lanes) - len(shown)} of {len(lanes)} lanes left out (the first {len(shown)} shown)")
    notes.append("red: a failed execution; to the right edge: running now")
    return _section("timeline", "Timeline of executions per host and slot",
                    f'<p class="note">{esc("; ".join(notes))}.</p>',
                    svg.legend(list(data.modules), [colors[m] for m in data.modules]),
                    svg.gantt(shown, bars, span=span, label="timeline"))


def natural(text: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key putting h2 before h10 (numbers compared as numbers)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text) if p)


def _bar_fill(b: Bar, colors: dict[str, str]) -> str:
    return svg.FAILED if b.status > 0 or b.status < -100 else colors.get(b.module, svg.PALETTE[0])


def _bar_title(b: Bar) -> str:
    state = "running" if b.status == -3 else TaskStatus.describe(b.status)
    return f"task {b.task_id} ({b.module}) on {b.lane}: {state}, {fmt_seconds(b.end - b.start)}"


def _bin_label(k: int) -> str:
    return fmt_seconds(10 ** (k / 3)) if k > -9 else "≤1 ms"


def _durations(data: ReportData) -> str:
    if not data.durations:
        return _section("durations", "Task durations", _none("No executions yet."))
    colors = _colors(data)
    parts = [_table(("module", "executions", "mean", "p50", "p90", "p99", "max"),
                    [(d.module, fmt_number(d.n), fmt_seconds(d.mean), fmt_seconds(d.p50), fmt_seconds(d.p90),
                      fmt_seconds(d.p99), fmt_seconds(d.max)) for d in data.durations]),
             '<p class="note">Every execution (attempt) counts. Counts, means and maxima are exact; percentiles '
             "are read off a logarithmic histogram of 21 bins a decade (within about 11 %). The histograms below "
             "have three bins a decade, each labelled by its lower edge.</p>"]
    for d in data.durations:
        if not d.bins:
            continue
        lo, hi = d.bins[0][0], d.bins[-1][0]
        counts = dict(d.bins)
        ks = list(range(lo, hi + 1))
        parts.append(f"<h3>{esc(d.module)}</h3>")
        parts.append(svg.bar_chart([_bin_label(k) for k in ks], [counts.get(k, 0) for k in ks],
                                   fill=colors.get(d.module, svg.PALETTE[0]), label=f"durations of {d.module}"))
    return _section("durations", "Task durations", *parts)


def _failures(data: ReportData) -> str:
    if not data.failures:
        return _section("failures", "Failures", _none("No failed task or execution."))
    parts = [_table(("module", "status", "code", "tasks (final)", "executions"),
                    [(f.module, TaskStatus.describe(f.status), f.status, fmt_number(f.tasks), fmt_number(f.execs))
                     for f in data.failures], left=2)]
    if data.top_stderr:
        parts.append("<h3>Most frequent last stderr lines of failed executions</h3>")
        parts.append(_table(("module", "status", "count", "e.g. task", "last line"),
                            [(s.module, TaskStatus.describe(s.status), fmt_number(s.count), s.example_task,
                              s.line or "(empty)") for s in data.top_stderr], left=2, line=4))
    return _section("failures", "Failures", *parts)


def _retries(data: ReportData) -> str:
    rows = [(r.module, fmt_number(r.retried_tasks), fmt_number(r.extra_attempts), fmt_number(r.stalls),
             fmt_number(r.lost_slots)) for r in data.retries]
    parts = [_table(("module", "tasks retried", "extra attempts", "stalls (123)", "slots lost"), rows)
             if rows else _none("No modules.")]
    parts.append('<p class="note">A stall is an execution recorded by lease recovery: its slot, launcher or node '
                 "stopped heart-beating while the task ran.</p>")
    if data.stalls_by_host:
        parts.append("<h3>Stalls by host</h3>")
        parts.append(_table(("host", "stalls"), [(h, fmt_number(n)) for h, n in data.stalls_by_host]))
    return _section("retries", "Retries and stalls", *parts)


def _share(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _locality(data: ReportData) -> str:
    rows = [(r.module, _share(r.share), fmt_number(r.local), fmt_number(r.remote), fmt_number(r.no_holder),
             fmt_number(r.no_inputs), fmt_bytes(r.input_bytes_local), fmt_bytes(r.input_bytes_other),
             fmt_bytes(r.output_bytes)) for r in data.locality]
    preferred = sum(r.local + r.remote for r in data.locality)
    local = sum(r.local for r in data.locality)
    parts = [f'<p class="note">Tasks that ran: whether they ran on the host their inputs were on (their '
             f"preferred host, from the scratch index, or their HOST-BOUND host). Overall "
             f"{esc(_share(local / preferred if preferred else None))} of {esc(fmt_number(preferred))} tasks with a "
             "preferred host ran there. Bytes are what the executions reported (task-exec input_bytes / "
             "output_bytes).</p>",
             _table(("module", "local share", "ran there", "ran elsewhere", "inputs, no holder", "no inputs",
                     "input bytes there", "input bytes elsewhere", "output bytes"), rows) if rows else
             _none("No modules.")]
    return _section("locality", "Locality and bytes moved", *parts)


_JOB_COLORS = {"PENDING": "#bab0ac", "RUNNING": "#59a14f", "COMPLETED": "#4e79a7", "CANCELLED": "#9c755f",
               "TIMEOUT": "#f28e2b", "FAILED": svg.FAILED, "NODE_FAIL": svg.FAILED, "OUT_OF_MEMORY": svg.FAILED}


def _stage_jobs(data: ReportData) -> str:
    if not data.stage_jobs_total:
        return _section("stage-jobs", "Stage jobs (Slurm)", _none("No Slurm stage jobs (the modules ran on launchers "
                                                                  "started by hand or by scalebox run)."))
    parts = [_table(("module", "state", "jobs"), [(m, s, fmt_number(n)) for m, s, n in data.stage_job_states], left=2)]
    jobs = data.stage_jobs
    t0 = data.axis.t0
    end = data.app.now
    lanes = [f"{j.module} {j.cluster + ':' if j.cluster else ''}{j.job_id}" for j in jobs]
    bars = [svg.GanttBar(lane=i, start=j.submitted_at - t0, end=(j.ended_at or end) - t0,
                         fill=_JOB_COLORS.get(j.state.split()[0] if j.state else "", "#76b7b2"),
                         title=f"job {j.job_id} ({j.module}) {j.state} on {j.nodes or '?'}: "
                               f"{fmt_seconds((j.ended_at or end) - j.submitted_at)}")
            for i, j in enumerate(jobs)]
    span = max(max((b.end for b in bars), default=0), data.app.t1 - t0, 0.001)
    note = f"Each job from its submission to its end (or now), coloured by its last state; {len(jobs)} jobs"
    if data.stage_jobs_total > len(jobs):
        note += f" of {data.stage_jobs_total} (the oldest shown)"
    states = sorted({j.state for j in jobs})
    parts += [f'<p class="note">{esc(note)}.</p>',
              svg.legend(states, [_JOB_COLORS.get(s.split()[0] if s else "", "#76b7b2") for s in states]),
              svg.gantt(lanes, bars, span=span, label="stage jobs")]
    return _section("stage-jobs", "Stage jobs (Slurm)", *parts)


def _core_hours(data: ReportData) -> str:
    slot = {d.module: d.slot_hours for d in data.durations}
    if data.core_hours is None:
        rows = [(m, f"{slot.get(m, 0):.3f}", "not recorded") for m in data.modules]
        note = ("Core-hours: not recorded — this database's executions carry no CPU time. Slot-hours are the "
                "wall-clock time of the executions (one slot each).")
    else:
        rows = [(m, f"{slot.get(m, 0):.3f}", f"{data.core_hours.get(m, 0):.3f}") for m in data.modules]
        note = "Core-hours: the CPU time (user + system) the executions recorded; slot-hours: their wall-clock time."
    return _section("core-hours", "Core-hours per module", f'<p class="note">{esc(note)}</p>',
                    _table(("module", "slot-hours", "core-hours"), rows) if rows else _none("No modules."))


def render(data: ReportData) -> str:
    """The whole report page for ``data``."""
    a = data.app
    title = f"scalebox report: app {a.id} {a.name}"
    nav = "".join(f'<a href="#{s}">{esc(s.replace("-", " "))}</a>' for s in SECTIONS)
    body = [
        _summary(data),
        _over_time(data, "throughput", "Throughput per module", data.throughput, True,
                   "Tasks reaching a final status (OK or failed) per second."),
        _over_time(data, "queue", "Queue depth per module", data.queue_depth, False,
                   "READY tasks at the end of each bucket, rebuilt from the tasks' creation and the executions' "
                   "start and end times (INITIAL tasks count from their creation)."),
        _timeline(data), _durations(data), _failures(data), _retries(data), _locality(data), _stage_jobs(data),
        _core_hours(data),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            # nothing in this page may run or load anything: it is a document, viewed offline
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "img-src data:\">"
            f"<meta name=\"generator\" content=\"scalebox_hpc report\"><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"note\">Generated {esc(_when(a.now))} from the database; "
            f"{esc('a snapshot of a running app' if a.snapshot else 'the app has finished')}.</p>"
            f"<nav>{nav}</nav>" + "".join(body) + "</body></html>\n")

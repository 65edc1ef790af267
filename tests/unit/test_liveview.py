"""The live status view (issue 18) is a pure function of a snapshot: rendered here on a
recorded console for a few snapshots. Task-controlled text (the result, bodies, stderr lines,
host names) is shown as written, never parsed as rich markup (audit F24), and without escapes."""

from __future__ import annotations

from rich.console import Console

from scalebox_hpc.liveview import (
    Failure,
    HostSlots,
    ModuleView,
    Snapshot,
    StageJob,
    bar_width,
    duration,
    host_slots,
    render,
)

BAR = "━"


def text(snap: Snapshot, width: int = 160, *, hint: str = "q quits", width_bars: int = 30) -> str:
    console = Console(record=True, width=width, force_terminal=True, color_system="truecolor")
    console.print(render(snap, hint=hint, width=width_bars))
    return console.export_text()


def module(name: str, total: int, done: int, *, failed: int = 0, running: int = 0, per_minute: int = 0,
           slots: int = 0) -> ModuleView:
    return ModuleView(name=name, total=total, done=done, ok=done - failed, failed=failed, running=running,
                      ready=total - done - running, initial=0, per_minute=per_minute, slots=slots)


RUNNING = Snapshot(
    app_id=7, name="app-primes", state="RUNNING", result=None,
    modules=[module("scatter", 1, 1), module("calc", 100, 40, running=2, per_minute=30, slots=2),
             module("gather", 40, 38, per_minute=0, slots=1)],
    hosts=[HostSlots("n1", live=2, busy=2, ended=0, errors=0), HostSlots("n2", live=1, busy=0, ended=1, errors=1)],
    jobs=[StageJob("calc", "1234", "RUNNING"), StageJob("calc", "1235", "PENDING", "Resources")],
)


def test_a_running_app_shows_bars_rates_eta_slots_and_jobs() -> None:
    shown = text(RUNNING)
    lines = shown.splitlines()
    assert lines[0] == "app 7 app-primes: RUNNING"
    calc = next(line for line in lines if line.startswith("calc"))
    # 60 left at 30 a minute: two minutes
    assert BAR in calc and "40/100" in calc and "30/min" in calc and calc.rstrip().endswith("2:00"), calc
    scatter = next(line for line in lines if line.startswith("scatter"))
    assert "1/1" in scatter and scatter.rstrip().endswith("done"), scatter
    gather = next(line for line in lines if line.startswith("gather"))
    assert "0/min" in gather and gather.rstrip().endswith("?"), gather  # no rate: no estimate
    assert "slots: n1 2/2 busy, n2 0/1 busy (1 in error)" in lines
    assert "stage jobs: calc 1234:RUNNING, calc 1235:PENDING (Resources)" in lines
    assert lines[-1] == "q quits"
    assert "failed tasks" not in shown and "why tasks wait" not in shown


def test_a_finished_app_with_failures_shows_them_as_plain_text() -> None:
    snap = Snapshot(
        app_id=3, name="demo [bold]x", state="FINISHED", result="[/] result \x1b]0;pwned\x07from a task [red]",
        modules=[module("work", 12, 12, failed=2, per_minute=12)], failed=7,
        failures=[Failure(41, "work", 3, "body [/]\x1b[2J", "Traceback: [link=evil]x\x1b[31m"),
                  Failure(42, "work", 124, "b" * 80, "")],
        why=["work: app [bold]paused"],
    )
    shown = text(snap, hint="")
    lines = shown.splitlines()
    assert lines[0] == "app 3 demo [bold]x: FINISHED  [/] result from a task [red]"
    assert "pwned" not in shown and "\x1b" not in shown
    assert "failed tasks (7, the first 2):" in lines
    assert "      41 work EXIT_3 body [/] → Traceback: [link=evil]x" in lines
    assert f"      42 work TIMEOUT {'b' * 37}... → (no output)" in lines
    assert "why tasks wait:" in lines and "  work: app [bold]paused" in lines
    work = next(line for line in lines if line.startswith("work"))
    assert "12/12" in work and work.rstrip().endswith("done")
    assert not any(line.strip() == "q quits" for line in lines)


def test_an_app_without_tasks_and_the_narrow_terminal() -> None:
    snap = Snapshot(app_id=1, name="empty", state="IDLE", result=None, modules=[module("m", 0, 0)])
    assert snap.ended and not RUNNING.ended
    lines = text(snap, width=80, width_bars=bar_width(80)).splitlines()
    assert lines[0] == "app 1 empty: IDLE"
    header = ["module", "progress", "done", "ok", "failed", "running", "ready", "slots", "rate", "eta"]
    assert lines[1].split() == header
    assert lines[2].split()[0] == "m" and lines[2].split()[2:] == ["0/0", "0", "0", "0", "0", "0", "0/min", "-"]
    assert all(len(line) <= 80 for line in lines)
    assert all(len(line) <= 40 for line in text(RUNNING, width=40, width_bars=bar_width(40)).splitlines())


def test_durations_and_slots_per_host() -> None:
    assert [duration(s) for s in (None, 0, 59.6, 61, 3600 * 2 + 65)] == ["?", "0:00", "1:00", "1:01", "2:01:05"]
    assert module("m", 10, 10).eta_seconds() == 0.0 and module("m", 10, 4).eta_seconds() is None
    assert module("m", 10, 4, per_minute=6).eta_seconds() == 60.0
    rows = [{"host": "b", "live": True, "task_id": 5, "status": "RUNNING"},
            {"host": "a", "live": False, "task_id": None, "status": "ERROR"},
            {"host": "b", "live": True, "task_id": None, "status": "READY"}]
    assert host_slots(rows) == [HostSlots("a", 0, 0, 1, 1), HostSlots("b", 2, 1, 0, 0)]

"""Why a module's READY tasks wait (issue 14), from one row of the module_why query: each reason
is one rule of claim_tasks, and none is given when nothing holds the tasks."""

from __future__ import annotations

from typing import Any

from scalebox_hpc.db.apps import ModuleCounts, Why, why_waiting


def row(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "calc", "app_status": "RUNNING", "semaphore": None, "semaphore_value": None,
                            "slots": 1, "live_slots": 1, "waiting": [], "full_sinks": [], "host_waits": []}
    return {**base, **over}


def counts(ready: int = 0, initial: int = 0) -> ModuleCounts:
    return ModuleCounts("calc", {-1: ready, -9: initial}, 0)


LIVE = [{"module": "calc", "status": "READY", "message": None, "live": True}]


def test_nothing_is_said_when_nothing_holds_the_tasks() -> None:
    assert why_waiting(row(), counts(ready=5), LIVE, 1) == []
    assert why_waiting(row(app_status="PAUSED", live_slots=0), counts(), [], 1) == []  # nothing waits


def test_each_claim_rule_is_its_own_reason() -> None:
    held = why_waiting(row(
        app_status="PAUSED", semaphore="gpu", semaphore_value=0,
        waiting=[{"host": "n1", "seq": 0, "waiting": "check.sh exited 1 (not now)"},
                 {"host": "n1", "seq": 1, "waiting": "free space 1.00 GB < free_space_gb 5.0"}],
        live_slots=2, full_sinks=[{"sink": "merge", "max_pending": 10}],
        host_waits=[{"host": "n7", "tasks": 3, "bound": True, "wait_seconds": -1.0},
                    {"host": "n8", "tasks": 10000, "bound": False, "wait_seconds": 4.4}],
    ), counts(ready=20, initial=2), LIVE, 7)
    assert [w.kind for w in held] == ["tasks_initial", "app_paused", "check_sh", "disk_gate", "semaphore",
                                      "back_pressure", "host", "host"]
    text = {w.kind: w.text for w in held}
    assert text["app_paused"] == "the app is PAUSED: nothing is claimed (`scalebox app resume 7`)"
    assert text["check_sh"] == "1 of its 2 live slot(s) wait (n1 slot 0): check.sh exited 1 (not now)"
    assert text["semaphore"].startswith("semaphore 'gpu' is 0: ")
    assert "scalebox semaphore increment --app 7 gpu" in text["semaphore"]
    assert held[-2].text.startswith("3 task(s) bound to host n7 (to_host)")
    assert held[-1].text.startswith("10000+ task(s) wait for host n8") and "up to 4s more" in held[-1].text


def test_a_missing_semaphore_and_slots_that_ended_are_said() -> None:
    ended = [{"module": "calc", "status": "ERROR", "message": "setup.sh exited 3: no model", "live": False}]
    held = why_waiting(row(live_slots=0, semaphore="gpu", semaphore_value=None), counts(ready=4), ended, 1)
    assert held == [Why("no_slot", "all 1 slot(s) failed: setup.sh exited 3: no model — 4 task(s) left READY"),
                    Why("semaphore", "semaphore 'gpu' does not exist: a claim takes one unit a task "
                                     "(`scalebox semaphore increment --app 1 gpu`)")]
    assert held[0].as_json() == {"kind": "no_slot", "text": held[0].text}


def test_many_waiting_slots_are_counted_not_listed() -> None:
    waiting = [{"host": f"n{i}", "seq": 0, "waiting": "check.sh exited 1 (not now)"} for i in range(5)]
    [held] = why_waiting(row(live_slots=5, waiting=waiting), counts(ready=1), LIVE, 1)
    assert held.text == "5 of its 5 live slot(s) wait (n0 slot 0, n1 slot 0, n2 slot 0 and 2 more): " \
                        "check.sh exited 1 (not now)"

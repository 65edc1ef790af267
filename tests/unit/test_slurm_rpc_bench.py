"""benchmarks/slurm_rpc.py without Slurm: its pure parts (the wrappers' log, the busiest 60 s,
the summaries, the target) and ``--dry-run``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from hypothesis import given, settings
from hypothesis import strategies as st

from scalebox_hpc.slurm.sdiag import parse_sdiag

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "slurm_rpc.py"
FIXTURES = Path(__file__).parent / "slurm_fixtures"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("slurm_rpc_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load()


def test_the_wrappers_log() -> None:
    log = ("1000.5 squeue --noheader -M c2 --jobs=1\n"
           "1001.0 squeue --help\n"          # the client's probe: not a poll
           "1002.0 sbatch --parsable --clusters=c2 job.sh\n"
           "1003.0 scancel -Mc3 -- 12\n"
           "garbage line\n"
           "x.y squeue\n"
           "1004.0 sinfo -h\n")
    calls = bench.parse_call_log(log)
    assert [(c.at, c.command, c.cluster) for c in calls] == [
        (1000.5, "squeue", "c2"), (1002.0, "sbatch", "c2"), (1003.0, "scancel", "c3"), (1004.0, "sinfo", "")]


def test_busiest_window() -> None:
    assert bench.busiest_window([]) == 0
    assert bench.busiest_window([0, 10, 59.9, 60, 61, 200]) == 4      # [0, 60): 0, 10, 59.9 ... [10, 70): 4
    assert bench.busiest_window([0, 30, 90], [5, 20, 1]) == 25
    assert bench.busiest_window([5, 5, 5]) == 3


def test_command_summary_per_cluster() -> None:
    calls = bench.parse_call_log("".join(f"{t} squeue -M a\n" for t in range(0, 120, 10))  # 12 in 2 min
                                 + "5 sbatch -M a x\n50 scancel -M a -- 1\n30 squeue\n")
    out = bench.command_summary(calls, 0, 120)
    assert out["by_command"] == {"squeue": 13, "sbatch": 1, "scancel": 1}
    a = out["by_cluster"]["a"]
    assert (a["status_polling"], a["status_polling_per_minute"], a["status_polling_busiest_60s"]) == (12, 6.0, 6)
    assert (a["submits_cancels"], a["submits_cancels_busiest_60s"]) == (2, 2)
    assert out["by_cluster"]["(default)"]["status_polling"] == 1


def test_adapter_summary_and_target() -> None:
    rows = [("", 0.0, 3), ("", 20.0, 3), ("", 40.0, 30), ("", 100.0, 1), ("", 500.0, 99)]  # the last: after end
    adapter = bench.adapter_summary(rows, 0, 120, 30)
    assert adapter["(default)"] == {"calls": 37, "passes": 4, "per_minute": 18.5, "busiest_60s": 36,
                                    "budget_per_minute": 30, "within_budget": False}
    commands = bench.command_summary(bench.parse_call_log("".join(f"{t} squeue\n" for t in range(0, 120, 10))),
                                     0, 120)
    verdict = bench.target(commands, adapter, 30)
    assert verdict["status_polling_met"] and not verdict["no_burst_above_budget"] and not verdict["met"]
    busy = bench.command_summary(bench.parse_call_log("".join(f"{t} squeue\n" for t in range(0, 60, 5))), 0, 120)
    assert not bench.target(busy, {}, 30)["status_polling_met"]  # 12 in one minute, 6/min on average


def test_sdiag_summary_leaves_our_own_sdiag_out() -> None:
    first = parse_sdiag((FIXTURES / "sdiag_1.txt").read_text())
    last = parse_sdiag((FIXTURES / "sdiag_2.txt").read_text())
    out = bench.sdiag_summary(first, last, "root", own_sdiag_calls=1)
    assert (out["user_rpcs"], out["own_sdiag_calls_left_out"], out["reset_in_between"]) == (0, 1, False)
    assert out["cluster_wide_by_kind"] == {"status": 0, "submit": 0, "cancel": 0, "other": 0}
    assert out["cluster_wide_by_type"] == {"REQUEST_STATS_INFO": 1}


def test_dry_run_prints_the_plan_and_the_command() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--tasks", "500"], capture_output=True,
                          text=True, timeout=60, check=True, env={"PATH": "/nonexistent"})  # no Slurm, no DSN
    out = json.loads(proc.stdout)
    assert out["pipeline"]["start_tasks"] == 500 and out["pipeline"]["task_executions"] == 1000
    assert out["pipeline"]["modules"]["work"]["slurm"]["max_jobs"] == 7
    assert out["environment"]["SCALEBOX_SLURM_RPC_PER_MINUTE"] == "30"
    assert "benchmarks/slurm_rpc.py --budget 30" in out["command"] and "--dry-run" not in out["command"]
    assert not any("-r" in step.split() for step in out["steps"])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=500))
def test_any_log_text_parses(text: str) -> None:
    for call in bench.parse_call_log(text):
        assert call.command in bench.COMMANDS

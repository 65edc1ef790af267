#!/usr/bin/env python3
"""Slurm citizenship: the RPCs a 500-task autoscaled pipeline costs the controller, per minute.

Runs ``work -> sum`` on the real Slurm through ``scalebox submit`` and its stage jobs
(autoscaling from 0: ``work`` up to ``--max-jobs`` jobs of ``--tasks-per-job`` tasks, ``sum`` one
job), ``--tasks`` tasks of ``--task-seconds`` entering ``work``, each sending one to ``sum``.
Prints one JSON object with three independent counts over the run:

- ``sdiag``: two (and every ``--sample-seconds``) snapshots of ``sdiag`` -- never ``sdiag -r``,
  the counters are everyone's -- diffed (:mod:`scalebox_hpc.slurm.sdiag`): our user's RPCs (the
  per-user table has no split by type), less the benchmark's own ``sdiag`` calls; the per-type
  deltas are cluster-wide (every user's), split into status polling / submits / cancels / other.
  ``sacct`` talks to slurmdbd and never shows in sdiag;
- ``app_commands``: the Slurm commands the app's processes ran (logging wrappers of squeue,
  sinfo, sacct, sbatch, scancel, scontrol first on PATH, inherited by the stage jobs), by
  command and by cluster (``-M``), status polling (squeue/sacct/sinfo/scontrol) vs
  submits/cancels (sbatch/scancel), with the busiest 60 s window of each;
- ``adapter_counted``: what scalebox's own rate-limited adapter recorded (``sbx_slurm_calls``:
  what ``stage list`` shows), per cluster, and its busiest 60 s against the per-user budget
  ``SCALEBOX_SLURM_RPC_PER_MINUTE``.

The run is measured until every stage job's launcher has left (and one sample more), so the
drain tail -- the jobs leaving together, and the passes they ask for -- is inside it
(``drain_tail_measured``); ``make_span_s`` ends when the last task is OK.

``windows`` gives, per sample, the stage jobs live, the READY tasks and the rates, so that
"independent of task and job counts" can be read off; ``target`` compares with issue 17's:
status polling <= 6/min per cluster, and no 60 s with more adapter calls than the budget.

Usage: python benchmarks/slurm_rpc.py [--tasks 500] [--task-seconds 4] [--max-jobs 7]
       [--tasks-per-job 25] [--interval 10] [--budget 30] [--sample-seconds 30] [--timeout 1800]
       [--dry-run]
Needs SCALEBOX_DSN (or SCALEBOX_TEST_DSN) for a server where it may create a scratch database,
the Slurm test-bed (or a cluster), and the project's venv python (it imports scalebox_hpc).
``--dry-run`` prints the plan (pipeline, environment, samples, targets) and touches nothing.
"""

from __future__ import annotations

import argparse
import bisect
import getpass
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stages.py beside this file, run as a script

from stages import COMMANDS, FAST, cluster_cpus, sbx, wrappers, write_app

from scalebox_hpc.slurm.sdiag import SdiagSnapshot, delta, parse_sdiag

STATUS_COMMANDS = ("squeue", "sacct", "sinfo", "scontrol")
CHANGE_COMMANDS = ("sbatch", "scancel")
TARGET_STATUS_PER_MINUTE = 6.0
DEFAULT_BUDGET = 30  # scalebox_hpc.autoscaler.DEFAULT_RPC_PER_MINUTE


# -- the pure parts (unit-tested in tests/unit/test_slurm_rpc_bench.py) ------------------------------
@dataclass(frozen=True)
class Call:
    """One logged Slurm command: when, which, on which cluster ('' = the default)."""

    at: float
    command: str
    cluster: str = ""


def parse_call_log(text: str) -> list[Call]:
    """The wrappers' log (``EPOCH COMMAND ARGS...`` a line); ``--help`` probes and lines that are
    not the wrappers' left out."""
    out: list[Call] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[1] not in COMMANDS or "--help" in fields[2:]:
            continue
        try:
            at = float(fields[0])
        except ValueError:
            continue
        out.append(Call(at, fields[1], _cluster(fields[2:])))
    return out


def _cluster(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg in ("-M", "--clusters") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--clusters="):
            return arg.split("=", 1)[1]
        if arg.startswith("-M") and len(arg) > 2:
            return arg[2:]
    return ""


def busiest_window(stamps: list[float], weights: list[int] | None = None, seconds: float = 60.0) -> int:
    """The most (weighted) events in any ``seconds``-long window of ``stamps``."""
    pairs = sorted(zip(stamps, weights or [1] * len(stamps), strict=True))
    times = [t for t, _ in pairs]
    prefix = [0]
    for _, w in pairs:
        prefix.append(prefix[-1] + w)
    best = 0
    for i, t in enumerate(times):
        j = bisect.bisect_right(times, t + seconds - 1e-9)
        best = max(best, prefix[j] - prefix[i])
    return best


def command_summary(calls: list[Call], start: float, end: float) -> dict[str, Any]:
    """The app's commands in [start, end): by command, and per cluster: status polling and
    submits/cancels per minute and their busiest 60 s."""
    inside = [c for c in calls if start <= c.at < end]
    minutes = max(end - start, 1e-9) / 60
    clusters: dict[str, Any] = {}
    for cluster in sorted({c.cluster for c in inside}) or [""]:
        mine = [c for c in inside if c.cluster == cluster]
        status = [c.at for c in mine if c.command in STATUS_COMMANDS]
        change = [c.at for c in mine if c.command in CHANGE_COMMANDS]
        clusters[cluster or "(default)"] = {
            "status_polling": len(status), "status_polling_per_minute": round(len(status) / minutes, 2),
            "status_polling_busiest_60s": busiest_window(status),
            "submits_cancels": len(change), "submits_cancels_per_minute": round(len(change) / minutes, 2),
            "submits_cancels_busiest_60s": busiest_window(change),
        }
    return {"by_command": dict(Counter(c.command for c in inside)), "by_cluster": clusters}


def sdiag_summary(first: SdiagSnapshot, last: SdiagSnapshot, user: str, own_sdiag_calls: int) -> dict[str, Any]:
    """Our user's RPCs and everyone's by kind between two snapshots (per minute too)."""
    d = delta(first, last)
    ours = d.by_user.get(user, 0)
    ours_less_sdiag = max(0, ours - (0 if d.reset else own_sdiag_calls))
    kinds = d.by_kind()
    if not d.reset:  # our sdiag calls are REQUEST_STATS_INFO: "other", and not the app's
        kinds["other"] = max(0, kinds["other"] - own_sdiag_calls)
    return {
        "seconds": d.seconds, "reset_in_between": d.reset, "user": user,
        "user_rpcs": ours_less_sdiag, "user_rpcs_per_minute": d.per_minute(ours_less_sdiag),
        "own_sdiag_calls_left_out": own_sdiag_calls if not d.reset else 0,
        "cluster_wide_by_kind": kinds,
        "cluster_wide_by_kind_per_minute": {k: d.per_minute(n) for k, n in kinds.items()},
        "cluster_wide_by_type": dict(sorted(d.by_type.items())),
        "other_users_rpcs": {u: n for u, n in sorted(d.by_user.items()) if u != user},
    }


def adapter_summary(rows: list[tuple[str, float, int]], start: float, end: float, budget: int) -> dict[str, Any]:
    """``sbx_slurm_calls`` rows (cluster, epoch, calls) in [start, end): per cluster, per minute,
    the busiest 60 s against the budget."""
    minutes = max(end - start, 1e-9) / 60
    out: dict[str, Any] = {}
    for cluster in sorted({r[0] for r in rows}):
        mine = [(at, n) for c, at, n in rows if c == cluster and start <= at < end]
        busiest = busiest_window([at for at, _ in mine], [n for _, n in mine])
        out[cluster or "(default)"] = {"calls": sum(n for _, n in mine), "passes": len(mine),
                                       "per_minute": round(sum(n for _, n in mine) / minutes, 2),
                                       "busiest_60s": busiest, "budget_per_minute": budget,
                                       "within_budget": busiest <= budget}
    return out


def target(app_commands: dict[str, Any], adapter: dict[str, Any], budget: int) -> dict[str, Any]:
    """Issue 17's target: status polling <= 6/min per cluster (averaged and in the busiest 60 s),
    and no 60 s in which the adapter's counted calls exceed the budget."""
    polling = {c: {"per_minute": v["status_polling_per_minute"], "busiest_60s": v["status_polling_busiest_60s"]}
               for c, v in app_commands["by_cluster"].items()}
    polling_ok = all(v["per_minute"] <= TARGET_STATUS_PER_MINUTE and v["busiest_60s"] <= TARGET_STATUS_PER_MINUTE
                     for v in polling.values())
    burst_ok = all(v["within_budget"] for v in adapter.values())
    return {"status_polling_per_minute_max": TARGET_STATUS_PER_MINUTE, "status_polling": polling,
            "status_polling_met": polling_ok, "budget_per_minute": budget, "no_burst_above_budget": burst_ok,
            "met": polling_ok and burst_ok}


# -- the plan ------------------------------------------------------------------------------------------
def pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """The app's modules, as write_app takes them (``run`` is each module's run.sh)."""
    return {
        "work": {"run": f'sleep {args.task_seconds}; send-message "s-$1"\n', "arguments": dict(FAST),
                 "sink_modules": ["sum"], "parameters": {"start_task": "FILE:bodies.txt"},
                 "slurm": {"time": "30", "min_jobs": 0, "max_jobs": args.max_jobs,
                           "tasks_per_job": args.tasks_per_job}},
        "sum": {"run": "sleep 0.1\n", "arguments": dict(FAST),
                "slurm": {"time": "30", "min_jobs": 0, "max_jobs": 1, "tasks_per_job": args.tasks}},
    }


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """What a run does, without doing it (``--dry-run``)."""
    modules = {name: {k: v for k, v in m.items() if k != "run"} | {"run.sh": m["run"]}
               for name, m in pipeline(args).items()}
    return {
        "pipeline": {"name": "rpc", "modules": modules, "start_tasks": args.tasks,
                     "task_executions": 2 * args.tasks},
        "environment": {"SCALEBOX_AUTOSCALE_SECONDS": str(args.interval),
                        "SCALEBOX_SLURM_RPC_PER_MINUTE": str(args.budget),
                        "SCALEBOX_DSN": "a scratch database sbx_bench_rpc_XXXXXXXX on $SCALEBOX_DSN's server",
                        "PATH": f"logging wrappers of {', '.join(COMMANDS)} first"},
        "steps": ["sinfo -h -N -o '%N %c' (nodes and CPUs, before the first snapshot)",
                  f"sdiag (snapshot 0, never -r), as {getpass.getuser()}",
                  "scalebox submit app.yaml --json (autoscaling from 0 jobs)",
                  f"every {args.sample_seconds:g} s until every task is OK and every stage job's launcher "
                  f"left (then one more sample: the drain tail's passes), or {args.timeout:g} s: sdiag, "
                  "stage jobs live and READY tasks (read from the database, not through scalebox status)",
                  "sdiag (last snapshot), the wrappers' log, sbx_slurm_calls",
                  "scalebox app cancel; scalebox stage stop --now for each module; drop the scratch database"],
        "targets": {"status_polling_per_minute_per_cluster_max": TARGET_STATUS_PER_MINUTE,
                    "adapter_calls_in_any_60s_max": args.budget},
        "command": "SCALEBOX_DSN=postgresql://postgres@127.0.0.1:55432/scalebox .venv/bin/python "
                   "benchmarks/slurm_rpc.py" + "".join(f" --{k.replace('_', '-')} {v}"
                                                       for k, v in sorted(vars(args).items()) if k != "dry_run"),
    }


# -- the run (needs Slurm) -----------------------------------------------------------------------------
def snapshot() -> SdiagSnapshot:
    proc = subprocess.run(["sdiag"], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"sdiag failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return parse_sdiag(proc.stdout)


def one(dsn: str, text: str, *params: Any) -> Any:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(text, params).fetchone()  # type: ignore[arg-type]
    return row[0] if row else None


def rows(dsn: str, text: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute(text, params).fetchall()  # type: ignore[arg-type]


@dataclass
class Sampler:
    """Snapshots and per-sample facts while the pipeline runs."""

    dsn: str
    app_id: int
    user: str
    start: float
    snaps: list[tuple[float, SdiagSnapshot]] = field(default_factory=list)
    windows: list[dict[str, Any]] = field(default_factory=list)
    adapter_rows: dict[int, tuple[str, float, int]] = field(default_factory=dict)

    def sample(self, calls: list[Call]) -> None:
        now = time.time()
        self.snaps.append((now, snapshot()))
        # sbx_slurm_calls keeps an hour: read it as we go so a long run loses nothing
        for rid, cluster, at, n in rows(self.dsn, "SELECT id, cluster, extract(epoch FROM at)::float8, calls "
                                                  "FROM sbx_slurm_calls WHERE app_id = %s", self.app_id):
            self.adapter_rows[int(rid)] = (str(cluster), float(at), int(n))
        if len(self.snaps) < 2:
            return
        (t0, s0), (t1, s1) = self.snaps[-2], self.snaps[-1]
        d = delta(s0, s1)
        inside = [c for c in calls if t0 <= c.at < t1]
        minutes = max(t1 - t0, 1e-9) / 60
        self.windows.append({
            "t_s": round(t1 - self.start, 1),
            "stage_jobs_live": int(one(self.dsn, "SELECT count(*) FROM sbx_stage_jobs WHERE app_id = %s AND "
                                                 "ended_at IS NULL", self.app_id) or 0),
            "ready_tasks": int(one(self.dsn, "SELECT count(*) FROM sbx_tasks WHERE app_id = %s AND status = -1",
                                   self.app_id) or 0),
            "app_status_polling_per_minute": round(sum(c.command in STATUS_COMMANDS for c in inside) / minutes, 2),
            "app_submits_cancels_per_minute": round(sum(c.command in CHANGE_COMMANDS for c in inside) / minutes, 2),
            "sdiag_user_rpcs_per_minute": d.per_minute(max(0, d.by_user.get(self.user, 0) - (0 if d.reset else 1))),
            "sdiag_cluster_status_per_minute": d.per_minute(d.by_kind()["status"]),
            "reset": d.reset,
        })


def run(args: argparse.Namespace) -> dict[str, Any]:
    import psycopg
    from psycopg import sql

    server = os.environ.get("SCALEBOX_DSN") or os.environ.get("SCALEBOX_TEST_DSN")
    if not server:
        raise SystemExit("set SCALEBOX_DSN (a server where a scratch database may be created)")
    dbname = f"sbx_bench_rpc_{uuid.uuid4().hex[:8]}"
    params = psycopg.conninfo.conninfo_to_dict(server)
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    dsn = psycopg.conninfo.make_conninfo(**{**params, "dbname": dbname})
    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-rpc-"))
    tmp.chmod(0o755)
    log = tmp / "slurm-calls.log"
    wrappers(tmp / "bin", log)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PG", "SCALEBOX_"))}
    env.update({"SCALEBOX_DSN": dsn, "SCALEBOX_WORK_ROOT": str(tmp / "work"), "SCALEBOX_HOME": str(tmp / "home"),
                "SCALEBOX_AUTOSCALE_SECONDS": str(args.interval), "SCALEBOX_SLURM_RPC_PER_MINUTE": str(args.budget),
                "PATH": f"{tmp / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    (tmp / "work").mkdir(mode=0o777)
    app_id = ""
    try:
        nodes, cpus = cluster_cpus()
        path = write_app(tmp / "rpc", pipeline(args))
        (path.parent / "bodies.txt").write_text("".join(f"t{i}\n" for i in range(args.tasks)))
        user = getpass.getuser()
        sbx(env, "db", "init")  # the schema first: the sampler reads sbx_slurm_calls from the start
        start = time.time()
        sampler = Sampler(dsn, 0, user, start)
        sampler.sample([])
        app_id = str(json.loads(sbx(env, "submit", str(path), "--json"))["app_id"])
        sampler.app_id = int(app_id)
        done = False
        finished = 0.0
        while time.time() - start < args.timeout:
            time.sleep(args.sample_seconds)
            sampler.sample(parse_call_log(log.read_text()))
            if not done:
                ok = one(dsn, "SELECT count(*) FROM sbx_tasks WHERE app_id = %s AND status = 0", int(app_id))
                done = int(ok or 0) >= 2 * args.tasks
                finished = time.time() if done else finished
            # the drain tail (the jobs leaving, their passes) is part of the run: measured until
            # every stage job's launcher left, and one more sample for the passes it asked for
            if done and not int(one(dsn, "SELECT count(*) FROM sbx_stage_jobs WHERE app_id = %s AND "
                                         "finished_at IS NULL AND ended_at IS NULL", int(app_id)) or 0):
                time.sleep(args.sample_seconds)
                break
        end = time.time()
        if sampler.snaps[-1][0] < end - 1:
            sampler.sample(parse_call_log(log.read_text()))
        calls = parse_call_log(log.read_text())
        app_commands = command_summary(calls, start, end)
        adapter = adapter_summary(list(sampler.adapter_rows.values()), start, end, args.budget)
        jobs = rows(dsn, "SELECT m.name, count(*) FROM sbx_stage_jobs j JOIN sbx_modules m ON m.id = j.module_id "
                         "WHERE m.app_id = %s GROUP BY m.name ORDER BY m.name", int(app_id))
        return {
            "tasks": args.tasks, "task_seconds": args.task_seconds, "task_executions": 2 * args.tasks,
            "nodes": nodes, "cpus": cpus, "autoscale_interval_s": args.interval, "done": done,
            "make_span_s": round(finished - start, 1) if done else None,
            "measured_s": round(end - start, 1), "drain_tail_measured": done and end > finished,
            "stage_jobs": {str(n): int(c) for n, c in jobs},
            "sdiag": sdiag_summary(sampler.snaps[0][1], sampler.snaps[-1][1], user, len(sampler.snaps) - 1),
            "app_commands": app_commands, "adapter_counted": adapter,
            "windows": sampler.windows, "target": target(app_commands, adapter, args.budget),
        }
    finally:
        if app_id:
            sbx(env, "app", "cancel", app_id)
            for module in ("work", "sum"):
                sbx(env, "stage", "stop", "--app", app_id, module, "--now")
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        shutil.rmtree(tmp, ignore_errors=True)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=500, help="tasks entering the pipeline (each makes one more)")
    ap.add_argument("--task-seconds", type=float, default=4.0)
    # 7 one-CPU jobs of work + sum's one: the test-bed's 4 nodes x 2 CPUs, both stages running at once
    ap.add_argument("--max-jobs", type=int, default=7, help="work's max_jobs (autoscaled from 0)")
    ap.add_argument("--tasks-per-job", type=int, default=25)
    ap.add_argument("--interval", type=float, default=10.0, help="SCALEBOX_AUTOSCALE_SECONDS")
    ap.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="SCALEBOX_SLURM_RPC_PER_MINUTE")
    ap.add_argument("--sample-seconds", type=float, default=30.0, help="sdiag snapshot interval")
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up after this (done: false)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; touch neither Slurm nor the database")
    return ap.parse_args(argv)


def main() -> None:
    args = arguments()
    print(json.dumps(plan(args) if args.dry_run else run(args), indent=2))


if __name__ == "__main__":
    main()

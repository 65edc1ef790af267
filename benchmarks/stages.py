#!/usr/bin/env python3
"""Stage jobs on the real (local) Slurm: Slurm calls per minute with N stage jobs, and the
make-span of issue 20's ``w -> s`` pipeline.

Prints one JSON object:

- ``rpc``: one module with ``--jobs`` stage jobs kept busy (one long task each) for
  ``--seconds``; the Slurm commands the app's processes ran in that window (counted by wrappers
  of squeue/sinfo/sacct/sbatch/scancel/scontrol put first on PATH, so other users of the
  cluster do not count; ``squeue --help`` probes left out), per minute, by command, plus the
  cluster-wide ``sdiag`` RPC deltas for reference (those include everyone's);
- ``pipeline``: ``w`` (``--jobs`` exclusive jobs, 5 tasks per job) -> ``s`` (one exclusive job),
  ``--tasks`` tasks of ``--task-seconds`` each; the make-span from submit until every task is
  OK (or ``null`` after ``--timeout``: the stages wedged) against the ideal (the work spread
  over the nodes), and the Slurm commands per minute meanwhile;
- ``chain``: a 4-stage pipeline ``a -> b -> c -> d`` over all the nodes (each stage up to
  ``--jobs`` jobs, ``--chain-tasks`` tasks of ``--chain-task-seconds`` per stage, every task of a
  stage emitting one to the next) for several minutes: the make-span against the ideal (all the
  work spread over every CPU, plus one task per stage of pipeline latency), the stage jobs
  used, and the controller's RPCs per minute from ``sdiag`` deltas, split into status and
  scaling (job/partition/node info: what the target of 6 per minute per cluster is about) and
  the rest (submits, job steps, completions: these grow with the jobs by nature), beside the
  commands the app's processes ran (wrappers).

Usage: python benchmarks/stages.py [--jobs 4] [--seconds 60] [--interval 10] [--tasks 40]
       [--task-seconds 0.5] [--timeout 300] [--chain-tasks 60] [--chain-task-seconds 2]
       [--only rpc|pipeline|chain]
Needs SCALEBOX_DSN (or SCALEBOX_TEST_DSN) for a server where it may create a scratch database,
and Slurm. Run it with PYTHONPATH=<another checkout> to measure that code (the jobs inherit it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

COMMANDS = ("squeue", "sinfo", "sacct", "sbatch", "scancel", "scontrol")
SDIAG_RPC = re.compile(r"^\s*(REQUEST_\w+)\s+\(\s*\d+\)\s+count:(\d+)", re.MULTILINE)


def wrappers(bin_dir: Path, log: Path) -> None:
    """A logging wrapper for each Slurm command, exec'ing the real one."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        real = shutil.which(name)
        if real is None:
            raise SystemExit(f"{name} not found: Slurm's client tools are needed")
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\necho "$(date +%s.%N) {name} $*" >> {log}\nexec {real} "$@"\n')
        path.chmod(0o755)
    log.touch()
    log.chmod(0o666)


def calls_between(log: Path, start: float, end: float) -> Counter[str]:
    """Slurm commands logged in [start, end), by name (``--help`` probes left out)."""
    out: Counter[str] = Counter()
    for line in log.read_text().splitlines():
        stamp, _, rest = line.partition(" ")
        if "--help" in rest or not start <= float(stamp) < end:
            continue
        out[rest.split(" ", 1)[0]] += 1
    return out


def sdiag() -> Counter[str]:
    """Cluster-wide RPC counts by type (everyone's)."""
    text = subprocess.run(["sdiag"], capture_output=True, text=True, check=False).stdout
    return Counter({name: int(n) for name, n in SDIAG_RPC.findall(text)})


def sbx(env: dict[str, str], *args: str) -> str:
    # run outside any checkout: `python -m` puts the cwd first on sys.path (before PYTHONPATH), and
    # the stage jobs inherit the submitter's cwd, so a PYTHONPATH=<other checkout> run measures that code
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False, cwd=Path(env["SCALEBOX_WORK_ROOT"]).parent)
    if proc.returncode != 0:
        raise SystemExit(f"scalebox {' '.join(args)}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def write_app(root: Path, modules: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        script = module.pop("run")
        (root / name).mkdir(exist_ok=True)
        (root / name / "run.sh").write_text("#!/bin/sh\n" + script)
        (root / name / "run.sh").chmod(0o755)
    (root / "app.yaml").write_text(yaml.safe_dump({"name": root.name, "modules": modules}, sort_keys=False))
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    return root / "app.yaml"


def query(dsn: str, text: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(text, params).fetchall()  # type: ignore[arg-type]


FAST = {"max_idle_polls": 4, "sleep_interval_seconds": 0.5, "heartbeat_seconds": 2}


def wait(what: str, predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(1.0)
    sys.stderr.write(f"gave up waiting for {what} after {timeout:.0f} s\n")
    return False


def rpc_mode(env: dict[str, str], dsn: str, tmp: Path, log: Path, args: argparse.Namespace) -> dict[str, Any]:
    path = write_app(tmp / "rpc", {"busy": {
        "run": f"sleep {args.seconds + 60}\n", "arguments": FAST,
        "slurm": {"time": "15", "max_jobs": args.jobs, "tasks_per_job": 1},
        "parameters": {"start_task": "FILE:bodies.txt"}}})
    (path.parent / "bodies.txt").write_text("".join(f"b{i}\n" for i in range(args.jobs)))
    app_id = str(json.loads(sbx(env, "submit", str(path), "--json"))["app_id"])
    try:
        running = wait(f"{args.jobs} running tasks", lambda: query(
            dsn, "SELECT count(*) FROM sbx_tasks WHERE app_id = %s AND status = -3", int(app_id))[0][0] == args.jobs,
            180)
        start, before = time.time(), sdiag()
        time.sleep(args.seconds)
        end, after = time.time(), sdiag()
        calls = calls_between(log, start, end)
        per_minute = sum(calls.values()) * 60 / (end - start)
        return {"jobs": args.jobs, "all_running": running, "seconds": round(end - start, 1),
                "autoscale_interval_s": args.interval, "slurm_calls": dict(calls),
                "slurm_calls_per_minute": round(per_minute, 1),
                "sdiag_delta_cluster_wide": {k: after[k] - before[k] for k in after if after[k] - before[k]}}
    finally:
        sbx(env, "app", "cancel", app_id)
        sbx(env, "stage", "stop", "--app", app_id, "busy", "--now")


def pipeline_mode(env: dict[str, str], dsn: str, tmp: Path, log: Path, args: argparse.Namespace) -> dict[str, Any]:
    exclusive = {"time": "15", "extra_sbatch_args": ["--exclusive"]}
    path = write_app(tmp / "ws", {
        "w": {"run": f'sleep {args.task_seconds}; send-message "s-$1"\n', "arguments": FAST, "sink_modules": ["s"],
              "slurm": {**exclusive, "max_jobs": args.jobs, "tasks_per_job": 5},
              "parameters": {"start_task": "FILE:bodies.txt"}},
        "s": {"run": f"sleep {args.task_seconds}\n", "arguments": FAST, "slurm": {**exclusive, "max_jobs": 1}}})
    (path.parent / "bodies.txt").write_text("".join(f"t{i}\n" for i in range(args.tasks)))
    start = time.time()
    app_id = str(json.loads(sbx(env, "submit", str(path), "--json"))["app_id"])
    try:
        done = wait("every task to succeed", lambda: query(
            dsn, "SELECT count(*) FROM sbx_tasks WHERE app_id = %s AND status = 0", int(app_id))[0][0]
            == 2 * args.tasks, args.timeout)
        end = time.time()
        calls = calls_between(log, start, end)
        nodes = len(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                                   check=False).stdout.split())
        # w's work spread over min(jobs, nodes) one-slot jobs, then s's on one: no overlap assumed
        ideal = args.tasks * args.task_seconds / max(1, min(args.jobs, nodes)) + args.tasks * args.task_seconds
        return {"tasks_per_module": args.tasks, "task_seconds": args.task_seconds, "w_jobs": args.jobs,
                "make_span_s": round(end - start, 1) if done else None, "timeout_s": args.timeout,
                "ideal_work_s": round(ideal, 1), "slurm_calls": dict(calls),
                "slurm_calls_per_minute": round(sum(calls.values()) * 60 / (end - start), 1)}
    finally:
        sbx(env, "app", "cancel", app_id)
        for module in ("w", "s"):
            sbx(env, "stage", "stop", "--app", app_id, module, "--now")


STATUS_RPCS = ("REQUEST_JOB_INFO", "REQUEST_JOB_INFO_SINGLE", "REQUEST_JOB_USER_INFO", "REQUEST_PARTITION_INFO",
               "REQUEST_NODE_INFO", "REQUEST_NODE_INFO_SINGLE", "REQUEST_JOB_STATE")
"""The sdiag RPC types that status and scaling passes cause (squeue, sinfo, scontrol show)."""


def cluster_cpus() -> tuple[int, int]:
    """(nodes, CPUs) of the default cluster."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c"], capture_output=True, text=True, check=False).stdout
    nodes = {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if len(line.split()) == 2}
    return len(nodes), sum(nodes.values())


def chain_mode(env: dict[str, str], dsn: str, tmp: Path, log: Path, args: argparse.Namespace) -> dict[str, Any]:
    stages = ["a", "b", "c", "d"]
    modules: dict[str, Any] = {}
    for i, name in enumerate(stages):
        emit = f'; send-message "{stages[i + 1]}-$1"' if i + 1 < len(stages) else ""
        modules[name] = {"run": f"sleep {args.chain_task_seconds}{emit}\n", "arguments": FAST,
                         "slurm": {"time": "30", "max_jobs": args.jobs, "tasks_per_job": 5}}
        if i + 1 < len(stages):
            modules[name]["sink_modules"] = [stages[i + 1]]
    modules["a"]["parameters"] = {"start_task": "FILE:bodies.txt"}
    path = write_app(tmp / "chain", modules)
    (path.parent / "bodies.txt").write_text("".join(f"t{i}\n" for i in range(args.chain_tasks)))
    total = len(stages) * args.chain_tasks
    start, before = time.time(), sdiag()
    app_id = str(json.loads(sbx(env, "submit", str(path), "--json"))["app_id"])
    try:
        done = wait("every task of the chain to succeed", lambda: query(
            dsn, "SELECT count(*) FROM sbx_tasks WHERE app_id = %s AND status = 0", int(app_id))[0][0] == total,
            args.timeout * 4)
        end, after = time.time(), sdiag()
        minutes = (end - start) / 60
        delta = {k: after[k] - before[k] for k in after if after[k] - before[k] > 0}
        status_rpcs = sum(v for k, v in delta.items() if k in STATUS_RPCS)
        calls = calls_between(log, start, end)
        jobs = query(dsn, "SELECT m.name, count(*) FROM sbx_stage_jobs j JOIN sbx_modules m ON m.id = j.module_id "
                          "WHERE m.app_id = %s GROUP BY m.name ORDER BY m.name", int(app_id))
        nodes, cpus = cluster_cpus()
        work = total * args.chain_task_seconds
        ideal = work / max(1, cpus) + len(stages) * args.chain_task_seconds
        span = end - start
        return {"stages": len(stages), "tasks_per_stage": args.chain_tasks, "task_seconds": args.chain_task_seconds,
                "nodes": nodes, "cpus": cpus, "autoscale_interval_s": args.interval,
                "make_span_s": round(span, 1) if done else None, "ideal_s": round(ideal, 1),
                "make_span_over_ideal": round(span / ideal, 2) if done else None,
                "stage_jobs": {str(name): int(n) for name, n in jobs},
                "sdiag_status_and_scaling_rpc_per_minute": round(status_rpcs / minutes, 1),
                "sdiag_other_rpc_per_minute": round((sum(delta.values()) - status_rpcs) / minutes, 1),
                "sdiag_delta": delta,
                "app_slurm_calls": dict(calls),
                "app_status_calls_per_minute": round(sum(v for k, v in calls.items() if k in ("squeue", "sinfo",
                                                                                           "sacct", "scontrol"))
                                                     / minutes, 1)}
    finally:
        sbx(env, "app", "cancel", app_id)
        for module in stages:
            sbx(env, "stage", "stop", "--app", app_id, module, "--now")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0, help="rpc: the measured window")
    ap.add_argument("--interval", type=float, default=10.0, help="SCALEBOX_AUTOSCALE_SECONDS")
    ap.add_argument("--tasks", type=int, default=40, help="pipeline: tasks per module")
    ap.add_argument("--task-seconds", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=300.0, help="pipeline: give up (wedged) after this")
    ap.add_argument("--chain-tasks", type=int, default=60, help="chain: tasks per stage")
    ap.add_argument("--chain-task-seconds", type=float, default=2.0)
    ap.add_argument("--only", choices=("rpc", "pipeline", "chain"))
    args = ap.parse_args()
    server = os.environ.get("SCALEBOX_DSN") or os.environ.get("SCALEBOX_TEST_DSN")
    if not server:
        raise SystemExit("set SCALEBOX_DSN (a server where a scratch database may be created)")
    dbname = f"sbx_bench_stages_{uuid.uuid4().hex[:8]}"
    params = psycopg.conninfo.conninfo_to_dict(server)
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    dsn = psycopg.conninfo.make_conninfo(**{**params, "dbname": dbname})
    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-stages-"))
    tmp.chmod(0o755)
    log = tmp / "slurm-calls.log"
    wrappers(tmp / "bin", log)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PG", "SCALEBOX_"))}
    env.update({"SCALEBOX_DSN": dsn, "SCALEBOX_WORK_ROOT": str(tmp / "work"), "SCALEBOX_HOME": str(tmp / "home"),
                "SCALEBOX_AUTOSCALE_SECONDS": str(args.interval),
                "PATH": f"{tmp / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    (tmp / "work").mkdir(mode=0o777)
    try:
        out: dict[str, Any] = {}
        if args.only in (None, "rpc"):
            out["rpc"] = rpc_mode(env, dsn, tmp, log, args)
        if args.only in (None, "pipeline"):
            out["pipeline"] = pipeline_mode(env, dsn, tmp, log, args)
        if args.only in (None, "chain"):
            out["chain"] = chain_mode(env, dsn, tmp, log, args)
        print(json.dumps(out, indent=2))
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Per-task overhead of the runtimes, measured in one run on the same no-op script.

Prints one JSON object with, per mode, the wall time of start + wait of one run of a no-op
``run.sh`` (``#!/bin/sh`` + ``exit 0``), through the runtime sessions the launcher uses:

- ``bare``: the bare-process runtime (``local``): fork/exec of the script;
- ``apptainer_exec``: ``apptainer exec`` per task (``slot_options: [container_per_task]``);
- ``apptainer_warm``: a warm slot container (started once, the agent runs each task);
- ``podman_run`` / ``podman_warm``: the same for Podman, when installed (``--no-podman`` skips).

``overhead_ms`` of a container mode = its median minus the bare median; the target for the warm
slot is ≤ 5 ms. The image is ``containers/scalebox-base.def`` (built into a temporary SIF cache).

Usage: python benchmarks/containers.py [--runs N] [--cold-runs M] [--no-podman]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from scalebox_hpc.runtime.base import RunSpec, Session, SessionSpec
from scalebox_hpc.runtime.choose import RuntimeChooser
from scalebox_hpc.runtime.container import HostDirs

REPO = Path(__file__).resolve().parents[1]


def measure(session: Session, root: Path, runs: int) -> dict[str, float]:
    """Start + wait of ``runs`` no-op runs; milliseconds."""
    code = root / "code"
    spec = RunSpec(argv=[str(code / "run.sh"), "body", "{}"], cwd=root / "work",
                   env={"PATH": os.environ.get("PATH", os.defpath), "WORK_DIR": str(root / "work")},
                   stdout_path=root / "private" / "run.out", stderr_path=root / "private" / "run.err")
    times = []
    for _ in range(runs + 2):
        t0 = time.perf_counter()
        outcome = session.start(spec).wait(None)
        times.append((time.perf_counter() - t0) * 1000)
        assert outcome is not None and outcome.returncode == 0, outcome
    times = times[2:]  # warm-up
    times.sort()
    return {"runs": runs, "median_ms": round(statistics.median(times), 3),
            "mean_ms": round(statistics.fmean(times), 3), "p95_ms": round(times[int(0.95 * (len(times) - 1))], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="runs of the bare and warm modes")
    parser.add_argument("--cold-runs", type=int, default=30, help="runs of the per-task container modes")
    parser.add_argument("--no-podman", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scalebox-bench-") as tmp:
        root = Path(tmp)
        for d in ("code", "work", "private", "local", "cache"):
            (root / d).mkdir()
        (root / "code" / "run.sh").write_text("#!/bin/sh\nexit 0\n")
        (root / "code" / "run.sh").chmod(0o755)
        os.environ["SCALEBOX_CONTAINERS"] = str(REPO / "containers")
        chooser = RuntimeChooser("auto", host=HostDirs(local_dir=root / "local"), sif_cache=root / "cache")

        def session(runtime: str | None, options: list[str]) -> Session:
            return chooser.open(SessionSpec(
                name="bench", work_dir=root / "work", private_dir=root / "private", code_path=root / "code",
                image="scalebox-base" if runtime else None, runtime=runtime, options=options))

        result: dict[str, Any] = {"bare": measure(session(None, []), root, args.runs)}
        engines = ["apptainer"] + ([] if args.no_podman else ["podman"])
        for engine in engines:
            if shutil.which(engine) is None:
                result[f"{engine}_skipped"] = "not installed"
                continue
            cold = "exec" if engine == "apptainer" else "run"
            result[f"{engine}_{cold}"] = measure(session(engine, ["container_per_task"]), root, args.cold_runs)
            t0 = time.perf_counter()
            warm = session(engine, [])
            start_ms = (time.perf_counter() - t0) * 1000
            result[f"{engine}_warm"] = {**measure(warm, root, args.runs), "container_start_ms": round(start_ms, 1)}
            warm.close()
        bare = result["bare"]["median_ms"]
        for key, value in result.items():
            if isinstance(value, dict) and key != "bare":
                value["overhead_ms"] = round(value["median_ms"] - bare, 3)
        result["warm_target_met"] = all(
            v["overhead_ms"] <= 5.0 for k, v in result.items() if k.endswith("_warm") and isinstance(v, dict))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

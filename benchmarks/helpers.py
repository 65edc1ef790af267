#!/usr/bin/env python3
"""Cost of one in-run helper call (``send-message``, ``scalebox task add``, ``scalebox app set-finished``).

Prints one JSON object: per helper and path, the milliseconds per call of N calls made in a
loop by one ``/bin/sh`` script, as a bare ``run.sh`` makes them (SCALEBOX_EMIT_FILE set, the
launcher's helper dir first on PATH), and the records written (a check that every call wrote one).

- ``bare``: the helpers the bare runtime puts on PATH (``scalebox_hpc/launcher/bin``);
- ``container_sh``: the POSIX-sh helpers of the containers (``runtime/container_bin``), run on the host;
- ``python``: the Python CLI itself (``python -m scalebox_hpc task add``), what every bare call cost
  before the sh fast path.

``spawn_floor_ms`` is the same loop running ``/bin/true``: the cost of starting any process on
this machine, which the sh helpers cannot go below (on a loaded machine it dominates).

Usage: python benchmarks/helpers.py [--calls N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scalebox_hpc.launcher.slot import HELPER_BIN
from scalebox_hpc.runtime.container import CONTAINER_BIN

CALLS = {
    "send-message": 'send-message "body-$i" \'{"k":"v"}\'',
    "task-add": 'scalebox task add -m calc -H k=v -- "body-$i"',
    "set-finished": 'scalebox app set-finished "Result is $i"',
}


def measure(bin_dir: Path | None, call: str, calls: int, work: Path) -> dict[str, float | int]:
    """ms per call of ``call`` made ``calls`` times by one sh loop, and the records written."""
    emit = work / "emit.jsonl"
    emit.unlink(missing_ok=True)
    if bin_dir is None:  # the Python CLI, as the old bare `scalebox` wrapper ran it
        call = call.replace("scalebox ", f"{sys.executable} -m scalebox_hpc ")
        call = call.replace("send-message ", f"{sys.executable} -m scalebox_hpc task add --headers-json ")
        call = call.replace('"body-$i" \'{"k":"v"}\'', '\'{"k":"v"}\' -- "body-$i"')
    script = f'i=0\nwhile [ "$i" -lt {calls} ]; do\n  {call} || exit 1\n  i=$((i + 1))\ndone\n'
    path = os.environ.get("PATH", os.defpath)
    env = {**os.environ, "SCALEBOX_EMIT_FILE": str(emit), "SCALEBOX_PYTHON": sys.executable,
           "PATH": f"{bin_dir}{os.pathsep}{path}" if bin_dir else path}
    start = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", script], env=env, check=True)
    elapsed = time.perf_counter() - start
    records = len(emit.read_bytes().splitlines()) if emit.exists() else 0
    return {"ms_per_call": round(elapsed * 1000 / calls, 3), "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per helper and path")
    args = parser.parse_args()
    result: dict[str, object] = {"calls": args.calls}
    with tempfile.TemporaryDirectory(prefix="sbx-helpers-") as tmp:
        work = Path(tmp)
        result["spawn_floor_ms"] = measure(Path("/bin"), "/bin/true", args.calls, work)["ms_per_call"]
        for name, call in CALLS.items():
            result[name] = {
                "bare": measure(HELPER_BIN, call, args.calls, work),
                "container_sh": measure(CONTAINER_BIN, call, args.calls, work),
                # the interpreter's start-up dominates: a tenth of the calls is plenty
                "python": measure(None, call, max(1, args.calls // 10), work),
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

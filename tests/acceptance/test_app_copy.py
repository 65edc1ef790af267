"""examples/app-copy end to end: `scalebox run` list-dir -> file-copy between two temp dirs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.components import need

pytestmark = pytest.mark.pg

REPO = Path(__file__).resolve().parents[2]


def test_app_copy_copies_every_file(cli_env: dict[str, str], tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        need("rsync", "not on PATH (launchers/testbed/rsync.sh install)")
    source, target = tmp_path / "source", tmp_path / "target tree"
    names = [f"f{i:02d}.bin" for i in range(10)] + [f"a/b{i}.txt" for i in range(5)] + \
        [f"a/c/deep {i}.dat" for i in range(4)] + ["with space & 'quote'.txt"]
    for i, name in enumerate(names):
        path = source / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (i * 997))
    env = dict(cli_env, SOURCE_URL=str(source), TARGET_URL=str(target), START_DIR=".", REGEX_FILTER="",
               CHECKSUM="yes")
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "run", str(REPO / "examples/app-copy/app.yaml")],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copied = {str(p.relative_to(target)): p.stat().st_size for p in target.rglob("*") if p.is_file()}
    assert copied == {name: (source / name).stat().st_size for name in names}
    status = subprocess.run([sys.executable, "-m", "scalebox_hpc", "status", "--json"], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    by_module = {m["module"]: m for m in json.loads(status.stdout)["modules"]}
    assert by_module["file-copy"]["ok"] == len(names) and by_module["list-dir"]["ok"] == 1
    assert all(m["failed"] == 0 for m in by_module.values())

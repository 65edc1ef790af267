"""F25: a build sweeps the temporary SIFs that killed builds left in the cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

from scalebox_hpc.runtime.images import STALE_TMP_SECONDS, SifCache


def test_a_build_removes_leftover_temporary_sifs(tmp_path: Path) -> None:
    cache = SifCache("/nonexistent/apptainer", tmp_path)
    own = tmp_path / ".img-abc.4242.1.tmp.sif"  # this key, killed mid-build: stale whatever its age
    old = tmp_path / ".other-def.17.2.tmp.sif"
    fresh = tmp_path / ".other-def.18.3.tmp.sif"  # maybe a build running right now elsewhere
    for path in (own, old, fresh):
        path.write_bytes(b"partial")
    past = time.time() - STALE_TMP_SECONDS - 60
    os.utime(old, (past, past))
    def build(out: Path) -> None:
        out.write_bytes(b"sif")

    path, built = cache._cached("img-abc", build)
    assert built and path.read_bytes() == b"sif"
    assert not own.exists() and not old.exists() and fresh.exists()
    assert cache._cached("img-abc", build) == (path, False)

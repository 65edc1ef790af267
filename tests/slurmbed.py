"""Shared set-up for tests that run stage jobs on the Slurm test-bed: the environment a user
would have on a login node (none of the runner's SCALEBOX_* / PG* variables, a shared work root
and home), a world-readable scratch dir, and cancelling only the jobs a test submitted.

tests/integration/test_stage_slurm.py and test_doctor_slurm.py build the same environment
inline; new Slurm tests use these helpers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def login_env(shared: Path, **extra: str) -> dict[str, str]:
    """This process's environment without SCALEBOX_* and PG*, with the work root and home in
    ``shared`` and a 2 s autoscale interval; ``extra`` on top (e.g. SCALEBOX_DSN)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEBOX_", "PG"))}
    environ.update(SCALEBOX_WORK_ROOT=str(shared / "work"), SCALEBOX_HOME=str(shared / "home"),
                   SCALEBOX_AUTOSCALE_SECONDS="2", **extra)
    return environ


@contextmanager
def shared_dir(prefix: str) -> Iterator[Path]:
    """A fresh world-writable dir in /tmp (jobs may run as another user), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def jobs_named(*names: str) -> list[str]:
    """Ids of this user's queued or running jobs with one of these names."""
    out = subprocess.run(["squeue", "--me", "-h", "-o", "%i %j"], capture_output=True, text=True,
                         check=False).stdout
    return [f[0] for f in (line.split() for line in out.splitlines()) if len(f) == 2 and f[1] in names]


def cancel(job_ids: list[str]) -> None:
    """Cancel these jobs (ids after ``--``), nobody else's."""
    if job_ids:
        subprocess.run(["scancel", "--", *job_ids], check=False)

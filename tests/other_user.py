"""A second, real, unprivileged OS user for the shared-host tests (the test-bed's ``sbxtest``).

The tests run as root; ``as_other(...)`` runs a command as that user (``runuser``), so what it
plants is really owned by another uid, and ``shared_tmp`` is a 1777 directory like ``/tmp`` or
``/scratch`` that both can write. Without the user (or without root) the tests are skipped,
and failed under ``CI=true`` (tests/components.py: ``need``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.components import need

OTHER = os.environ.get("SCALEBOX_TEST_OTHER_USER", "sbxtest")


def other_uid() -> int:
    """The other user's uid; skips (fails under CI) when it cannot be used."""
    if os.geteuid() != 0:
        need(f"user {OTHER}", "the two-user tests run as root (to act as another user with runuser)")
    if shutil.which("runuser") is None:
        need(f"user {OTHER}", "runuser is not installed")
    try:
        return pwd.getpwnam(OTHER).pw_uid
    except KeyError:
        need(f"user {OTHER}", f"no such user (`useradd -m {OTHER}`; the test-bed creates it)")
        raise  # unreachable: need() skips or fails


def as_other(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the other user (no shell)."""
    other_uid()
    return subprocess.run(["runuser", "-u", OTHER, "--", *argv], capture_output=True, text=True, timeout=60,
                          check=check)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A fresh mode-1777 dir in /tmp that the other user can write (pytest's tmp_path is root's, 0700)."""
    other_uid()
    path = Path(tempfile.mkdtemp(prefix="sbx-shared-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

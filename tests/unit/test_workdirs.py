"""The app's work dir is claimed by many launchers at once (stage jobs on a shared work root)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from scalebox_hpc.errors import SlotError
from scalebox_hpc.launcher.workdirs import APP_MARKER, app_dir, claim_app_dir

UID = "52d1cdfc-9105-4d63-843a-26d937c38795"


def test_launchers_starting_together_all_enter_the_app_dir(tmp_path: Path) -> None:
    """Before: one launcher read the marker while another was still writing it, took the dir
    for another app's and ended its slots (seen with two launchers of one test)."""
    for round_ in range(30):
        root = tmp_path / f"r{round_}"
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def claim(root: Path = root, errors: list[BaseException] = errors,
                  barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                claim_app_dir(root, 1, UID)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        path = app_dir(root, 1, UID)
        assert (path / APP_MARKER).read_text() == UID + "\n"
        assert sorted(p.name for p in path.iterdir()) == [APP_MARKER]  # no temporary file left


def test_a_dir_of_another_app_is_refused(tmp_path: Path) -> None:
    claim_app_dir(tmp_path, 1, UID)
    other = "52d1cdfc-9105-0000-0000-000000000000"  # the same dir name, another app
    with pytest.raises(SlotError, match="belongs to app"):
        claim_app_dir(tmp_path, 1, other)

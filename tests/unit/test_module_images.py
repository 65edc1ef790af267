"""The standard modules' images (containers/list-dir, containers/file-copy), the rootfs they are
built from, and examples/app-copy's container variant (``-e containers``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.runtime.images import find_definition, rootfs_args

REPO = Path(__file__).resolve().parents[2]


def test_standard_module_images_are_found_through_their_code_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCALEBOX_CONTAINERS", raising=False)
    spec = load_pipeline(REPO / "examples/app-copy/app.yaml", ["containers"], environ={})
    for m in spec.modules:
        assert m.base_image == m.name and m.volumes == ["/tmp/scalebox-app-copy"]
        for suffix in (".def", ".Dockerfile"):
            definition = find_definition(m.name, m.code_path, suffix)
            assert definition == REPO / "containers" / f"{m.name}{suffix}"
            assert rootfs_args(definition) == ["bash", "rsync", "ssh?"]
    bare = load_pipeline(REPO / "examples/app-copy/app.yaml", environ={})
    assert [(m.base_image, m.volumes) for m in bare.modules] == [(None, []), (None, [])]  # empty: bare


def test_rootfs_copies_programs_with_their_libraries(tmp_path: Path) -> None:
    bb = shutil.which("busybox")
    if bb is None or shutil.which("rsync") is None or subprocess.run(["ldd", bb], capture_output=True).returncode == 0:
        pytest.skip("needs a static busybox and rsync on PATH")
    root = tmp_path / "root"
    proc = subprocess.run(["sh", str(REPO / "containers" / "rootfs.sh"), str(root), "bash", "rsync",
                           "no-such-program?"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "no no-such-program on this host: left out" in proc.stderr
    rsync = shutil.which("rsync")
    assert rsync is not None and (root / rsync.lstrip("/")).is_file() and (root / "bin" / "bash").is_file()
    assert list(root.glob("lib*/**/libc.so.6"))  # with its libraries, ld.so included
    missing = subprocess.run(["sh", str(REPO / "containers" / "rootfs.sh"), str(tmp_path / "r2"),
                              "no-such-program"], capture_output=True, text=True, check=False)
    assert missing.returncode == 1 and "no no-such-program on this host's PATH" in missing.stderr

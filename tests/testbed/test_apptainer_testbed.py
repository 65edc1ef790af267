"""The Apptainer test-bed really works: build a tiny SIF offline and run it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.components import apptainer_available, apptainer_binary, need

pytestmark = pytest.mark.apptainer

# where launchers/testbed/apptainer.sh puts a static busybox when the machine's is dynamic
EXTRACTED_BUSYBOX = Path("/usr/local/lib/scalebox-testbed/busybox")


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP program header (statically linked)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # ELF64 only
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def static_busybox() -> Path | None:
    candidates = [os.environ.get("SCALEBOX_TEST_BUSYBOX"), shutil.which("busybox"), str(EXTRACTED_BUSYBOX)]
    for c in candidates:
        if c and is_static_elf(Path(c).resolve()):
            return Path(c).resolve()
    return None


@pytest.fixture
def apptainer() -> str:
    """The apptainer executable; every test here starts by requesting it."""
    reason = apptainer_available()
    if reason:
        need("apptainer", reason)
    exe = apptainer_binary()
    assert exe
    return exe


@pytest.fixture
def busybox_sif(apptainer: str, tmp_path: Path) -> Path:
    bb = static_busybox()
    if bb is None:
        need("apptainer", "no static busybox (launchers/testbed/apptainer.sh installs busybox-static)")
        raise AssertionError("unreachable")
    root = tmp_path / "rootfs"
    for d in ("bin", "tmp", "etc", "data"):
        (root / d).mkdir(parents=True)
    shutil.copy2(bb, root / "bin" / "busybox")
    for applet in ("sh", "echo", "cat", "env", "id"):
        (root / "bin" / applet).symlink_to("busybox")
    sif = tmp_path / "bb.sif"
    proc = subprocess.run(
        [apptainer, "-s", "build", str(sif), str(root)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, f"apptainer build failed:\n{proc.stdout}\n{proc.stderr}"
    assert sif.stat().st_size > 0
    return sif


def test_exec_with_bind_and_env(apptainer: str, busybox_sif: Path, tmp_path: Path) -> None:
    data = tmp_path / "host-data"
    data.mkdir()
    (data / "in.txt").write_text("payload\n")
    script = 'echo "$SBX_GREETING $(cat /data/in.txt) uid=$(id -u)"; echo out > /data/out.txt'
    proc = subprocess.run(
        [
            apptainer, "-s", "exec", "--bind", f"{data}:/data", "--env", "SBX_GREETING=hello",
            str(busybox_sif), "sh", "-c", script,
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"hello payload uid={os.getuid()}"
    # the bind mount is writable: the container's write is visible on the host
    assert (data / "out.txt").read_text() == "out\n"


def test_exec_propagates_exit_code(apptainer: str, busybox_sif: Path) -> None:
    proc = subprocess.run(
        [apptainer, "-s", "exec", str(busybox_sif), "sh", "-c", "exit 7"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 7, proc.stderr

"""The spython adapter against the real Apptainer: version, a build from a tiny .def (offline, from
a rootfs made by containers/rootfs.sh), inspect of the SIF it made, and the failures a user sees
(a broken definition, a file that is no image, a registry that does not answer)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from scalebox_hpc.errors import ContainerError
from scalebox_hpc.runtime.images import SifCache
from scalebox_hpc.runtime.spython_adapter import SpythonApptainer
from tests.components import apptainer_available, apptainer_binary, need

pytestmark = [pytest.mark.apptainer]

REPO = Path(__file__).resolve().parents[2]
TINY_DEF = """\
Bootstrap: localimage
From: rootfs

%labels
    org.scalebox.test tiny

%runscript
    exec /bin/sh -c 'echo tiny'
"""


@pytest.fixture(scope="module")
def exe() -> str:
    reason = apptainer_available()
    if reason:
        need("apptainer", reason)
    found = apptainer_binary()
    assert found is not None
    return found


@pytest.fixture(scope="module")
def context(exe: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build dir with tiny.def and a busybox rootfs (no registry)."""
    ctx = tmp_path_factory.mktemp("tiny")
    (ctx / "tiny.def").write_text(TINY_DEF)
    subprocess.run(["sh", str(REPO / "containers" / "rootfs.sh"), str(ctx / "rootfs")], check=True,
                   capture_output=True, timeout=120)
    return ctx


@pytest.fixture(scope="module")
def tiny_sif(exe: str, context: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sif") / "tiny.sif"
    SpythonApptainer(exe).build(out, "tiny.def", cwd=context, fakeroot=False)
    return out


def test_version_is_apptainers(exe: str) -> None:
    expected = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    assert SpythonApptainer(exe).version() == expected
    assert expected.startswith("apptainer version ")


def test_build_from_a_def_then_inspect_it(exe: str, tiny_sif: Path) -> None:
    assert tiny_sif.is_file() and tiny_sif.stat().st_size > 0
    info = SpythonApptainer(exe).inspect(tiny_sif)
    assert info.labels["org.scalebox.test"] == "tiny"
    assert "From: rootfs" in info.deffile
    assert "echo tiny" in info.runscript
    ran = subprocess.run([exe, "-s", "run", str(tiny_sif)], capture_output=True, text=True, timeout=60, check=False)
    assert ran.stdout.strip() == "tiny"


def test_build_output_is_not_printed_on_our_stdout(exe: str, context: Path, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """spython's build leaves the child's stdout on ours; the adapter captures it (a doctor probe
    prints its JSON report there)."""
    noisy = context / "noisy.def"
    noisy.write_text(TINY_DEF.replace("%runscript", "%setup\n    echo SETUP-SAYS-HELLO\n\n%runscript"))
    SpythonApptainer(exe).build(tmp_path / "noisy.sif", "noisy.def", cwd=context)
    out, _ = capfd.readouterr()
    assert "SETUP-SAYS-HELLO" not in out


def test_a_broken_definition_is_one_line_with_apptainers_reason(exe: str, tmp_path: Path) -> None:
    (tmp_path / "broken.def").write_text("Bootstrap: localimage\nFrom: no-such-rootfs\n")
    with pytest.raises(ContainerError) as err:
        SpythonApptainer(exe).build(tmp_path / "b.sif", "broken.def", cwd=tmp_path)
    text = str(err.value)
    assert text.startswith("apptainer build of broken.def failed (exit 255): ") and "no-such-rootfs" in text
    assert "\n" not in text and err.value.hint
    assert not (tmp_path / "b.sif").exists()


def test_inspect_of_a_file_that_is_no_image(exe: str, tmp_path: Path) -> None:
    junk = tmp_path / "junk.sif"
    junk.write_bytes(b"not an image")
    with pytest.raises(ContainerError, match=r"apptainer inspect of .*junk.sif failed: exit \d+: "):
        SpythonApptainer(exe).inspect(junk)


def test_a_pull_from_a_registry_that_does_not_answer(exe: str, tmp_path: Path) -> None:
    """A registry on a loopback port nobody listens on: the real pull path, no internet."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    uri = f"docker://127.0.0.1:{port}/nothing/here:1"
    with pytest.raises(ContainerError, match=rf"apptainer pull of {uri} failed \(exit \d+\): ") as err:
        SpythonApptainer(exe).pull(uri, tmp_path / "p.sif", timeout=120.0)
    assert "registry" in err.value.hint
    assert not (tmp_path / "p.sif").exists()


def test_the_sif_cache_builds_a_named_image_through_the_adapter(exe: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    containers = tmp_path / "containers"
    containers.mkdir()
    shutil.copy2(REPO / "containers" / "rootfs.sh", containers / "rootfs.sh")
    (containers / "tiny.def").write_text("# scalebox-rootfs:\n" + TINY_DEF)
    monkeypatch.setenv("SCALEBOX_CONTAINERS", str(containers))
    path, built = SifCache(exe, tmp_path / "cache").ensure("tiny")
    assert built and path.parent == tmp_path / "cache"
    assert SpythonApptainer(exe).inspect(path).labels["org.scalebox.test"] == "tiny"
    assert SifCache(exe, tmp_path / "cache").ensure("tiny") == (path, False)

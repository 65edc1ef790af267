"""The Apptainer adapter over spython: the command lines spython composes run as our argv (our
executable, the build's directory, a timeout), and every way spython or the command fails is a
one-line ContainerError with a hint. The real spython composes; a fake runner stands in for
Apptainer, a fake client for spython's own failures."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc.doctor import gather
from scalebox_hpc.doctor.result import Status
from scalebox_hpc.errors import ContainerError
from scalebox_hpc.runtime.images import SifCache
from scalebox_hpc.runtime.spython_adapter import (
    HINT_BUILD,
    HINT_PULL,
    HINT_SPYTHON,
    SpythonApptainer,
)
from scalebox_hpc.slurm.commands import CommandResult

EXE = "/opt/site/apptainer-1.4/bin/apptainer"


@dataclass
class FakeRunner:
    """Apptainer as a script: records each call, answers with ``code``/``stdout``/``stderr``,
    writes the image a successful build or pull names (the argument before the source)."""

    code: int = 0
    stdout: str = ""
    stderr: str = ""
    raises: BaseException | None = None
    writes: bool = True
    calls: list[tuple[list[str], Path | None, float]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], *, cwd: Path | None, timeout: float) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(argv), cwd, timeout))
        if self.raises is not None:
            raise self.raises
        if self.code == 0 and self.writes and ("build" in argv or "pull" in argv):
            out = argv[-2] if "build" in argv else argv[argv.index("--name") + 1]
            Path(out).write_bytes(b"SIF")
        return subprocess.CompletedProcess(list(argv), self.code, self.stdout, self.stderr)


def test_build_runs_spythons_command_line_with_our_executable_in_the_build_dir(tmp_path: Path) -> None:
    runner = FakeRunner()
    out = tmp_path / "img.sif"
    SpythonApptainer(EXE, runner=runner).build(out, "app.def", cwd=tmp_path, fakeroot=True, timeout=99.0)
    assert runner.calls == [([EXE, "-s", "build", "--force", "--fakeroot", str(out), "app.def"], tmp_path, 99.0)]


def test_pull_names_the_output_and_forces(tmp_path: Path) -> None:
    runner = FakeRunner()
    out = tmp_path / "x.sif"
    SpythonApptainer(EXE, runner=runner).pull("docker://busybox:1.36", out, timeout=5.0)
    assert runner.calls == [([EXE, "-s", "pull", "--name", str(out), "--force", "docker://busybox:1.36"], None, 5.0)]


def test_a_failed_build_says_why_in_one_line(tmp_path: Path) -> None:
    runner = FakeRunner(code=255, stderr="INFO: starting\nFATAL:   While performing build: no rootfs\n")
    with pytest.raises(ContainerError) as err:
        SpythonApptainer(EXE, runner=runner).build(tmp_path / "o.sif", "bad.def", cwd=tmp_path)
    assert str(err.value) == "apptainer build of bad.def failed (exit 255): INFO: starting | " \
                             "FATAL:   While performing build: no rootfs"
    assert err.value.hint == HINT_BUILD


@pytest.mark.parametrize(("raised", "text"), [
    (subprocess.TimeoutExpired(["apptainer"], 5.0), "no answer within 1800 s"),
    (FileNotFoundError(2, "No such file or directory"), f"{EXE} did not run: No such file or directory"),
])
def test_a_build_that_does_not_run_or_hangs_is_a_container_error(tmp_path: Path, raised: BaseException,
                                                                  text: str) -> None:
    with pytest.raises(ContainerError, match=text):
        SpythonApptainer(EXE, runner=FakeRunner(raises=raised)).build(tmp_path / "o.sif", "a.def")


def test_a_build_that_exits_0_without_an_image_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ContainerError, match=r"exited 0 but wrote no o\.sif"):
        SpythonApptainer(EXE, runner=FakeRunner(writes=False)).build(tmp_path / "o.sif", "a.def")


def test_a_failed_pull_has_the_registry_hint(tmp_path: Path) -> None:
    runner = FakeRunner(code=255, stderr="FATAL: dial tcp: lookup registry-1.docker.io: no such host")
    with pytest.raises(ContainerError, match=r"apptainer pull of docker://x failed \(exit 255\): FATAL: dial") as err:
        SpythonApptainer(EXE, runner=runner).pull("docker://x", tmp_path / "o.sif")
    assert err.value.hint == HINT_PULL


def test_an_archive_is_not_pulled(tmp_path: Path) -> None:
    runner = FakeRunner()
    with pytest.raises(ContainerError, match=r"cannot pull 'docker-archive:/x\.tar'"):
        SpythonApptainer(EXE, runner=runner).pull("docker-archive:/x.tar", tmp_path / "o.sif")
    assert runner.calls == []


def test_version_is_the_first_line_of_our_executable() -> None:
    runner = FakeRunner(stdout="apptainer version 1.4.5\n")
    assert SpythonApptainer(EXE, runner=runner).version() == "apptainer version 1.4.5"
    assert runner.calls[0][0] == [EXE, "--version"]
    with pytest.raises(ContainerError, match="printed nothing"):
        SpythonApptainer(EXE, runner=FakeRunner()).version()
    with pytest.raises(ContainerError, match=r"apptainer --version failed \(exit 1\): boom"):
        SpythonApptainer(EXE, runner=FakeRunner(code=1, stderr="boom")).version()


# -- spython's own failures, through a fake client --------------------------------------------------
class FakeClient:
    """A spython client that fails as spython does; it calls the hooks the adapter sets."""

    _init_command: Any
    _run_command: Any

    def __init__(self, *, exits: bool = False, inspect_answer: Any = None, inspect_raises: Exception | None = None,
                 sudo: bool = False) -> None:
        self.exits = exits
        self.inspect_answer = inspect_answer
        self.inspect_raises = inspect_raises
        self.sudo = sudo

    def build(self, recipe: str, image: str, **kw: Any) -> str | None:
        if self.exits:
            raise SystemExit(1)  # bot.exit("Cannot find ...")
        self._run_command([*self._init_command("build"), image, recipe], sudo=self.sudo, capture=False)
        return image

    def pull(self, image: str, name: str, **kw: Any) -> str:
        raise SystemExit(1)  # bot.exit("pull only valid for docker, oras, https, shub and library.")

    def inspect(self, image: str, **kw: Any) -> Any:
        if self.inspect_raises is not None:
            raise self.inspect_raises
        return self.inspect_answer


def adapter(client: FakeClient, runner: FakeRunner | None = None) -> SpythonApptainer:
    return SpythonApptainer(EXE, runner=runner or FakeRunner(), client_factory=lambda: client)


def test_spythons_sys_exit_is_a_container_error(tmp_path: Path) -> None:
    with pytest.raises(ContainerError, match=r"spython gave up \(exit 1\)") as err:
        adapter(FakeClient(exits=True)).build(tmp_path / "o.sif", "a.def")
    assert err.value.hint == HINT_SPYTHON
    with pytest.raises(ContainerError, match="apptainer pull of docker://x: spython gave up"):
        adapter(FakeClient()).pull("docker://x", tmp_path / "o.sif")


def test_a_request_for_sudo_is_refused_not_run(tmp_path: Path) -> None:
    runner = FakeRunner()
    with pytest.raises(ContainerError, match="refusing spython's request for sudo"):
        adapter(FakeClient(sudo=True), runner).build(tmp_path / "o.sif", "a.def")
    assert runner.calls == []


def test_the_fake_client_gets_our_command_line(tmp_path: Path) -> None:
    runner = FakeRunner()
    adapter(FakeClient(), runner).build(tmp_path / "o.sif", "a.def")
    assert runner.calls[0][0] == [EXE, "-s", "build", str(tmp_path / "o.sif"), "a.def"]


@pytest.mark.parametrize(("answer", "raises", "text"), [
    ({"message": ["FATAL:   could not open image /x.sif: no such file"], "return_code": 255}, None,
     "failed: exit 255: FATAL:   could not open image /x.sif: no such file"),
    ("not a dict", None, "failed: unexpected answer str"),
    (None, json.JSONDecodeError("Expecting value", "", 0), "unexpected answer .JSONDecodeError"),
    (None, KeyError("attributes"), "unexpected answer .KeyError"),
])
def test_inspect_failures_are_container_errors(answer: Any, raises: Exception | None, text: str) -> None:
    with pytest.raises(ContainerError, match=text):
        adapter(FakeClient(inspect_answer=answer, inspect_raises=raises)).inspect(Path("/x.sif"))


def test_inspect_answer_becomes_image_info() -> None:
    answer = {"attributes": {"labels": {"org.scalebox.image": "base", "n": 3}, "deffile": "Bootstrap: x",
                             "runscript": "#!/bin/sh"}}
    info = adapter(FakeClient(inspect_answer=answer)).inspect(Path("/x.sif"))
    assert info.labels == {"org.scalebox.image": "base", "n": "3"}
    assert (info.deffile, info.runscript) == ("Bootstrap: x", "#!/bin/sh")


def test_missing_spython_is_a_container_error(tmp_path: Path) -> None:
    def factory() -> Any:
        raise ModuleNotFoundError("No module named 'spython'")

    with pytest.raises(ContainerError, match="spython is not installed") as err:
        SpythonApptainer(EXE, runner=FakeRunner(), client_factory=factory).build(tmp_path / "o.sif", "a.def")
    assert "pip install" in err.value.hint


# -- the SIF cache: registry references are pulled, archives and definitions built ----------------
def test_the_cache_pulls_registry_references_and_builds_archives(tmp_path: Path) -> None:
    runner = FakeRunner()
    cache = SifCache(EXE, tmp_path / "cache", client=SpythonApptainer(EXE, runner=runner))
    pulled, built = cache.ensure("docker://busybox:1.36")
    assert built and pulled.read_bytes() == b"SIF"
    archive = tmp_path / "img.tar"
    archive.write_bytes(b"tar")
    cache.ensure(f"docker-archive:{archive}")
    assert [argv[2] for argv, _, _ in runner.calls] == ["pull", "build"]
    assert runner.calls[1][0][-1] == f"docker-archive:{archive}"


# -- doctor: the version through the same adapter ----------------------------------------------------
class DoctorRunner:
    def __init__(self, result: CommandResult) -> None:
        self.result = result
        self.argv: list[list[str]] = []

    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None) -> CommandResult:
        self.argv.append(list(argv))
        return self.result


def test_doctor_reads_the_apptainer_version_through_the_adapter() -> None:
    ok = DoctorRunner(CommandResult("apptainer version 1.4.5\n", "", 0))
    check = gather.engine("apptainer", ok, lambda name: EXE, needed=True)
    assert check.status == Status.PASS and "apptainer version 1.4.5" in check.summary
    assert ok.argv == [[EXE, "--version"]]
    bad = gather.engine("apptainer", DoctorRunner(CommandResult("", "FATAL: no config", 255)), lambda n: EXE,
                        needed=True)
    assert bad.status == Status.FAIL and "apptainer --version failed (exit 255): FATAL: no config" in bad.summary

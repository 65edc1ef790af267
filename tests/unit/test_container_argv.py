"""Container command lines, path/env translation, request quoting and runtime choice (no engine needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from scalebox_hpc.errors import ContainerError
from scalebox_hpc.launcher import taskexec
from scalebox_hpc.runtime.apptainer import ApptainerEngine
from scalebox_hpc.runtime.base import SessionSpec
from scalebox_hpc.runtime.choose import RuntimeChooser
from scalebox_hpc.runtime.container import CONTAINER_BIN, CONTAINER_PATH, Bind, HostDirs, PathMap, binds_for
from scalebox_hpc.runtime.images import SifCache, find_definition, rootfs_args
from scalebox_hpc.runtime.local import LocalRuntime
from scalebox_hpc.runtime.podman import EngineCli
from scalebox_hpc.runtime.warm import request_script, sh_quote

REPO = Path(__file__).resolve().parents[2]
BINDS = [Bind(Path("/h/work"), "/work"), Bind(Path("/h/code"), "/app/bin", read_only=True)]


def spec(tmp_path: Path, **kw: object) -> SessionSpec:
    base: dict[str, object] = {"name": "app-1.calc.h-slot0", "work_dir": tmp_path / "w", "private_dir": tmp_path / "p",
                               "code_path": tmp_path / "code"}
    base.update(kw)
    return SessionSpec(**base)  # type: ignore[arg-type]


def test_apptainer_argv() -> None:
    cmd, env = ApptainerEngine("/usr/bin/apptainer", SifCache("/usr/bin/apptainer", Path("/c"))).command(
        image="/c/x.sif", binds=BINDS, env={"A": "1", "B": "x,y", "C": "l1\nl2", "PATH": CONTAINER_PATH},
        cwd="/work", argv=["/app/bin/run.sh", "body", "{}"], name="n", options=["gpu", "containall"],
        host_env={"HOME": "/root", "APPTAINERENV_OLD": "x"},
    )
    assert cmd == [
        "/usr/bin/apptainer", "-s", "exec", "--cleanenv", "--no-eval", "--pwd", "/work",
        "--bind", "/h/work:/work", "--bind", "/h/code:/app/bin:ro", "--nv", "--containall",
        "--env", f"PATH={CONTAINER_PATH}", "--", "/c/x.sif", "/app/bin/run.sh", "body", "{}",
    ]
    # values travel in the client's environment: exact (--env parses CSV) and not in `ps`
    assert env == {"HOME": "/root", "APPTAINERENV_A": "1", "APPTAINERENV_B": "x,y", "APPTAINERENV_C": "l1\nl2"}


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_podman_and_docker_argv(engine: str) -> None:
    cmd, env = EngineCli(engine, f"/usr/bin/{engine}").command(
        image="localhost/x:1", binds=BINDS, env={"A": "x,y=z", "PATH": "/c/bin"}, cwd="/work",
        argv=["/app/bin/run.sh", "b"], name="sbx-n-1", options=[], host_env={"HOME": "/root", "PATH": "/host/bin"},
    )
    assert cmd == [
        f"/usr/bin/{engine}", "run", "--rm", "--init", "--name", "sbx-n-1", "--network", "host",
        "--security-opt", "label=disable", "-w", "/work", "-v", "/h/work:/work", "-v", "/h/code:/app/bin:ro",
        "-e", "A", "-e", "PATH=/c/bin", "--", "localhost/x:1", "/app/bin/run.sh", "b",
    ]
    assert env == {"HOME": "/root", "PATH": "/host/bin", "A": "x,y=z"}  # the value is not in the argv
    gpu, _ = EngineCli(engine, engine).command(image="i", binds=[], env={}, cwd="/work", argv=["x"], name="n",
                                               options=["gpu"], host_env={})
    assert (["--device", "nvidia.com/gpu=all"] if engine == "podman" else ["--gpus", "all"]) == gpu[-5:-3]


def test_docker_discard_stops_then_removes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **_: object) -> subprocess.CompletedProcess[bytes]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    EngineCli("docker", "docker").discard("n", 3.0)
    EngineCli("podman", "podman").discard("n", 3.0)
    assert calls == [["docker", "stop", "-t", "3", "n"], ["docker", "rm", "-f", "n"],
                     ["podman", "rm", "-f", "-t", "3", "n"]]


def test_podman_refuses_a_sif(tmp_path: Path) -> None:
    with pytest.raises(ContainerError, match="cannot run a SIF image"):
        EngineCli("podman", "podman").image_for(spec(tmp_path, image="/x/y.sif"))


def test_bind_paths_must_be_plain() -> None:
    with pytest.raises(ContainerError, match="must not contain"):
        Bind(Path("/a:b"), "/x").spec()


def test_standard_binds_and_volumes(tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    s = spec(tmp_path, volumes=[f"{tmp_path / 'vol'}:/v:ro", str(tmp_path / "vol")])
    binds = binds_for(s, HostDirs(local_dir=tmp_path / "local"))
    assert [(str(b.host), b.container, b.read_only) for b in binds] == [
        (str(tmp_path / "w"), "/work", False), (str(tmp_path / "p"), "/.scalebox/slot", False),
        (str(CONTAINER_BIN), "/.scalebox/bin", True), (str(tmp_path / "code"), "/app/bin", True),
        (str(tmp_path / "local"), "/local", False), (str(tmp_path / "vol"), "/v", True),
        (str(tmp_path / "vol"), str(tmp_path / "vol"), False),
    ]
    with pytest.raises(ContainerError, match="does not exist on this host"):
        binds_for(spec(tmp_path, volumes=["/no/such/dir:/x"]), HostDirs())
    with pytest.raises(ContainerError, match="is not"):
        binds_for(spec(tmp_path, volumes=["relative:/x"]), HostDirs())


def test_paths_and_env_are_translated_but_bodies_never() -> None:
    pm = PathMap(BINDS, Path("/h/code"))
    assert pm.argv(["bash", "/h/code/run.sh", "/h/code/run.sh", "/h/work/x"]) == [
        "bash", "/app/bin/run.sh", "/h/code/run.sh", "/h/work/x"]
    env = pm.env({"WORK_DIR": "/h/work", "F": "/h/work/a/b", "OTHER": "/elsewhere", "PATH": "/host/bin",
                  "HOME": "/root", "LD_PRELOAD": "x", "VIRTUAL_ENV": "/v", "BASH_FUNC_f%%": "()", "K": "v"})
    assert env == {"WORK_DIR": "/work", "F": "/work/a/b", "OTHER": "/elsewhere", "K": "v", "PATH": CONTAINER_PATH}
    assert pm.to_container("/h/workshop") is None


def test_request_script_passes_every_byte_verbatim(tmp_path: Path) -> None:
    tricky = "it's \"q\" $(id) `id` \\ $HOME\nline2 '' *"
    script = request_script(["printf", "%s\\n", tricky, "{}"], {"V": tricky, "bad-name": "x"}, str(tmp_path),
                            str(tmp_path / "out"), str(tmp_path / "err"))
    assert "bad-name" not in script
    (tmp_path / "req.sh").write_text(script + "")
    for sh in ("/bin/sh", "bash"):
        subprocess.run([sh, str(tmp_path / "req.sh")], check=True)
        assert (tmp_path / "out").read_text() == f"{tricky}\n{{}}\n"
    env_script = request_script(["sh", "-c", 'printf %s "$V"'], {"V": tricky}, "/", str(tmp_path / "o2"), "/dev/null")
    (tmp_path / "req2.sh").write_text(env_script)
    subprocess.run(["/bin/sh", str(tmp_path / "req2.sh")], check=True)
    assert (tmp_path / "o2").read_text() == tricky
    assert sh_quote("a'b") == "'a'\\''b'"


def which_only(*names: str):  # type: ignore[no-untyped-def]
    return lambda n: f"/usr/bin/{n}" if n in names else None


def test_runtime_choice(tmp_path: Path) -> None:
    chooser = RuntimeChooser("auto", which=which_only("podman", "docker"))
    assert chooser.pick(spec(tmp_path)) == "local"  # no image: bare process
    assert chooser.pick(spec(tmp_path, image="x")) == "podman"  # auto: the first installed engine
    assert chooser.pick(spec(tmp_path, image="x", runtime="docker")) == "docker"
    assert chooser.pick(spec(tmp_path, image="x", runtime="local")) == "local"
    assert RuntimeChooser("local").pick(spec(tmp_path, image="x")) == "local"  # the host's default
    assert isinstance(chooser.open(spec(tmp_path, image="x", runtime="LOCAL")), LocalRuntime)
    with pytest.raises(ContainerError, match="unknown runtime 'lxc'"):
        chooser.pick(spec(tmp_path, image="x", runtime="lxc"))
    with pytest.raises(ContainerError, match="none of apptainer, podman, docker is installed"):
        RuntimeChooser(which=which_only()).pick(spec(tmp_path, image="x"))
    with pytest.raises(ContainerError, match="'apptainer' is not installed on this host"):
        chooser.open(spec(tmp_path, image="x", runtime="apptainer"))
    with pytest.raises(ContainerError, match="needs a base_image"):
        chooser.open(spec(tmp_path, runtime="podman"))
    with pytest.raises(ContainerError, match="SCALEBOX_RUNTIME"):
        RuntimeChooser("lxc")


def test_definitions_are_found_above_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCALEBOX_CONTAINERS", raising=False)
    assert find_definition("app-primes", REPO / "examples" / "app-primes" / "calc", ".def") == \
        REPO / "containers" / "app-primes.def"
    # the package's own containers/ is the last place looked in, from anywhere
    assert find_definition("app-primes", tmp_path, ".def") == REPO / "containers" / "app-primes.def"
    assert find_definition("no-such-image", tmp_path, ".def") is None
    assert find_definition("../etc/passwd", REPO, ".def") is None
    assert rootfs_args(REPO / "containers" / "app-primes.def") == ["bash"]
    assert rootfs_args(REPO / "containers" / "scalebox-base.Dockerfile") == []
    with pytest.raises(ContainerError, match="image 'nope' not found"):
        SifCache("apptainer", tmp_path).resolve("nope", tmp_path)


SHELLS = [s for s in ("/bin/sh", "dash", "bash") if shutil.which(s)] + (
    ["busybox"] if shutil.which("busybox") else [])


@pytest.mark.parametrize("shell", SHELLS)
def test_in_container_helpers_write_what_the_launcher_reads(shell: str, tmp_path: Path) -> None:
    """send-message / send-job-message / scalebox in plain POSIX sh: every byte survives."""
    emit = tmp_path / "emit.jsonl"
    argv0 = [shell, "sh"] if shell == "busybox" else [shell]
    env = {"SCALEBOX_EMIT_FILE": str(emit), "PATH": "/usr/bin:/bin"}
    body = 'he said "hi" \\n $(ls) `x`\nline2\ttab ünï \x01\x1b'

    def run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*argv0, str(CONTAINER_BIN / name), *args], env=env, capture_output=True, text=True,
                              check=False)

    assert run("send-message", body, '{"k": [1, 2]}').returncode == 0
    assert run("send-job-message", "gather", "x,1").returncode == 0
    assert run("scalebox", "task", "add", "-m", "calc", "-H", 'a=b"c', "-H", "n=1", "--", "b1", "-b2").returncode == 0
    assert run("scalebox", "app", "set-finished", "--job-id", "7", "Result is 1229").returncode == 0
    bad = run("scalebox", "task", "list")
    assert bad.returncode == 2 and "only 'task add', 'app set-finished', semaphores and variables" in bad.stderr
    report = taskexec.collect(tmp_path, emit, ["calc", "gather"])
    assert report.problems == []
    got = [(m.module, m.body, m.headers) for m in report.messages]
    assert got == [(None, body, {"k": [1, 2]}), ("gather", "x,1", {}),
                   ("calc", "b1", {"a": 'b"c', "n": "1"}), ("calc", "-b2", {"a": 'b"c', "n": "1"})]
    assert report.finish_text == "Result is 1229"


def test_pipeline_checks_the_runtime_name(tmp_path: Path) -> None:
    from scalebox_hpc.errors import PipelineError
    from scalebox_hpc.pipeline import load_pipeline
    from tests.helpers import write_app

    ok = load_pipeline(write_app(tmp_path / "ok", "name: x\nmodules:\n  a:\n    base_image: app-primes\n"
                                 "    arguments: {runtime: Podman}\n", {"a/run.sh": "true\n"}))
    assert ok.modules[0].arguments.runtime == "podman"
    with pytest.raises(PipelineError, match="runtime"):
        load_pipeline(write_app(tmp_path / "bad", "name: x\nmodules:\n  a:\n    arguments: {runtime: lxc}\n",
                                {"a/run.sh": "true\n"}))

"""Paths a containerised run reports (``/local/...``, ``/work/...``, relative) map back to host
paths before the scratch index sees them; containers see the launcher's scratch at ``/local``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from scalebox_hpc.launcher import scratch, taskexec
from scalebox_hpc.launcher.slot import Slot, SlotContext, SlotControl
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import TaskResult
from scalebox_hpc.node import make_runtime
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.base import SessionSpec
from scalebox_hpc.runtime.choose import RuntimeChooser
from scalebox_hpc.runtime.container import Bind, HostDirs, PathMap, PerTaskSession, binds_for
from scalebox_hpc.runtime.local import LocalRuntime
from scalebox_hpc.runtime.podman import EngineCli
from scalebox_hpc.settings import Settings
from scalebox_hpc.testing import InMemoryQueue

BINDS = [Bind(Path("/h/work"), "/work"), Bind(Path("/h/scratch/n1"), "/local"),
         Bind(Path("/h/scratch/n1/big"), "/big"), Bind(Path("/h/code"), "/app/bin", read_only=True)]


def test_container_paths_map_back_to_the_host() -> None:
    pm = PathMap(BINDS, Path("/h/code"))
    assert pm.to_host("/local/out/x.dat") == "/h/scratch/n1/out/x.dat"
    assert pm.to_host("/local") == "/h/scratch/n1"
    assert pm.to_host("/local/") == "/h/scratch/n1"
    assert pm.to_host("/work/a b/c") == "/h/work/a b/c"
    assert pm.to_host("/big/f") == "/h/scratch/n1/big/f"
    assert pm.to_host("/work/../local/x") == "/h/scratch/n1/x"  # normalised inside first
    assert pm.to_host("/local/../etc/passwd") is None  # /etc is the container's own
    assert pm.to_host("/localx/y") is None
    assert pm.to_host("/tmp/x") is None
    assert pm.to_host("relative") is None
    for host in ("/h/scratch/n1/out/x.dat", "/h/work/q", "/h/scratch/n1/big/f"):  # a round trip
        inside = pm.to_container(host)
        assert inside is not None and pm.to_host(inside) == host


def session(tmp_path: Path, scratch: Path) -> PerTaskSession:
    spec = SessionSpec(name="app-1.m.h-slot0", work_dir=tmp_path / "w", private_dir=tmp_path / "p",
                       code_path=tmp_path / "code", image="img")
    binds = binds_for(spec, HostDirs(local_dir=scratch))
    return PerTaskSession(EngineCli("podman", "podman"), spec, "img", binds, {})


def test_the_scratch_is_local_inside(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch" / "n1"
    s = session(tmp_path, scratch)
    assert scratch.is_dir()  # made for the bind
    assert s.paths.env({"LOCAL_SCRATCH": str(scratch), "WORK_DIR": str(tmp_path / "w")})["LOCAL_SCRATCH"] == "/local"
    assert s.host_path("/local/a") == str(scratch / "a")
    assert s.host_path("out/x") == "out/x"  # relative to the work dir on both sides
    assert s.host_path("/opt/x") is None
    assert LocalRuntime().host_path("/local/a") == "/local/a"  # bare: host paths as they are


def test_the_launchers_scratch_is_the_containers_local(tmp_path: Path) -> None:
    elsewhere = Settings.from_environ({"SCALEBOX_LOCAL_DIR": "/elsewhere"})
    runtime = make_runtime(elsewhere, local_scratch=tmp_path / "scratch")
    assert isinstance(runtime, RuntimeChooser) and runtime.host.local_dir == tmp_path / "scratch"
    fallback = make_runtime(elsewhere)
    assert isinstance(fallback, RuntimeChooser) and fallback.host.local_dir == Path("/elsewhere")


def test_a_container_runs_reported_paths_are_indexed_as_host_keys(tmp_path: Path) -> None:
    scratch, work = tmp_path / "scratch", tmp_path / "w"
    (tmp_path / "code").mkdir()
    spec = ModuleSpec.model_validate({"name": "m", "code_path": str(tmp_path / "code"), "base_image": "img"})
    queue = InMemoryQueue()
    app = queue.create_app({"name": "t", "modules": {"m": {}}})
    refs = queue.modules(app)
    ctx = SlotContext(app_id=app, module=spec, ref=refs["m"], modules=refs, host="n1", seq=0, work_dir=work,
                      runtime=LocalRuntime(), wakeups=Wakeups(), control=SlotControl(), base_env={},
                      scratch=scratch)
    queue.index_scratch("n1", [("old/y.dat", 3), ("kept", 1)], [])
    slot = Slot(ctx, queue)
    slot.session = session(tmp_path, scratch)
    (scratch / "out").mkdir(parents=True)
    (scratch / "out" / "x.dat").write_bytes(b"x" * 7)
    now = datetime.now(UTC)
    result = TaskResult(status=0, started_at=now, finished_at=now,
                        output_files=["/local/out/x.dat", "/work/not-scratch", "/tmp/only-inside", "rel"],
                        removed_files=["/local/old/y.dat", str(scratch / "host-path-unmapped")])
    slot._index_outputs(result)
    # the host path of the scratch means nothing inside a container: not mapped, not indexed
    assert queue.scratch("n1") == {"kept": 1, "out/x.dat": 7}
    assert queue.calls["index_scratch"] == 2  # one call for the run


def test_sizes_of_container_paths_are_read_on_the_host(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    s = session(tmp_path, scratch)
    (scratch / "o.dat").write_bytes(b"o" * 5)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "i.dat").write_bytes(b"i" * 3)
    (tmp_path / "w" / "task-exec.json").write_text(json.dumps(
        {"inputFiles": ["/work/i.dat"], "outputFiles": ["/local/o.dat", "/tmp/gone"]}))
    report = taskexec.collect(tmp_path / "w", tmp_path / "none", [], host_path=s.host_path)
    assert (report.input_bytes, report.output_bytes) == (3, 5)
    assert report.output_files == ["/local/o.dat", "/tmp/gone"]  # recorded as the run wrote them


def test_each_key_once(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a").write_bytes(b"aa")
    listed = [str(tmp_path / "s" / "a"), str(tmp_path / "s" / "." / "a"), "../s/a", str(tmp_path / "elsewhere")]
    assert scratch.keys(listed, tmp_path / "s", tmp_path / "w") == [("a", 2)]


"""Container runtimes against real Apptainer / Podman, a real PostgreSQL and real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.launcher.launcher import LauncherConfig
from scalebox_hpc.models import Message
from scalebox_hpc.node import run_launcher
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.runtime.images import SifCache
from tests.components import apptainer_available, need, podman_available
from tests.helpers import wait_until, write_app

pytestmark = [pytest.mark.pg, pytest.mark.apptainer]

REPO = Path(__file__).resolve().parents[2]
PRIMES = REPO / "examples" / "app-primes"
FAST = "max_idle_polls: 3, sleep_interval_seconds: 0.2, heartbeat_seconds: 1"


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SIF cache for the session: each image is built once."""
    return tmp_path_factory.mktemp("sif-cache")


@pytest.fixture
def apptainer(monkeypatch: pytest.MonkeyPatch, image_cache: Path, tmp_path: Path) -> None:
    reason = apptainer_available()
    if reason:
        need("apptainer", reason)
    monkeypatch.setenv("SCALEBOX_SIF_CACHE", str(image_cache))
    monkeypatch.setenv("SCALEBOX_CONTAINERS", str(REPO / "containers"))
    monkeypatch.setenv("SCALEBOX_LOCAL_DIR", str(tmp_path / "local"))
    monkeypatch.delenv("SCALEBOX_RUNTIME", raising=False)


@pytest.fixture
def podman(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reason = podman_available()
    if reason:
        need("podman", reason)
    monkeypatch.setenv("SCALEBOX_CONTAINERS", str(REPO / "containers"))
    monkeypatch.setenv("SCALEBOX_LOCAL_DIR", str(tmp_path / "local"))


def create(pg_dsn: str, app_yaml: Path) -> int:
    with connect(pg_dsn) as conn:
        return apps.create_app(conn, load_pipeline(app_yaml))


def launch(pg_dsn: str, app_id: int, work: Path, **kw: Any) -> None:
    run_launcher(pg_dsn, LauncherConfig(app_id=app_id, host="testhost", work_root=work, local=True, **kw))


def app_row(pg_dsn: str, app_id: int) -> dict[str, Any]:
    with connect(pg_dsn) as conn:
        return dict(apps.get_app(conn, app_id))


def slots(pg_dsn: str, app_id: int) -> list[dict[str, Any]]:
    with connect(pg_dsn) as conn:
        return [dict(r) for r in conn.execute(
            "SELECT s.* FROM sbx_slots s JOIN sbx_modules m ON m.id = s.module_id WHERE m.app_id = %s ORDER BY s.id",
            (app_id,)).fetchall()]


def tasks(pg_dsn: str, app_id: int) -> list[dict[str, Any]]:
    with connect(pg_dsn) as conn:
        return apps.list_tasks(conn, app_id, limit=1000)


def primes_app(root: Path, options: str = "") -> Path:
    """app-primes unchanged (its own scripts), every module in the app-primes image; no runtime
    key: the host's default (SCALEBOX_RUNTIME) picks the engine, so one file serves every site."""
    root.mkdir(parents=True, exist_ok=True)
    extra = "max_idle_polls: 10, sleep_interval_seconds: 0.2"
    if options:
        extra += f", slot_options: [{options}]"
    env = "environments: [NUM_GROUPS=10, LENGTH=1000]"
    (root / "app.yaml").write_text(textwrap.dedent(f"""
        name: app-primes-containers
        modules:
          scatter:
            code_path: {PRIMES / 'scatter'}
            base_image: app-primes
            sink_modules: [calc]
            parameters: {{start_task: start}}
            {env}
            arguments: {{{extra}}}
          calc:
            code_path: {PRIMES / 'calc'}
            base_image: app-primes
            sink_modules: [gather]
            slots: [".*:2"]
            {env}
            arguments: {{{extra}}}
          gather:
            code_path: {PRIMES / 'gather'}
            base_image: app-primes
            schedule_mode: HEAD
            {env}
            arguments: {{{extra}}}
    """))
    return root / "app.yaml"


def assert_primes(pg_dsn: str, app_id: int, work: Path) -> None:
    row = app_row(pg_dsn, app_id)
    assert (row["status"], row["result"]) == ("FINISHED", "Result is 1229"), row
    assert all(t["status"] == 0 for t in tasks(pg_dsn, app_id))
    assert len(tasks(pg_dsn, app_id)) == 1 + 10 + 10


def leftovers(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if any(marker in a for a in p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


# -- app-primes in containers -----------------------------------------------------------------------
def test_app_primes_in_warm_apptainer_slots(apptainer: None, pg_dsn: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEBOX_RUNTIME", "apptainer")
    app_id = create(pg_dsn, primes_app(tmp_path / "app"))
    launch(pg_dsn, app_id, tmp_path / "work")
    assert_primes(pg_dsn, app_id, tmp_path / "work")
    # each of the 4 slots ran one warm container (its agent's FIFOs were made and removed)
    logs = list((tmp_path / "work").rglob("container.err"))
    assert len(logs) == 4
    assert not list((tmp_path / "work").rglob("agent.in"))


def test_app_primes_with_a_container_per_task(apptainer: None, pg_dsn: str, tmp_path: Path) -> None:
    # SCALEBOX_RUNTIME unset: auto picks Apptainer when it is installed
    app_id = create(pg_dsn, primes_app(tmp_path / "app", "container_per_task"))
    launch(pg_dsn, app_id, tmp_path / "work")
    assert_primes(pg_dsn, app_id, tmp_path / "work")
    assert not list((tmp_path / "work").rglob("container.err"))


@pytest.mark.podman
@pytest.mark.parametrize("options", ["", "container_per_task"])
def test_app_primes_under_podman(podman: None, pg_dsn: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch, options: str) -> None:
    monkeypatch.setenv("SCALEBOX_RUNTIME", "podman")  # the same pipeline file as the Apptainer tests
    app_id = create(pg_dsn, primes_app(tmp_path / "app", options))
    launch(pg_dsn, app_id, tmp_path / "work")
    assert_primes(pg_dsn, app_id, tmp_path / "work")
    names = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True,
                           check=True).stdout
    assert f"app-{app_id}.calc" not in names  # every slot container was removed


def test_hello_scalebox_in_its_image(apptainer: None, pg_dsn: str, tmp_path: Path) -> None:
    hello = REPO / "examples" / "hello-scalebox"
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "app.yaml").write_text(textwrap.dedent(f"""
        name: hello-in-a-container
        parameters: {{start_task: scalebox}}
        modules:
          hello:
            code_path: {hello / 'hello'}
            base_image: hello-scalebox
            arguments: {{runtime: apptainer, slot_options: [container_per_task], {FAST}}}
    """))
    app_id = create(pg_dsn, tmp_path / "app" / "app.yaml")
    launch(pg_dsn, app_id, tmp_path / "work")
    assert app_row(pg_dsn, app_id)["result"] == "Hello scalebox, it is OK!"


# -- examples/app-copy with the standard modules in their images ------------------------------------
def run_app_copy_in_containers(cli_env: dict[str, str], tmp_path: Path, runtime: str, sif_cache: Path) -> None:
    """`scalebox run -e containers examples/app-copy/app.yaml`: list-dir and file-copy each in its
    image, found through code_path (scalebox:NAME → the repository's containers/), built offline."""
    root = tmp_path / "copy"
    source, target = root / "source", root / "target tree"
    names = [f"f{i:02d}.bin" for i in range(6)] + [f"a/b{i}.txt" for i in range(3)] + \
        ["a/c/deep 0.dat", "with space & 'quote'.txt", "-dash.txt"]
    for i, name in enumerate(names):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(os.urandom(i * 997))
    env = dict(cli_env, SCALEBOX_RUNTIME=runtime, SCALEBOX_SIF_CACHE=str(sif_cache), SOURCE_URL=str(source),
               TARGET_URL=str(target), COPY_VOLUME=str(root), START_DIR=".", REGEX_FILTER="", CHECKSUM="yes")
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "run", "--quiet", "-e", "containers",
                           str(REPO / "examples" / "app-copy" / "app.yaml")],
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copied = {str(p.relative_to(target)): p.stat().st_size for p in target.rglob("*") if p.is_file()}
    assert copied == {name: (source / name).stat().st_size for name in names}
    assert all((target / n).read_bytes() == (source / n).read_bytes() for n in names)
    # the copies were made in containers: each slot's warm container logged its start
    assert len(list((tmp_path / "work").rglob("container.err"))) == 1 + 4


def test_app_copy_in_apptainer_images(apptainer: None, cli_env: dict[str, str], tmp_path: Path,
                                      image_cache: Path) -> None:
    run_app_copy_in_containers(cli_env, tmp_path, "apptainer", image_cache)


@pytest.mark.podman
def test_app_copy_in_podman_images(podman: None, cli_env: dict[str, str], tmp_path: Path,
                                   image_cache: Path) -> None:
    run_app_copy_in_containers(cli_env, tmp_path, "podman", image_cache)


# -- the scratch at /local: what a containerised task reports is indexed by its host path -----------
WRITE_SCRATCH = r"""#!/bin/sh
set -e
echo "LOCAL_SCRATCH=$LOCAL_SCRATCH"
mkdir -p /local/out "$LOCAL_SCRATCH/out/sub dir"
printf 0123456789 > /local/out/x.dat
printf yz > "$LOCAL_SCRATCH/out/sub dir/y z.dat"
echo w > in-work.dat
printf '%s\n' /local/out/x.dat "$LOCAL_SCRATCH/out/sub dir/y z.dat" /work/../local/out/x.dat in-work.dat \
  /tmp/inside-only > output-files.txt
"""
REMOVE_SCRATCH = r"""#!/bin/sh
set -e
rm /local/out/x.dat
echo /local/out/x.dat > removed-files.txt
"""


def scratch_keys(pg_dsn: str) -> dict[str, int]:
    with connect(pg_dsn) as conn:
        rows = conn.execute("SELECT key, bytes FROM sbx_scratch WHERE host = 'testhost'").fetchall()
    return {r["key"]: r["bytes"] for r in rows}


def scratch_round_trip(pg_dsn: str, tmp_path: Path, runtime: str) -> None:
    """Two containerised tasks, one launcher each: the first writes /local/out/x.dat (and lists it
    in output-files.txt), the second removes it (removed-files.txt)."""
    scratch = tmp_path / "scratch" / "testhost"
    ids = []
    for name, script in (("write", WRITE_SCRATCH), ("remove", REMOVE_SCRATCH)):
        app = write_app(tmp_path / name, f"""
            name: scratch-{name}
            parameters: {{start_task: go}}
            modules:
              m:
                base_image: scalebox-base
                arguments: {{runtime: {runtime}, {FAST}}}
        """, {})
        (tmp_path / name / "m").mkdir()
        (tmp_path / name / "m" / "run.sh").write_text(script)  # busybox sh: the image has no bash
        (tmp_path / name / "m" / "run.sh").chmod(0o755)
        ids.append(app_id := create(pg_dsn, app))
        launch(pg_dsn, app_id, tmp_path / "work", local_scratch=scratch)
        assert [t["status"] for t in tasks(pg_dsn, app_id)] == [0], tasks(pg_dsn, app_id)
        if name == "write":
            # indexed from output-files.txt after the run (the start-up scan found an empty scratch)
            assert scratch_keys(pg_dsn) == {"out/x.dat": 10, "out/sub dir/y z.dat": 2}
            assert (scratch / "out" / "x.dat").read_text() == "0123456789"
            assert not (tmp_path / "local" / "out").exists()  # not SCALEBOX_LOCAL_DIR: the scratch
    assert scratch_keys(pg_dsn) == {"out/sub dir/y z.dat": 2}
    with connect(pg_dsn) as conn:
        [write] = apps.list_tasks(conn, ids[0])
        assert "LOCAL_SCRATCH=/local\n" in apps.get_task(conn, write["id"])["execs"][0]["stdout"]


def test_scratch_outputs_of_an_apptainer_task_are_indexed(apptainer: None, pg_dsn: str, tmp_path: Path) -> None:
    scratch_round_trip(pg_dsn, tmp_path, "apptainer")


@pytest.mark.podman
def test_scratch_outputs_of_a_podman_task_are_indexed(podman: None, pg_dsn: str, tmp_path: Path) -> None:
    scratch_round_trip(pg_dsn, tmp_path, "podman")


# -- mounts, environment, work dir, helpers --------------------------------------------------------
INSPECT = r"""#!/bin/sh
# runs inside the scalebox-base image: busybox only, no bash, no python, no database client
{
  echo "pwd=$(pwd)"
  echo "WORK_DIR=$WORK_DIR"
  echo "body=$1"
  echo "headers=$2"
  echo "tricky=$TRICKY"
  echo "local=$(cat /local/host-file)"
  echo "data=$(cat /data/data-file)"
  echo "vol=$(cat /vol/in/vol-file)"
  echo "app=$(ls /app/bin)"
  echo "python=$(command -v python3 || echo none)"
  echo "path=$PATH"
} > inspect.txt
echo marker > /local/written-inside
send-message "$1" '{"k":"v"}'
send-job-message sink "second $1"
scalebox task add -m sink -H a=b -- "third"
"""


def test_binds_env_and_work_dir_inside(apptainer: None, pg_dsn: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data, vol = tmp_path / "data", tmp_path / "vol"
    data.mkdir()
    vol.mkdir()
    (data / "data-file").write_text("from-data\n")
    (vol / "vol-file").write_text("from-volume\n")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "host-file").write_text("from-local\n")
    monkeypatch.setenv("SCALEBOX_DATA_ROOT", str(data))
    app = write_app(tmp_path / "app", f"""
        name: inspect
        modules:
          probe:
            base_image: scalebox-base
            volumes: ["{vol}:/vol/in:ro"]
            sink_modules: [sink]
            environments: ['TRICKY=a,b $HOME `x` "q"']
            arguments: {{runtime: apptainer, {FAST}}}
          sink:
            arguments: {{{FAST}}}
    """, {"sink/run.sh": "echo \"$1\" >> \"$WORK_DIR/../got\"\n"})
    (tmp_path / "app" / "probe").mkdir()
    (tmp_path / "app" / "probe" / "run.sh").write_text(INSPECT)
    (tmp_path / "app" / "probe" / "run.sh").chmod(0o755)
    app_id = create(pg_dsn, app)
    body = "it's \"quoted\" $(id) `id` \\n\nline2"
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "probe", [Message(body, headers={"x": 1})])
    launch(pg_dsn, app_id, tmp_path / "work")
    [inspect] = list((tmp_path / "work").rglob("inspect.txt"))
    text = inspect.read_text()
    assert "pwd=/work\n" in text and "WORK_DIR=/work\n" in text
    assert f"body={body}\n" in text
    assert json.loads(text.split("headers=")[1].splitlines()[0]) == {"x": 1}
    assert 'tricky=a,b $HOME `x` "q"\n' in text
    assert "local=from-local\n" in text and "data=from-data\n" in text and "vol=from-volume\n" in text
    assert "app=run.sh\n" in text and "python=none\n" in text
    assert "path=/.scalebox/bin:" in text
    assert (tmp_path / "local" / "written-inside").read_text() == "marker\n"
    by_module = {t["module"]: t for t in tasks(pg_dsn, app_id) if t["module"] == "sink"}
    assert by_module  # the sink got the messages, committed with the probe's result
    sink_bodies = sorted(t["body"] for t in tasks(pg_dsn, app_id) if t["module"] == "sink")
    assert sink_bodies == sorted([body, f"second {body}", "third"])
    assert all(t["status"] == 0 for t in tasks(pg_dsn, app_id))


# -- kills reach inside ----------------------------------------------------------------------------
@pytest.mark.parametrize("options", ["", "container_per_task"])
def test_timeout_inside_a_container_leaves_nothing(apptainer: None, pg_dsn: str, tmp_path: Path,
                                                   options: str) -> None:
    marker = f"{os.getpid() % 1000}{len(options)}7.25"
    app = write_app(tmp_path / "app", f"""
        name: timeout
        parameters: {{start_task: go}}
        modules:
          a:
            base_image: app-primes
            arguments: {{runtime: apptainer, task_max_seconds: 2, {FAST}, slot_options: [{options}]}}
    """, {"a/run.sh": f"sleep {marker} &\nsetsid sleep {marker} &\necho started\nsleep {marker}\n"})
    app_id = create(pg_dsn, app)
    launch(pg_dsn, app_id, tmp_path / "work")
    [task] = tasks(pg_dsn, app_id)
    assert task["status"] == 124
    time.sleep(0.3)
    assert leftovers(marker) == []


def test_cancel_inside_a_warm_container_leaves_nothing(apptainer: None, pg_dsn: str, tmp_path: Path) -> None:
    marker = f"{os.getpid() % 1000}3.5"
    app = write_app(tmp_path / "app", f"""
        name: cancel
        modules:
          a:
            base_image: app-primes
            arguments: {{runtime: apptainer, {FAST}}}
    """, {"a/run.sh": f"sleep {marker} &\ntouch \"$WORK_DIR/running\"\nsleep {marker}\n"})
    app_id = create(pg_dsn, app)
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message("t1"), Message("t2")])
    thread = threading.Thread(target=launch, args=(pg_dsn, app_id, tmp_path / "work"), daemon=True)
    thread.start()
    wait_until(lambda: bool(list((tmp_path / "work").rglob("running"))))
    assert leftovers(marker)
    with connect(pg_dsn) as conn:
        apps.cancel_app(conn, app_id)
    thread.join(30)
    assert not thread.is_alive()
    assert leftovers(marker) == []
    assert sorted(t["status"] for t in tasks(pg_dsn, app_id)) == [-1, -1]


@pytest.mark.podman
@pytest.mark.parametrize("options", ["", "container_per_task"])
def test_timeout_inside_a_podman_container_leaves_nothing(podman: None, pg_dsn: str, tmp_path: Path,
                                                          options: str) -> None:
    marker = f"{os.getpid() % 1000}{len(options)}9.5"
    app = write_app(tmp_path / "app", f"""
        name: timeout
        parameters: {{start_task: go}}
        modules:
          a:
            base_image: app-primes
            arguments: {{runtime: podman, task_max_seconds: 2, {FAST}, slot_options: [{options}]}}
    """, {"a/run.sh": f"sleep {marker} &\necho started\nsleep {marker}\n"})
    app_id = create(pg_dsn, app)
    launch(pg_dsn, app_id, tmp_path / "work")
    assert [t["status"] for t in tasks(pg_dsn, app_id)] == [124]
    time.sleep(0.3)
    assert leftovers(marker) == []
    names = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True,
                           check=True).stdout
    assert f"app-{app_id}.a." not in names


def test_drain_past_grace_kills_inside_and_releases(apptainer: None, pg_dsn: str, tmp_path: Path) -> None:
    marker = f"{os.getpid() % 1000}4.5"
    app = write_app(tmp_path / "app", f"""
        name: drain
        parameters: {{start_task: go}}
        modules:
          a:
            base_image: app-primes
            arguments: {{runtime: apptainer, {FAST}}}
    """, {"a/run.sh": f"touch \"$WORK_DIR/running\"\nsleep {marker}\n"})
    app_id = create(pg_dsn, app)
    running = lambda: bool(list((tmp_path / "work").rglob("running")))  # noqa: E731
    config = LauncherConfig(app_id=app_id, host="testhost", work_root=tmp_path / "work", local=True)
    t0 = time.monotonic()
    run_launcher(pg_dsn, config, grace=0.5, on_tick=running, tick_seconds=0.1)  # drains once the task runs
    assert time.monotonic() - t0 < 30
    assert leftovers(marker) == []
    assert [t["status"] for t in tasks(pg_dsn, app_id)] == [-1]  # released, the attempt not counted


ORPHAN = """
import sys, time
from pathlib import Path
from scalebox_hpc.runtime.base import SessionSpec
from scalebox_hpc.runtime.choose import RuntimeChooser
d = Path(sys.argv[2])
session = RuntimeChooser(sys.argv[1]).open(SessionSpec(
    name="orphan", work_dir=d / "w", private_dir=d / "p", code_path=d / "code", image="app-primes"))
print(session.agent.pid, flush=True)
time.sleep(120)
"""


def test_warm_container_ends_with_a_killed_launcher(apptainer: None, tmp_path: Path) -> None:
    """No leak when the launcher is SIGKILLed: the agent sees EOF on its request FIFO and exits."""
    for d in ("w", "p", "code"):
        (tmp_path / d).mkdir()
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN, "apptainer", str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout is not None
    agent = psutil.Process(int(proc.stdout.readline()))
    proc.kill()
    proc.wait()
    agent.wait(10)


# -- images and errors -----------------------------------------------------------------------------
CONCURRENT = """
import sys
from pathlib import Path
from scalebox_hpc.runtime.images import SifCache
path, built = SifCache(sys.argv[1], Path(sys.argv[2])).ensure(sys.argv[3])
print(f"{int(built)} {path}")
"""


def test_sif_cache_under_concurrent_first_use(apptainer: None, tmp_path: Path) -> None:
    exe = shutil.which("apptainer")
    assert exe
    cache = tmp_path / "cache"
    definition = REPO / "containers" / "scalebox-base.def"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, exe, str(cache), str(definition)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(5)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(out.split())
    assert sorted(int(built) for built, _ in results) == [0, 0, 0, 0, 1]  # one build, all succeed
    [path] = {path for _, path in results}
    assert Path(path).is_file() and Path(path).parent == cache
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [Path(path).name]
    proc = subprocess.run([exe, "-s", "exec", path, "/bin/sh", "-c", "echo ok"], capture_output=True, text=True,
                          check=False)
    assert proc.stdout == "ok\n"


@pytest.mark.podman
def test_docker_archive_is_converted_once(apptainer: None, podman: None, tmp_path: Path) -> None:
    """A `podman save` archive (no registry here) → one SIF in the cache, reused after."""
    tag = "localhost/scalebox-test/archive:1"
    base = subprocess.run(["sh", str(REPO / "containers" / "build.sh"), "podman", "scalebox-base"],
                          capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    subprocess.run(["podman", "tag", base, tag], check=True)
    archive = tmp_path / "img.tar"
    subprocess.run(["podman", "save", "-q", "--format", "docker-archive", "-o", str(archive), tag], check=True)
    exe = shutil.which("apptainer")
    assert exe
    cache = SifCache(exe, tmp_path / "cache")
    path, built = cache.ensure(f"docker-archive:{archive}")
    assert built and path.suffix == ".sif"
    assert cache.ensure(f"docker-archive:{archive}") == (path, False)
    proc = subprocess.run([exe, "-s", "exec", str(path), "/bin/sh", "-c", "echo ok"], capture_output=True, text=True,
                          check=False)
    assert proc.stdout == "ok\n"
    subprocess.run(["podman", "rmi", tag], capture_output=True, check=False)


@pytest.fixture
def slot_error(pg_dsn: str, tmp_path: Path) -> Iterator[Callable[[str, str], str]]:
    def run(image: str, runtime: str) -> str:
        app = write_app(tmp_path / "app", f"""
            name: broken
            parameters: {{start_task: go}}
            modules:
              a:
                base_image: {image}
                arguments: {{runtime: {runtime}, {FAST}}}
        """, {"a/run.sh": "true\n"})
        app_id = create(pg_dsn, app)
        t0 = time.monotonic()
        launch(pg_dsn, app_id, tmp_path / "work")
        assert time.monotonic() - t0 < 30
        [slot] = slots(pg_dsn, app_id)
        assert slot["status"] == "ERROR"
        assert [t["status"] for t in tasks(pg_dsn, app_id)] == [-1]  # nothing claimed
        return str(slot["message"])
    yield run


def test_missing_image_is_a_clear_slot_error(apptainer: None, slot_error: Callable[[str, str], str]) -> None:
    message = slot_error("/nonexistent/image.sif", "apptainer")
    assert message == "image '/nonexistent/image.sif' not found: /nonexistent/image.sif does not exist"
    message = slot_error("no-such-image", "apptainer")
    assert message.startswith("image 'no-such-image' not found: no containers/no-such-image.def")


def test_image_without_a_shell_is_a_clear_slot_error(apptainer: None, slot_error: Callable[[str, str], str],
                                                      tmp_path: Path) -> None:
    (tmp_path / "empty-rootfs").mkdir()
    message = slot_error(str(tmp_path / "empty-rootfs"), "apptainer")
    assert message.startswith("apptainer container for app-") and " did not start: " in message
    assert "/bin/sh" in message  # the engine's own reason


def test_missing_engine_is_a_clear_slot_error(pg_dsn: str, slot_error: Callable[[str, str], str],
                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    for tool in ("bash", "env", "true"):  # the launcher's own needs, without any engine
        (empty / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    monkeypatch.setenv("PATH", str(empty))
    message = slot_error("app-primes", "podman")
    assert message == "container runtime 'podman' is not installed on this host (no `podman` on PATH)"

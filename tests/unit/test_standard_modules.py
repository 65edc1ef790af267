"""The standard modules list-dir and file-copy (scalebox_hpc/modules), run directly: run.sh BODY
HEADERS_JSON in a temporary WORK_DIR with a fake send-message on PATH; local paths and a real
rsync daemon on 127.0.0.1. Also `code_path: scalebox:NAME` in pipeline files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scalebox_hpc.errors import PipelineError
from scalebox_hpc.launcher import taskexec
from scalebox_hpc.models import Message
from scalebox_hpc.pipeline import STANDARD_MODULES, load_pipeline
from tests.components import need
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
# newline-free names with spaces, quotes and shell metacharacters
TRICKY = [
    "plain.txt",
    "with space.txt",
    "sub dir/it's \"quoted\".dat",
    "sub dir/deep/$(touch PWNED) `touch PWNED2`.txt",
    "sub dir/deep/semi;colon&amp|pipe*?[x].dat",
    "-dash first.txt",
    "back\\slash $HOME ~.txt",
    "unicode é ü/ñ,{\"h\": 1}.txt",
    "control\rreturn\ttab \\#101 hash.txt",
    "  leading and trailing spaces  ",
    "ctl\x01 amp&amp; & ~ .txt",
]


SETTINGS = ("SOURCE_URL", "TARGET_URL", "CHECKSUM", "REGEX_FILTER", "SEND_MESSAGE", "RSYNC_OPTS", "RSYNC_RSH",
            "SINK_MODULE", "SCALEBOX_EMIT_FILE")


@pytest.fixture(autouse=True)
def _rsync() -> None:
    if shutil.which("rsync") is None:
        need("rsync", "not on PATH (launchers/testbed/rsync.sh install)")


@dataclass
class Result:
    code: int
    sent: list[str]
    stdout: str
    stderr: str
    exec_json: dict[str, object] | None


class Runner:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        (self.bin / "send-message").write_text('#!/bin/sh\nprintf \'%s\\n\' "$1" >> "$SENT_FILE"\n')
        (self.bin / "send-message").chmod(0o755)
        self.count = 0

    def __call__(self, module: str, body: str, **env: str) -> Result:
        self.count += 1
        work = self.tmp / f"work{self.count}"
        work.mkdir()
        sent = work.parent / f"sent{self.count}"
        full = {k: v for k, v in os.environ.items() if k not in SETTINGS}
        full.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", SENT_FILE=str(sent), WORK_DIR=str(work),
                    SINK_MODULE="next")
        full.update(env)
        proc = subprocess.run([str(STANDARD_MODULES / module / "run.sh"), body, "{}"], cwd=work, env=full,
                              capture_output=True, text=True, timeout=30, check=False)
        exec_file = work / "task-exec.json"
        messages = sent.read_bytes().decode().split("\n")[:-1] if sent.exists() else []
        batch = work / taskexec.SINK_TASKS
        if batch.exists():  # list-dir's batch: read and parsed as the launcher does
            for line in batch.read_text(encoding="utf-8", errors="replace").splitlines():
                message = taskexec.parse_sink_line(line, {"next", "other"})
                assert message.module == "next" and message.headers == {}
                messages.append(message.body)
        return Result(proc.returncode, messages, proc.stdout,
                      proc.stderr, json.loads(exec_file.read_text()) if exec_file.exists() else None)


@pytest.fixture
def run(tmp_path: Path) -> Runner:
    return Runner(tmp_path)


def make_tree(root: Path, names: list[str]) -> dict[str, int]:
    sizes = {}
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(range(256)) * (i + 1) + name.encode())
        sizes[name] = path.stat().st_size
    return sizes


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src dir"
    make_tree(root, TRICKY)
    (root / "empty").mkdir()
    return root


def test_packaged_scripts_are_executable_bash() -> None:
    for name in ("list-dir", "file-copy"):
        script = STANDARD_MODULES / name / "run.sh"
        assert os.access(script, os.X_OK)
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text and "eval" not in text
        subprocess.run(["bash", "-n", str(script)], check=True)


# -- list-dir ------------------------------------------------------------------------------------------
def test_list_dir_emits_every_file_verbatim(run: Runner, src: Path, tmp_path: Path) -> None:
    res = run("list-dir", ".", SOURCE_URL=str(src))
    assert res.code == 0, res.stderr
    assert sorted(res.sent) == sorted(TRICKY)
    assert not list(tmp_path.rglob("PWNED*"))


def test_list_dir_send_message_per_file(run: Runner, src: Path, tmp_path: Path) -> None:
    res = run("list-dir", "sub dir", SOURCE_URL=str(src), SEND_MESSAGE="yes")
    assert res.code == 0, res.stderr
    assert sorted(res.sent) == sorted(n for n in TRICKY if n.startswith("sub dir/"))
    assert not (tmp_path / f"work{run.count}" / taskexec.SINK_TASKS).exists()
    assert not list(tmp_path.rglob("PWNED*"))


def test_list_dir_sub_directory_and_filter(run: Runner, src: Path) -> None:
    res = run("list-dir", "sub dir/", SOURCE_URL=str(src) + "/")
    assert res.code == 0, res.stderr
    assert sorted(res.sent) == sorted(n for n in TRICKY if n.startswith("sub dir/"))
    res = run("list-dir", ".", SOURCE_URL=str(src), REGEX_FILTER=r"\.dat$")
    assert sorted(res.sent) == sorted(n for n in TRICKY if n.endswith(".dat"))
    res = run("list-dir", ".", SOURCE_URL=str(src), REGEX_FILTER="^sub dir/deep/")
    assert len(res.sent) == 2


def test_list_dir_empty_is_success_without_messages(run: Runner, src: Path) -> None:
    res = run("list-dir", "empty", SOURCE_URL=str(src))
    assert (res.code, res.sent) == (0, [])
    res = run("list-dir", ".", SOURCE_URL=str(src), REGEX_FILTER="no-such-name")
    assert (res.code, res.sent) == (0, [])


def test_list_dir_error_codes(run: Runner, src: Path) -> None:
    assert run("list-dir", "missing", SOURCE_URL=str(src)).code == 10
    assert run("list-dir", ".", SOURCE_URL=str(src / "nope")).code == 10
    assert run("list-dir", "/etc", SOURCE_URL=str(src)).code == 14
    assert run("list-dir", "sub dir/../..", SOURCE_URL=str(src)).code == 14
    assert run("list-dir", ".").code == 14
    assert run("list-dir", ".", SOURCE_URL=str(src), REGEX_FILTER="(").code == 14


# -- file-copy -----------------------------------------------------------------------------------------
def test_file_copy_tricky_names(run: Runner, src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst dir"
    for name in TRICKY:
        res = run("file-copy", name, SOURCE_URL=str(src), TARGET_URL=str(dst))
        assert res.code == 0, res.stderr
        assert (dst / name).read_bytes() == (src / name).read_bytes()
        assert res.sent == [name]
        size = (src / name).stat().st_size
        assert res.exec_json == {"inputBytes": size, "outputBytes": size, "outputFiles": [str(dst / name)]}
    assert not list(tmp_path.rglob("PWNED*"))
    # again: up to date, nothing moved; no sink -> no message
    res = run("file-copy", "plain.txt", SOURCE_URL=str(src), TARGET_URL=str(dst), SINK_MODULE="")
    assert res.code == 0 and res.sent == [] and res.exec_json is not None
    assert res.exec_json["outputBytes"] == 0


def test_file_copy_error_codes(run: Runner, src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    assert run("file-copy", "nope.txt", SOURCE_URL=str(src), TARGET_URL=str(dst)).code == 10
    assert run("file-copy", "sub dir", SOURCE_URL=str(src), TARGET_URL=str(dst)).code == 10  # a directory
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = run("file-copy", "sub dir/it's \"quoted\".dat", SOURCE_URL=str(src), TARGET_URL=str(blocker))
    assert res.code == 11, res.stderr
    for body in ("", "/etc/passwd", "../x", "a/./b", "dir/"):
        assert run("file-copy", body, SOURCE_URL=str(src), TARGET_URL=str(dst)).code == 14, body
    assert run("file-copy", "plain.txt", TARGET_URL=str(dst)).code == 14
    assert run("file-copy", "plain.txt", SOURCE_URL=str(src), TARGET_URL=str(dst), CHECKSUM="maybe").code == 14
    res = run("file-copy", "nope.txt", SOURCE_URL=str(src), TARGET_URL=str(dst))
    assert res.sent == [] and res.exec_json is None


def test_file_copy_checksum(run: Runner, src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    # same size and mtime, other content: only --checksum notices
    data = (src / "plain.txt").read_bytes()
    (dst / "plain.txt").write_bytes(bytes(255 - b for b in data))
    st = (src / "plain.txt").stat()
    os.utime(dst / "plain.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    res = run("file-copy", "plain.txt", SOURCE_URL=str(src), TARGET_URL=str(dst))
    assert res.code == 0 and (dst / "plain.txt").read_bytes() != data
    res = run("file-copy", "plain.txt", SOURCE_URL=str(src), TARGET_URL=str(dst), CHECKSUM="yes")
    assert res.code == 0, res.stderr
    assert (dst / "plain.txt").read_bytes() == data
    assert res.exec_json is not None and res.exec_json["outputBytes"] == len(data)


def test_file_copy_checksum_mismatch(run: Runner, src: Path, tmp_path: Path) -> None:
    # an rsync that corrupts the file it wrote: the verification pass must catch it
    real = shutil.which("rsync")
    (run.bin / "rsync").write_text(
        f'#!/usr/bin/env bash\n"{real}" "$@"; rc=$?\n'
        'case " $* " in *" --dry-run "*) ;; *) printf X >> "${@: -1}" ;; esac\nexit $rc\n')
    (run.bin / "rsync").chmod(0o755)
    res = run("file-copy", "with space.txt", SOURCE_URL=str(src), TARGET_URL=str(tmp_path / "d"), CHECKSUM="yes")
    assert res.code == 13, res.stderr
    assert res.sent == []


# -- through an rsync daemon ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int, proc: subprocess.Popen[bytes]) -> bool:
    """The daemon on ``port`` accepts a connection (it failing to start fails the wait at once)."""
    assert proc.poll() is None, "the rsync daemon did not start"
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _started(flag: Path, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "run.sh ended before it started its copy"
    return flag.exists()


@pytest.fixture
def daemon(tmp_path: Path, src: Path) -> Iterator[str]:
    """rsync://127.0.0.1:PORT with modules data (src, read only), out (writable) and ro (read only)."""
    out, ro = tmp_path / "daemon out", tmp_path / "daemon ro"
    out.mkdir()
    ro.mkdir()
    conf = tmp_path / "rsyncd.conf"
    conf.write_text(
        f"use chroot = no\nuid = root\ngid = root\npid file = {tmp_path}/rsyncd.pid\n"
        f"[data]\npath = {src}\nread only = yes\n"
        f"[out]\npath = {out}\nread only = no\n"
        f"[ro]\npath = {ro}\nread only = yes\n")
    port = _free_port()
    proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", "--address", "127.0.0.1", "--port", str(port),
                             "--config", str(conf), "--log-file", str(tmp_path / "rsyncd.log")])
    try:
        wait_until(lambda: _accepts(port, proc), 10, "the rsync daemon to accept connections")
        yield f"rsync://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_rsync_daemon_list_and_copy(run: Runner, src: Path, daemon: str, tmp_path: Path) -> None:
    res = run("list-dir", ".", SOURCE_URL=f"{daemon}/data")
    assert res.code == 0, res.stderr
    assert sorted(res.sent) == sorted(TRICKY)
    res = run("list-dir", "sub dir", SOURCE_URL=f"{daemon}/data/", REGEX_FILTER=r"\.dat$")
    assert sorted(res.sent) == sorted(n for n in TRICKY if n.startswith("sub dir/") and n.endswith(".dat"))
    assert run("list-dir", "empty", SOURCE_URL=f"{daemon}/data").sent == []
    # daemon -> local, then local -> daemon
    local = tmp_path / "local"
    for name in TRICKY:
        res = run("file-copy", name, SOURCE_URL=f"{daemon}/data", TARGET_URL=str(local), CHECKSUM="yes")
        assert res.code == 0, res.stderr
        assert (local / name).read_bytes() == (src / name).read_bytes()
        assert res.exec_json is not None and res.exec_json["inputBytes"] == (src / name).stat().st_size
        res = run("file-copy", name, SOURCE_URL=str(local), TARGET_URL=f"{daemon}/out/copy")
        assert res.code == 0, res.stderr
        assert (tmp_path / "daemon out" / "copy" / name).read_bytes() == (src / name).read_bytes()
    assert not list(tmp_path.rglob("PWNED*"))


def test_rsync_daemon_error_codes(run: Runner, src: Path, daemon: str, tmp_path: Path) -> None:
    assert run("list-dir", "missing", SOURCE_URL=f"{daemon}/data").code == 10
    res = run("file-copy", "nope.txt", SOURCE_URL=f"{daemon}/data", TARGET_URL=str(tmp_path / "t"))
    assert res.code == 10, res.stderr
    res = run("file-copy", "plain.txt", SOURCE_URL=str(src), TARGET_URL=f"{daemon}/ro")
    assert res.code == 11, res.stderr
    assert run("list-dir", ".", SOURCE_URL=daemon + "/no-such-module").code == 14
    res = run("file-copy", "plain.txt", SOURCE_URL=str(src), TARGET_URL=daemon + "/no-such-module")
    assert res.code == 14, res.stderr
    dead = f"rsync://127.0.0.1:{_free_port()}/data"
    assert run("list-dir", ".", SOURCE_URL=dead).code == 12
    assert run("file-copy", "plain.txt", SOURCE_URL=dead, TARGET_URL=str(tmp_path / "t")).code == 12
    assert run("file-copy", "plain.txt", SOURCE_URL=str(src), TARGET_URL=dead).code == 12


def test_rsync_over_ssh_form(run: Runner, src: Path, tmp_path: Path) -> None:
    """[user@]host:/path: rsync runs `ssh [-l user] host COMMAND`; a fake ssh runs COMMAND here."""
    (run.bin / "ssh").write_text(
        '#!/usr/bin/env bash\nwhile [ $# -gt 0 ]; do case $1 in -l|-p|-o|-i) shift 2 ;; -*) shift ;; *) break ;; '
        'esac; done\nshift\nexec sh -c "$*"\n')
    (run.bin / "ssh").chmod(0o755)
    res = run("list-dir", ".", SOURCE_URL=f"localhost:{src}")
    assert res.code == 0, res.stderr
    assert sorted(res.sent) == sorted(TRICKY)
    local, dst = tmp_path / "local", tmp_path / "over ssh"
    for name in TRICKY:
        res = run("file-copy", name, SOURCE_URL=f"localhost:{src}", TARGET_URL=str(local), CHECKSUM="yes")
        assert res.code == 0, res.stderr
        res = run("file-copy", name, SOURCE_URL=str(local), TARGET_URL=f"someone@localhost:{dst}/")
        assert res.code == 0, res.stderr
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert run("file-copy", "nope", SOURCE_URL=f"localhost:{src}", TARGET_URL=str(dst)).code == 10
    assert run("file-copy", "plain.txt", SOURCE_URL=f"localhost:{src}", TARGET_URL=f"localhost:{dst}").code == 14
    assert not list(tmp_path.rglob("PWNED*"))


# -- list-dir under a per-task message cap (MAX_MESSAGES) ----------------------------------------------
class Splitter:
    """Runs list-dir task after task as the launcher would: sink-tasks.txt lines (and send-message /
    send-job-message calls) are parsed; messages to list-dir itself become its next tasks."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bin = tmp / "split-bin"
        self.bin.mkdir()
        for name in ("send-message", "send-job-message"):  # record argv as JSON, one call per line
            (self.bin / name).write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                         "open(os.environ['CALLS'], 'a').write(json.dumps(sys.argv) + '\\n')\n")
            (self.bin / name).chmod(0o755)
        self.tasks = 0
        self.sizes: list[int] = []

    def run(self, source: str, cap: int, body: str = ".", **env: str) -> list[str]:
        """Every file body sent to the sink, over all the tasks the first one led to."""
        queue: list[tuple[str, dict[str, object]]] = [(body, {})]
        files: list[str] = []
        while queue:
            task_body, headers = queue.pop(0)
            self.tasks += 1
            work = self.tmp / f"split{self.tasks}"
            work.mkdir()
            full = {k: v for k, v in os.environ.items() if k not in SETTINGS}
            full.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", CALLS=str(work / "calls"),
                        WORK_DIR=str(work), SINK_MODULE="next", MODULE_NAME="list-dir", MAX_MESSAGES=str(cap),
                        SOURCE_URL=source, **env)
            stamped = {**headers, "from_module": "list-dir", "from_host": "h"}  # as the launcher adds them
            proc = subprocess.run([str(STANDARD_MODULES / "list-dir" / "run.sh"), task_body, json.dumps(stamped)],
                                  cwd=work, env=full, capture_output=True, text=True, timeout=60, check=False)
            assert proc.returncode == 0, proc.stderr
            messages = []
            batch = work / taskexec.SINK_TASKS
            if batch.exists():
                text = batch.read_text(encoding="utf-8", errors="surrogateescape")
                messages += [taskexec.parse_sink_line(line, {"next", "list-dir"}) for line in text.splitlines()]
            calls = work / "calls"
            for line in calls.read_text().splitlines() if calls.exists() else []:
                argv = json.loads(line)
                if argv[0].endswith("send-message"):
                    messages.append(Message(body=argv[1], module="next"))
                else:
                    messages.append(Message(body=argv[2], module=argv[1], headers=json.loads(argv[3])))
            self.sizes.append(len(messages))
            assert len(messages) <= cap, f"task {task_body!r} {headers} emitted {len(messages)} > {cap}"
            for m in messages:
                if m.module == "list-dir":
                    queue.append((m.body, m.headers))
                else:
                    assert m.module == "next" and m.headers == {}
                    files.append(m.body)
        return files


@pytest.fixture
def split(tmp_path: Path) -> Splitter:
    return Splitter(tmp_path)


def test_list_dir_splits_a_tree_over_the_cap(split: Splitter, tmp_path: Path) -> None:
    names = [f"d{d}/f{i:03d}.dat" for d in range(5) for i in range(40)]  # 200 files in 5 dirs
    make_tree(tmp_path / "big", names)
    files = split.run(str(tmp_path / "big"), cap=50)
    assert sorted(files) == sorted(names)  # every file, exactly once
    assert split.tasks == 1 + 5 and split.sizes == [5, 40, 40, 40, 40, 40]


def test_list_dir_under_the_cap_is_one_task_as_before(split: Splitter, tmp_path: Path) -> None:
    names = [f"d{d}/f{i}.dat" for d in range(5) for i in range(10)]
    make_tree(tmp_path / "small", names)
    assert sorted(split.run(str(tmp_path / "small"), cap=50)) == sorted(names)
    assert split.tasks == 1


def test_list_dir_splits_a_flat_directory_by_name_ranges(split: Splitter, tmp_path: Path) -> None:
    """More direct entries than the cap: parts by byte-ordered name ranges, whatever the bytes."""
    tricky = [n.replace("/", "_") for n in TRICKY] + ["ctl", "ctl\x01", "ctl\x01a", "Z", "z", "é", "e"]
    names = [f"n{i:03d}" for i in range(40)] + tricky + [f"sub/x{i}" for i in range(6)]
    make_tree(tmp_path / "flat", names)
    files = split.run(str(tmp_path / "flat"), cap=4)
    assert sorted(files) == sorted(names)
    assert max(split.sizes) <= 4 and split.tasks > 10
    assert not list(tmp_path.rglob("PWNED*"))


def test_list_dir_split_keeps_the_filter_and_nests(split: Splitter, tmp_path: Path) -> None:
    names = ([f"top{i}.txt" for i in range(3)] + [f"a/f{i}.dat" for i in range(25)] +
             [f"a/c/g{i}.dat" for i in range(12)] + [f"b/h{i}.txt" for i in range(5)] + ["a/c/d/e/deep.dat"])
    make_tree(tmp_path / "nest", names)
    files = split.run(str(tmp_path / "nest"), cap=10, REGEX_FILTER=r"\.dat$")
    assert sorted(files) == sorted(n for n in names if n.endswith(".dat"))
    files = split.run(str(tmp_path / "nest"), cap=10, body="a")
    assert sorted(files) == sorted(n for n in names if n.startswith("a/"))


def test_list_dir_splits_through_an_rsync_daemon(split: Splitter, src: Path, daemon: str) -> None:
    names = [f"big/d{d}/f {i:02d}.dat" for d in range(3) for i in range(8)] + [f"big/flat{i:02d}" for i in range(9)]
    make_tree(src, names)
    files = split.run(f"{daemon}/data", cap=5, body="big")
    assert sorted(files) == sorted(names)
    assert max(split.sizes) <= 5


def test_list_dir_bad_cap_is_a_configuration_error(run: Runner, src: Path) -> None:
    assert run("list-dir", ".", SOURCE_URL=str(src), MAX_MESSAGES="0").code == 14
    assert run("list-dir", ".", SOURCE_URL=str(src), MAX_MESSAGES="lots").code == 14
    res = run("list-dir", ".", SOURCE_URL=str(src), MAX_MESSAGES="2", MODULE_NAME="")
    assert res.code == 14 and "MODULE_NAME" in res.stderr


# -- TERM (timeouts, cancels, drains) -------------------------------------------------------------------
@pytest.mark.parametrize("module", ["list-dir", "file-copy"])
def test_a_terminated_run_removes_its_temp_dir(module: str, src: Path, tmp_path: Path) -> None:
    """The launcher TERMs a run's whole process group: the script's EXIT trap still runs (F25)."""
    slow = tmp_path / "slow-bin"
    slow.mkdir()
    (slow / "rsync").write_text('#!/bin/sh\ntouch "$STARTED"\nexec sleep 30\n')
    (slow / "rsync").chmod(0o755)
    tmpdir, work, started = tmp_path / "tmpdir", tmp_path / "work", tmp_path / "started"
    tmpdir.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(PATH=f"{slow}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmpdir), STARTED=str(started),
               SINK_MODULE="next", SOURCE_URL="rsync://127.0.0.1:9/data" if module == "list-dir" else str(src),
               TARGET_URL=str(tmp_path / "dst"))
    body = "." if module == "list-dir" else "plain.txt"
    proc = subprocess.Popen([str(STANDARD_MODULES / module / "run.sh"), body, "{}"], cwd=work, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: _started(started, proc), 10, f"{module}'s run.sh to start", every=0.02)
    assert len(list(tmpdir.iterdir())) == 1  # its mktemp -d
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == 143
    assert list(tmpdir.iterdir()) == []


# -- code_path: scalebox:NAME ----------------------------------------------------------------------------
def test_code_path_scalebox_resolves_to_the_package(tmp_path: Path) -> None:
    spec = load_pipeline(REPO / "examples/app-copy/app.yaml", environ={})
    paths = {m.name: m.code_path for m in spec.modules}
    assert paths == {"list-dir": STANDARD_MODULES / "list-dir", "file-copy": STANDARD_MODULES / "file-copy"}


def test_code_path_scalebox_unknown_is_a_located_error(tmp_path: Path) -> None:
    app = tmp_path / "app.yaml"
    app.write_text("name: x\nmodules:\n  a:\n    code_path: scalebox:list-dirs\n  b:\n    code_path: scalebox:nope\n")
    with pytest.raises(PipelineError) as info:
        load_pipeline(app, environ={})
    text = str(info.value)
    assert "line 4" in text or ":4:" in text, text
    assert "modules.a.code_path" in text and "did you mean 'list-dir'" in text, text
    app.write_text("name: x\nmodules:\n  b:\n    code_path: scalebox:nope\n")
    with pytest.raises(PipelineError) as info:
        load_pipeline(app, environ={})
    assert "unknown standard module scalebox:nope" in str(info.value)
    assert "available: cron, file-copy, list-dir" in str(info.value)

"""Shared hosts (issue 16, audit F7, F8, F14, F20, F22, F23): per-user private dirs and the
ownership rule, no-follow opens, where image definitions are looked up, file-copy staying inside
its roots, Slurm job ids read back from the database. What another user plants is planted by the
real unprivileged user ``sbxtest`` (tests/other_user.py)."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalebox_hpc.errors import ContainerError
from scalebox_hpc.launcher import livetail
from scalebox_hpc.launcher.outputs import CappedOutputs
from scalebox_hpc.launcher.outputs import _truncate as outputs_truncate
from scalebox_hpc.launcher.slot import script_said
from scalebox_hpc.launcher.workdirs import claim_app_dir
from scalebox_hpc.runtime import paths
from scalebox_hpc.runtime.base import SessionSpec
from scalebox_hpc.runtime.images import find_definition, package_containers, prepare_context
from scalebox_hpc.runtime.local import popen
from scalebox_hpc.runtime.paths import UnsafePathError, ensure_private, ensure_root, open_new_file, write_fresh
from scalebox_hpc.runtime.podman import EngineCli
from scalebox_hpc.slurm.client import InvalidJobIdError, SlurmClient, checked_ids
from scalebox_hpc.slurm.commands import CommandResult
from tests.components import need
from tests.other_user import OTHER, as_other, other_uid, shared_tmp
from tests.unit.test_standard_modules import Runner, _rsync

__all__ = ["_rsync", "shared_tmp"]  # fixtures used here

REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- private dirs and the ownership rule (F8, F20) -----------------------------------------------------
def test_private_dirs_are_made_0700_and_readable_ones_of_ours_tightened(tmp_path: Path) -> None:
    made = ensure_private(tmp_path / "a" / "b" / "c")
    assert all(mode(p) == 0o700 for p in (made, made.parent, made.parent.parent))
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)  # as an older release left it, under umask 022
    ensure_private(old)
    assert mode(old) == 0o700


def shared_gid() -> int:
    """A group the user shares with another user (the other user's): not a private group."""
    other_uid()
    return grp.getgrnam(OTHER).gr_gid


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o1777, 0o720])
def test_a_dir_of_ours_that_others_can_write_is_refused(tmp_path: Path, bits: int) -> None:
    d = tmp_path / "w"
    d.mkdir()
    os.chown(d, -1, shared_gid())
    d.chmod(bits)
    with pytest.raises(UnsafePathError, match=rf"refusing to use {d} \(owner uid {os.geteuid()}, mode {bits:04o}\)"
                                              ": group or others can write it") as err:
        ensure_private(d)
    assert str(d) in err.value.hint and mode(d) == bits  # left as it was: the user looks first


def test_group_writable_is_fine_when_the_group_is_the_users_private_group(tmp_path: Path) -> None:
    """umask 002 with user private groups (the group named after the user, no other member)."""
    user = pwd.getpwuid(os.geteuid())
    if not paths.private_group(user.pw_gid):
        pytest.skip(f"the primary group of {user.pw_name} is not a private group here")
    d = tmp_path / "upg"
    d.mkdir()
    os.chown(d, -1, user.pw_gid)
    d.chmod(0o775)
    ensure_private(d)
    assert mode(d) == 0o700
    assert not paths.private_group(shared_gid()) or user.pw_name == OTHER


def test_a_symlink_in_place_of_a_private_dir_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "root").symlink_to(target)
    with pytest.raises(UnsafePathError, match="not a directory"):
        ensure_private(tmp_path / "root")
    with pytest.raises(UnsafePathError, match="not a directory"):
        ensure_private(tmp_path / "root" / "sub", top=tmp_path)  # a link above, inside the checked part
    assert list(target.iterdir()) == []  # refused before anything was made through the link


def test_the_default_roots_are_per_user_under_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    base = tmp_path / f"scalebox-{os.geteuid()}"
    assert (paths.per_user_root(), paths.default_work_root(), paths.default_local_dir()) == \
        (base, base / "work", base / "local")
    ensure_root(paths.default_work_root())
    assert mode(base) == mode(base / "work") == 0o700


def test_another_users_planted_per_user_root_is_refused(shared_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """F8: another user made `scalebox-<uid>` 0777 with a symlink run.out -> a victim file inside;
    nothing under it is used, and the victim keeps its data."""
    monkeypatch.setenv("TMPDIR", str(shared_tmp))
    monkeypatch.setattr("tempfile.tempdir", None)
    victim = shared_tmp / "victim-file"
    victim.write_text("IMPORTANT victim data")
    base = paths.per_user_root()
    private = base / "work" / "app-1-0123456789ab" / "m" / ".node1-slot0.scalebox"
    as_other("mkdir", "-p", "-m", "0777", str(private))
    as_other("chmod", "0777", str(base), str(base / "work"))
    as_other("ln", "-s", str(victim), str(private / "run.out"))
    with pytest.raises(UnsafePathError, match=rf"{base} \(owner uid {other_uid()}, mode 0777\)"):
        claim_app_dir(paths.default_work_root(), 1, "0123456789ab")
    # made 0755 (not writable by us either way): still someone else's
    as_other("chmod", "0755", str(base))
    with pytest.raises(UnsafePathError, match="it belongs to another user"):
        ensure_root(paths.default_local_dir())
    assert victim.read_text() == "IMPORTANT victim data"


def test_explicit_roots_may_be_group_shared_but_not_anyones(shared_tmp: Path, tmp_path: Path) -> None:
    group = tmp_path / "project"
    group.mkdir()
    group.chmod(0o2770)  # a project dir: the user said so
    assert claim_app_dir(group, 1, "0123456789ab") == group / "app-1-0123456789ab"
    assert mode(group / "app-1-0123456789ab") & 0o777 == 0o700  # what scalebox makes in it is private (g+s kept)
    ensure_root(shared_tmp)  # 1777 and root's (like /scratch): nobody else can rename our entries
    theirs = shared_tmp / "theirs"
    as_other("mkdir", "-m", "1777", str(theirs))
    with pytest.raises(UnsafePathError, match="anyone can write it"):
        ensure_root(theirs)  # its owner can rename (replace) what we make in it
    wide = tmp_path / "wide"
    wide.mkdir()
    wide.chmod(0o777)
    with pytest.raises(UnsafePathError, match="needs the sticky bit"):
        claim_app_dir(wide, 1, "0123456789ab")
    # an app dir planted in a shared root by another user is refused, not entered
    as_other("mkdir", "-m", "0700", str(shared_tmp / "app-2-0123456789ab"))
    with pytest.raises(UnsafePathError, match="belongs to another user"):
        claim_app_dir(shared_tmp, 2, "0123456789ab")


# -- no-follow opens (F8) and the private-dir readers (F14) ---------------------------------------------
def test_run_output_files_are_not_opened_through_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "run.out").symlink_to(victim)
    with pytest.raises(OSError) as err:
        popen(["true"], cwd=tmp_path, env={}, stdout_path=tmp_path / "run.out", stderr_path=tmp_path / "run.err")
    assert err.value.errno == errno.ELOOP and victim.read_text() == "keep"
    with pytest.raises(OSError):
        os.close(open_new_file(tmp_path / "run.out", append=True))
    fresh = tmp_path / "fresh.out"
    os.close(open_new_file(fresh))
    assert mode(fresh) == 0o600 and victim.read_text() == "keep"


def test_request_files_are_written_fresh_and_renamed_over_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    req = tmp_path / "request.sh"
    req.symlink_to(victim)
    write_fresh(req, "echo hi\n")
    assert not req.is_symlink() and req.read_text() == "echo hi\n" and mode(req) == 0o600
    assert victim.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["request.sh", "victim"]


def test_an_oversized_output_is_cut_in_place_never_through_a_link(tmp_path: Path) -> None:
    out = tmp_path / "run.out"
    out.write_bytes(b"x" * 200_000)
    capped = CappedOutputs((out,), limit=64 * 1024)
    capped.check()
    assert out.stat().st_size == 0 and "x" in capped.tail(out)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "run.err"
    link.symlink_to(victim)
    outputs_truncate(link)  # what check() does once a name it measured was swapped for a link
    assert victim.read_bytes() == b"keep"


def test_live_tail_and_script_said_neither_block_on_a_fifo_nor_follow_a_link(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "run.out")
    (tmp_path / "check.err").symlink_to("/etc/passwd")
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.extend([livetail.stream_tail(tmp_path / "run.out"),
                                                            script_said(tmp_path / "check.err")]), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "a reader blocked on the FIFO"
    assert result == [None, ""]


# -- image definitions (F7) ----------------------------------------------------------------------------
DOCKERFILE = "# scalebox-rootfs: bash\nFROM scratch\n"
PLANTED_ROOTFS = '#!/bin/sh\ntouch "$(dirname "$0")/../PWNED-rootfs-ran"\nmkdir -p "$1"\n'


def plant_definition(where: Path, name: str = "myimg") -> None:
    as_other("mkdir", "-p", str(where))
    for file, text in ((f"{name}.Dockerfile", DOCKERFILE), (f"{name}.def", "Bootstrap: scratch\n"),
                       ("rootfs.sh", PLANTED_ROOTFS)):
        as_other("sh", "-c", 'printf "%s" "$1" > "$2"', "sh", text, str(where / file))


def test_definitions_in_a_world_writable_ancestor_are_not_used(shared_tmp: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """F7: the app at ww/alice/app/calc, ww 1777 like /scratch, ww/containers/myimg.* planted by
    another user: not found, and the planted rootfs.sh never runs (not even through a fake podman
    that has no such image)."""
    monkeypatch.delenv("SCALEBOX_CONTAINERS", raising=False)
    code = shared_tmp / "alice" / "app" / "calc"
    code.mkdir(parents=True)
    for d in (code, code.parent, code.parent.parent):
        d.chmod(0o755)
    plant_definition(shared_tmp / "containers")
    assert find_definition("myimg", code, ".Dockerfile") is None
    assert find_definition("myimg", code, ".def") is None
    fake = shared_tmp / "alice" / "podman"
    fake.write_text("#!/bin/sh\nexit 1\n")  # `podman image exists`: no such image
    fake.chmod(0o755)
    engine = EngineCli("podman", str(fake), lock_dir=shared_tmp / "alice" / "locks")
    spec = SessionSpec(name="s", work_dir=code, private_dir=code, code_path=code, image="myimg")
    with pytest.raises(ContainerError, match="image 'myimg' not found"):
        engine.image_for(spec)
    assert not list(shared_tmp.rglob("PWNED*"))
    # the app's own containers/ (the user's, not writable by others) is found as before
    own = code.parent / "containers"
    own.mkdir(mode=0o755)
    (own / "myimg.Dockerfile").write_text("FROM scratch\n")
    assert find_definition("myimg", code, ".Dockerfile") == own / "myimg.Dockerfile"
    # ... but not one others can write, nor one in a dir of the other user below the app
    (own / "myimg.Dockerfile").chmod(0o666)
    assert find_definition("myimg", code, ".Dockerfile") is None
    theirs = code.parent / "calc2"  # a module dir of the other user's in the app: the walk stops at once
    theirs.mkdir(mode=0o755)
    os.chown(theirs, other_uid(), -1)
    plant_definition(theirs / "containers")
    assert find_definition("myimg", theirs, ".Dockerfile") is None
    # configured dirs are the user's choice: found there even when another user owns the file
    assert find_definition("myimg", code, ".Dockerfile", configured=[shared_tmp / "containers"]) == \
        shared_tmp / "containers" / "myimg.Dockerfile"


def test_a_rootfs_script_of_another_user_never_runs(shared_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plant_definition(shared_tmp / "defs")
    definition = find_definition("myimg", None, ".Dockerfile", configured=[shared_tmp / "defs"])
    assert definition == shared_tmp / "defs" / "myimg.Dockerfile"
    context = shared_tmp / "ctx"
    context.mkdir()
    with pytest.raises(ContainerError, match=rf"rootfs.sh may not run: it belongs to uid {other_uid()}"):
        prepare_context(definition, context)
    assert not list(shared_tmp.rglob("PWNED*"))


def test_a_group_writable_rootfs_script_of_ours_never_runs(tmp_path: Path) -> None:
    defs = tmp_path / "containers"
    defs.mkdir()
    (defs / "x.Dockerfile").write_text(DOCKERFILE)
    (defs / "rootfs.sh").write_text(PLANTED_ROOTFS)
    os.chown(defs / "rootfs.sh", -1, shared_gid())
    (defs / "rootfs.sh").chmod(0o664)
    (tmp_path / "ctx").mkdir()
    with pytest.raises(ContainerError, match=r"group or others can write it \(mode 0664\)"):
        prepare_context(defs / "x.Dockerfile", tmp_path / "ctx")
    assert not (tmp_path / "PWNED-rootfs-ran").exists()


def test_the_standard_and_example_images_are_still_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCALEBOX_CONTAINERS", raising=False)
    assert package_containers() == REPO / "containers"
    for name, code in (("app-primes", REPO / "examples" / "app-primes" / "calc"),
                       ("file-copy", REPO / "scalebox_hpc" / "modules" / "file-copy"),
                       ("list-dir", REPO / "scalebox_hpc" / "modules" / "list-dir")):
        assert find_definition(name, code, ".def") == REPO / "containers" / f"{name}.def"
        assert find_definition(name, code, ".Dockerfile") == REPO / "containers" / f"{name}.Dockerfile"


# -- file-copy stays inside SOURCE_URL / TARGET_URL (F22) ------------------------------------------------
def test_file_copy_does_not_follow_a_symlinked_source_dir_out(tmp_path: Path) -> None:
    run = Runner(tmp_path)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "link").symlink_to("/etc")
    res = run("file-copy", "link/hostname", SOURCE_URL=str(src), TARGET_URL=str(dst))
    assert res.code == 10 and "outside SOURCE_URL" in res.stderr, res.stderr
    assert not (dst / "link").exists() and res.sent == []
    (src / "passwd-link").symlink_to("/etc/passwd")  # a link as the file itself: not copied either
    assert run("file-copy", "passwd-link", SOURCE_URL=str(src), TARGET_URL=str(dst)).code == 10
    assert not (dst / "passwd-link").exists()
    # a link that stays inside the source is fine
    (src / "real").mkdir()
    (src / "real" / "f.txt").write_text("data")
    (src / "alias").symlink_to(src / "real")
    res = run("file-copy", "alias/f.txt", SOURCE_URL=str(src), TARGET_URL=str(dst))
    assert res.code == 0 and (dst / "alias" / "f.txt").read_text() == "data", res.stderr


def test_file_copy_does_not_write_through_a_symlinked_target_dir(tmp_path: Path) -> None:
    run = Runner(tmp_path)
    src, dst, outside = tmp_path / "src", tmp_path / "dst", tmp_path / "outside"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("data")
    (src / "sub" / "deeper" / "g.txt").write_text("more")
    dst.mkdir()
    outside.mkdir()
    (dst / "sub").symlink_to(outside)
    res = run("file-copy", "sub/f.txt", SOURCE_URL=str(src), TARGET_URL=str(dst))
    assert res.code == 11 and "outside TARGET_URL" in res.stderr, res.stderr
    res = run("file-copy", "sub/deeper/g.txt", SOURCE_URL=str(src), TARGET_URL=str(dst))
    assert res.code == 11  # no directory made outside on the way either
    assert list(outside.iterdir()) == []
    (dst / "sub").unlink()
    (dst / "sub").mkdir()
    (dst / "sub" / "f.txt").symlink_to(outside / "victim")
    assert run("file-copy", "sub/f.txt", SOURCE_URL=str(src), TARGET_URL=str(dst)).code == 11
    assert list(outside.iterdir()) == []


def test_file_copy_tolerates_another_slot_making_the_target_dir_first(tmp_path: Path) -> None:
    """Slots copying a/x and a/y at once: the mkdir of `a` that loses the race is not an error."""
    run = Runner(tmp_path)
    real = subprocess.run(["sh", "-c", "command -v mkdir"], capture_output=True, text=True, check=True).stdout.strip()
    (run.bin / "mkdir").write_text(  # makes the dir, then fails as if another slot had made it
        f'#!/bin/sh\n{real} "$@" || exit 1\ncase " $* " in *" -p "*) exit 0 ;; esac\n'
        'echo "mkdir: cannot create directory: File exists" >&2\nexit 1\n')
    (run.bin / "mkdir").chmod(0o755)
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "x").write_text("x")
    res = run("file-copy", "a/b/x", SOURCE_URL=str(src), TARGET_URL=str(dst))
    assert res.code == 0 and (dst / "a" / "b" / "x").read_text() == "x", res.stderr


def test_an_ssh_host_like_an_option_is_refused(tmp_path: Path) -> None:
    """rsync hands the host of HOST:/path to ssh as an argument: `-oProxyCommand=...` would run."""
    run = Runner(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    for url in ("-oProxyCommand=touch PWNED:/x", "me@-oProxyCommand=touch PWNED:/x"):  # (no '/' before ':')
        res = run("file-copy", "f", SOURCE_URL=str(tmp_path / "src"), TARGET_URL=url)
        assert res.code == 14 and "must not start with '-'" in res.stderr, res.stderr
        assert run("list-dir", ".", SOURCE_URL=url).code == 14
    assert not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize("module", ["file-copy", "list-dir"])
def test_the_standard_modules_are_shellcheck_clean(module: str) -> None:
    script = REPO / "scalebox_hpc" / "modules" / module / "run.sh"
    if shutil.which("shellcheck") is None:
        need("shellcheck", "not on PATH (launchers/testbed/shellcheck.sh installs it)")
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


# -- Slurm job ids read back from the database (F23) -----------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], *, timeout: float, input: str | None = None) -> CommandResult:
        self.calls.append(list(argv))
        return CommandResult("", "", 0)


@pytest.mark.parametrize("bad", ["--me", "-u alice", "1 2", "1,2", "12_", "_3", "\u0661\u0662", "12;rm", "1+0"])
def test_a_job_id_that_sbatch_never_gave_is_refused_before_any_command(bad: str) -> None:
    runner = Recorder()
    client = SlurmClient(runner, use_json=False)
    for call in (lambda: client.cancel(["7", bad]), lambda: client.status([bad]), lambda: client.show_job(bad)):
        with pytest.raises(InvalidJobIdError, match="refusing Slurm job id"):
            call()
    assert runner.calls == []


def test_scancel_gets_dashdash_before_the_ids() -> None:
    runner = Recorder()
    SlurmClient(runner, cluster="c2", use_json=False).cancel(["12", "33_4", "12"])
    SlurmClient(runner, use_json=False).cancel(["5"], signal="USR1")
    assert runner.calls == [["scancel", "-M", "c2", "--", "12", "33_4"],
                            ["scancel", "--signal=USR1", "--full", "--", "5"]]


@given(st.text(max_size=12))
def test_checked_ids_accept_exactly_sbatch_ids(text: str) -> None:
    stripped = text.strip()
    parts = stripped.split("_")
    valid = 1 <= len(parts) <= 2 and all(p and p.isascii() and p.isdigit() for p in parts)
    try:
        ids = checked_ids([text])
    except InvalidJobIdError:
        assert stripped and not valid
    else:
        assert ids == ([stripped] if stripped else []) and (valid or not stripped)

"""Directories and files on a shared host: per-user roots, the ownership rule, no-follow opens.

On a login node or a compute node many users share ``/tmp`` and ``/scratch``. A directory whose
name another user can guess (``/tmp/scalebox-<uid>``) may already exist, made by them, with a
symlink planted inside; and the owner of a directory may rename anything in it whatever the
sticky bit says. So, as OpenSSH, tmux and ``XDG_RUNTIME_DIR`` do:

- **Private dirs** (everything under the per-user root ``$TMPDIR/scalebox-<euid>``, every app
  dir, module dir, slot work dir and private dir) are created mode 0700 and are used only when
  they are real directories (not symlinks) owned by the effective user that neither group nor
  others can write. One of ours that others can only read (0755, made by an older release) is
  tightened to 0700; anything else is refused with :class:`UnsafePathError`.
- **Explicit roots** (``--work-root``, ``SCALEBOX_WORK_ROOT``, ``SCALEBOX_LOCAL_DIR``,
  a ``local_scratch`` given outside the per-user root) are the user's choice: they may belong to
  a project group and be group-writable (members of that group are trusted). A world-writable
  root is accepted only with the sticky bit and owned by the user or root (``/scratch`` itself),
  since then nobody else can rename what the user creates in it. The dirs scalebox creates below
  a root are private dirs whatever the root.

:func:`open_new_file` and :func:`open_regular` open files without following a symlink at the
last component: a planted link cannot redirect a write or make a read block (FIFO).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import stat
import tempfile
from pathlib import Path
from typing import IO

from scalebox_hpc.errors import ScaleboxError

logger = logging.getLogger(__name__)

PRIVATE_MODE = 0o700


class UnsafePathError(ScaleboxError):
    """A directory scalebox would use belongs to someone else or others can write it."""


def per_user_root() -> Path:
    """``$TMPDIR/scalebox-<euid>``: the parent of the default work root, local scratch and locks."""
    return Path(tempfile.gettempdir()) / f"scalebox-{os.geteuid()}"


def default_work_root() -> Path:
    """The work root when none is given: ``<per-user root>/work``."""
    return per_user_root() / "work"


def default_local_dir() -> Path:
    """Node-local scratch (``/local`` in containers) when none is given: ``<per-user root>/local``."""
    return per_user_root() / "local"


def _describe(path: Path, st: os.stat_result) -> str:
    return f"{path} (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"


def _refuse(path: Path, st: os.stat_result, why: str) -> UnsafePathError:
    return UnsafePathError(
        f"refusing to use {_describe(path, st)}: {why}",
        hint=f"remove or fix {path} (it must be a directory of uid {os.geteuid()} that only it can "
             "write), or set SCALEBOX_WORK_ROOT / SCALEBOX_LOCAL_DIR to a directory of your own",
    )


def private_group(gid: int) -> bool:
    """Whether ``gid`` is the user's own private group (the user-private-group convention: named
    after the user, the user's primary group, no other listed member), so that group-writable
    (``umask 002``) means writable by the user alone."""
    try:
        group = grp.getgrgid(gid)
        user = pwd.getpwuid(os.geteuid())
    except KeyError:
        return False
    return gid == user.pw_gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}


def check_private(path: Path) -> None:
    """Refuse ``path`` unless it is a real directory of the euid that group and others cannot
    write (the group may if it is the user's private group, :func:`private_group`); one others
    can read or enter (0755, or 0775 with a private group) is tightened to 0700."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, st, "it is not a directory (a symlink or a file)")
    if st.st_uid != os.geteuid():
        raise _refuse(path, st, "it belongs to another user")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002 or (mode & 0o020 and not private_group(st.st_gid)):
        raise _refuse(path, st, "group or others can write it (anything in it may have been planted)")
    if mode & 0o077:
        os.chmod(path, mode & 0o700, follow_symlinks=False)
        logger.info("tightened %s to mode %04o (was %04o): work files are private", path, mode & 0o700, mode)


def ensure_private(path: Path, *, top: Path | None = None) -> Path:
    """Create ``path`` (missing parents too) mode 0700 and check it with :func:`check_private`;
    so are the existing dirs between ``top`` (exclusive) and ``path``, before anything is made
    in them, and every dir this call creates. Returns ``path``."""
    path = Path(os.path.abspath(path))
    top = Path(os.path.abspath(top)) if top is not None else None
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    existing = [q for q in (p, *p.parents)
                if q == path or (top is not None and q != top and q.is_relative_to(top))]
    for q in reversed(existing):  # from the top down: nothing is made through a planted link
        check_private(q)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another launcher made it meanwhile: checked next
            os.mkdir(d, PRIVATE_MODE)
        check_private(d)
    return path


def check_shared_root(path: Path) -> None:
    """Refuse an explicit root that is not a directory, or is world-writable without the sticky
    bit or owned by another user than the euid or root (symlinks are followed: the user named it)."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, st, "it is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002 and not (mode & stat.S_ISVTX and st.st_uid in (0, os.geteuid())):
        raise _refuse(path, st, "anyone can write it and rename what scalebox creates in it "
                                "(a world-writable root needs the sticky bit and to be yours or root's)")


def ensure_root(path: Path) -> Path:
    """Make a root usable: under the per-user root (the defaults) every dir down from it is a
    private dir (:func:`ensure_private`); elsewhere (a root the user gave) it is created if
    missing and checked with :func:`check_shared_root`. Returns the absolute path."""
    path = Path(os.path.abspath(path))
    base = per_user_root()
    if path == base or path.is_relative_to(base):
        return ensure_private(path, top=base.parent)
    if not path.exists():
        ensure_private(path)
    check_shared_root(path)
    return path


NOFOLLOW_WRITE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
"""Flags of every file the launcher writes in a work or private dir (with O_TRUNC/O_APPEND/O_EXCL)."""


def open_new_file(path: Path, *, append: bool = False, mode: int = 0o600) -> int:
    """A write fd for ``path``, truncated (or appended to), never through a symlink at ``path``
    (ELOOP instead); the caller closes it."""
    return os.open(path, NOFOLLOW_WRITE | (os.O_APPEND if append else os.O_TRUNC), mode)


def write_fresh(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Write ``text`` to a new file beside ``path`` (O_EXCL, no symlink followed) and rename it
    to ``path``: a reader sees the whole file or none, and nothing planted at ``path`` is written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, NOFOLLOW_WRITE | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file (not through a symlink, never blocking
    on a FIFO); OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise

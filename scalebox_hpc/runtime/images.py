"""Image references: find definitions in ``containers/``, build them offline, and the SIF cache.

A module's ``base_image`` is one of:

- ``docker://REF``, ``docker-archive:PATH``, ``oci-archive:PATH`` (…): converted once to a SIF for Apptainer;
- a local ``.sif`` file or a sandbox directory (absolute, or relative to ``code_path`` or its parent,
  the app dir): used as it is;
- ``NAME``: built from ``containers/NAME.def`` (Apptainer) or ``containers/NAME.Dockerfile``
  (Podman/Docker), found (:func:`find_definition`) in ``$SCALEBOX_CONTAINERS`` (colon-separated
  dirs), else in the nearest ``containers/`` dir at or above the module's ``code_path`` while
  those dirs are the user's own, else in the package's own ``containers/``; for Podman/Docker also
  a local image name.

A definition may carry ``# scalebox-rootfs: [PROGRAM[?] ...]`` (e.g. ``bash rsync ssh?``): its build
context then gets ``rootfs/``, made offline by ``rootfs.sh`` next to the definition (a static busybox
plus those host programs with their libraries; no registry needed).

The SIF cache (``$SCALEBOX_SIF_CACHE``, default ``~/.cache/scalebox_hpc/sif``) is keyed by the
reference's digest (or the hash of the reference and of its definition's text); a build holds
an exclusive lock (a POSIX lock, so also across nodes on a shared file system, plus a thread
lock within a process), writes a temporary file and renames it into place atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from scalebox_hpc.errors import ContainerError
from scalebox_hpc.runtime.paths import private_group
from scalebox_hpc.runtime.spython_adapter import PULL_TRANSPORTS, SpythonApptainer
from scalebox_hpc.settings import environ_containers, environ_sif_cache

logger = logging.getLogger(__name__)

TRANSPORTS = ("docker://", "docker-archive:", "oci-archive:", "oci:", "oras://", "library://", "shub://")
_DIRECTIVE = re.compile(r"^#\s*scalebox-rootfs:(.*)$", re.MULTILINE)
BUILD_TIMEOUT = 1800.0
STALE_TMP_SECONDS = 3600.0
"""A temporary SIF this old is a leftover of a killed build (builds time out after 30 min)."""


def default_cache(configured: Path | None = None) -> Path:
    """``configured`` (SCALEBOX_SIF_CACHE, :attr:`Settings.sif_cache`), else ``~/.cache/scalebox_hpc/sif``."""
    return configured or Path.home() / ".cache" / "scalebox_hpc" / "sif"


def local_path(ref: str, code_path: Path | None) -> Path | None:
    """``ref`` as a file path (absolute, ``~``, or relative: beside ``code_path`` or in its parent,
    the app dir), None when it is a plain name."""
    if ref.startswith("~"):
        return Path(ref).expanduser()
    path = Path(ref)
    if path.is_absolute():
        return path
    if "/" not in ref and not ref.endswith((".sif", ".def")):
        return None
    bases = [code_path, code_path.parent] if code_path is not None else []
    for base in bases:
        if (base / path).exists():
            return base / path
    return (bases[-1] if bases else Path.cwd()) / path


def find_definition(
    name: str, start: Path | None, suffix: str, *, configured: Sequence[Path] = (),
) -> Path | None:
    """``NAME<suffix>`` in the ``configured`` dirs (SCALEBOX_CONTAINERS: :attr:`Settings.containers`),
    else in ``containers/`` of ``start`` or the nearest dir above it, else in the package's
    ``containers/``; None when none has it.

    A definition decides what runs on the host while the image is built (``rootfs.sh``, an
    Apptainer ``%post`` with ``--fakeroot``), so only trusted places count (F7): the walk up
    from ``start`` stops at the first dir that is not the user's own or that group or others
    can write (``/tmp``, a 1777 ``/scratch``, another user's home), and a definition or
    ``containers/`` dir there that is not the user's (or root's), or others can write, is
    skipped with a warning. The configured dirs are the user's choice: there only a
    world-writable file is skipped."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        return None
    for d, strict in _definition_dirs(start, configured):
        candidate = d / f"{name}{suffix}"
        if not candidate.is_file():
            continue
        why = _untrusted(candidate, strict=strict) or (_untrusted(d, strict=True) if strict else None)
        if why is None:
            return candidate
        logger.warning("image %s: ignoring %s: %s", name, candidate, why)
    return None


def _definition_dirs(start: Path | None, configured: Sequence[Path]) -> Iterator[tuple[Path, bool]]:
    """(dir, strict) in search order: configured dirs, the user's own dirs from ``start`` up,
    the package's containers/."""
    for d in configured:
        yield d, False
    if start is not None:
        for p in (start, *start.parents):
            if _untrusted(p, strict=True, owners=(os.geteuid(),)) is not None:
                break  # not the user's own tree any more: nothing above counts either
            yield p / "containers", True
    package = package_containers()
    if package is not None:
        yield package, True


def package_containers() -> Path | None:
    """The definitions shipped with scalebox_hpc: ``scalebox_hpc/containers`` in a wheel, the
    repository's ``containers/`` in a checkout (beside the package, next to pyproject.toml)."""
    pkg = Path(__file__).resolve().parents[1]
    if (pkg / "containers").is_dir():
        return pkg / "containers"
    if (pkg.parent / "pyproject.toml").is_file() and (pkg.parent / "containers").is_dir():
        return pkg.parent / "containers"
    return None


def _untrusted(path: Path, *, strict: bool, owners: tuple[int, ...] | None = None) -> str | None:
    """Why ``path`` may not decide what runs on the host, None when it may: strict, it must be
    owned by the euid (or root, unless ``owners`` says otherwise) and not writable by group or
    others; not strict, only world-writable is refused."""
    try:
        st = path.stat()
    except OSError as exc:
        return f"cannot be checked ({exc.strerror or exc})"
    mode = stat.S_IMODE(st.st_mode)
    if not strict:
        return "anyone can write it" if mode & 0o002 else None
    if st.st_uid not in (owners or (os.geteuid(), 0)):
        return f"it belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}) or root"
    if mode & 0o002 or (mode & 0o020 and not private_group(st.st_gid)):
        return f"group or others can write it (mode {mode:04o})"
    return None


def rootfs_args(definition: Path) -> list[str] | None:
    """The ``# scalebox-rootfs:`` directive's arguments, None without one."""
    match = _DIRECTIVE.search(definition.read_text(encoding="utf-8"))
    return match.group(1).split() if match else None


def definition_key(definition: Path) -> str:
    """Hash of the definition's text and, with a rootfs directive, of ``rootfs.sh``."""
    h = hashlib.sha256(definition.read_bytes())
    if rootfs_args(definition) is not None:
        h.update((definition.parent / "rootfs.sh").read_bytes())
    return h.hexdigest()[:20]


def prepare_context(definition: Path, context: Path) -> None:
    """Copy the definition into ``context``; make ``context/rootfs`` when it asks for one."""
    shutil.copy2(definition, context / definition.name)
    args = rootfs_args(definition)
    if args is None:
        return
    script = definition.parent / "rootfs.sh"
    if not script.is_file():
        raise ContainerError(f"{definition} asks for a rootfs but {script} is missing")
    why = _untrusted(script, strict=True)
    if why is not None:  # it runs on the host, as the user: only the user's own (or root's) script
        raise ContainerError(f"{definition} asks for a rootfs but {script} may not run: {why}",
                             hint=f"make {script} yours and writable only by you (chmod go-w)")
    _run(["/bin/sh", str(script), str(context / "rootfs"), *args], cwd=context, what=f"rootfs for {definition}")


def _run(argv: list[str], *, cwd: Path | None = None, what: str) -> None:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ContainerError(f"{what}: {' '.join(argv[:3])} did not run: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise ContainerError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path``: between threads and between processes/nodes."""
    with _thread_locks_guard:
        tlock = _thread_locks.setdefault(str(lock_path), threading.Lock())
    with tlock:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the POSIX lock


class SifCache:
    """Apptainer images: SIF files and sandboxes used as they are, everything else built once
    (pulled for registry references, built for definitions and archives, both through
    :class:`~scalebox_hpc.runtime.spython_adapter.SpythonApptainer`).

    ``root`` and ``containers`` (the definition dirs searched first) default to
    SCALEBOX_SIF_CACHE and SCALEBOX_CONTAINERS of this process's environment: a public
    constructor (tests, benchmarks, library code); the launcher passes its settings'."""

    def __init__(
        self, apptainer: str, root: Path | None = None, *, client: SpythonApptainer | None = None,
        containers: Sequence[Path] | None = None,
    ) -> None:
        self.apptainer = apptainer
        self.root = root or default_cache(environ_sif_cache())
        self.client = client or SpythonApptainer(apptainer)
        self.definition_dirs = tuple(environ_containers() if containers is None else containers)

    def resolve(self, ref: str, search_from: Path | None = None) -> Path:
        """A runnable image path for ``ref`` (building it into the cache on first use)."""
        return self.ensure(ref, search_from)[0]

    def ensure(self, ref: str, search_from: Path | None = None) -> tuple[Path, bool]:
        """``(path, built)``: built is True only for the caller that did the build."""
        if ref.startswith(TRANSPORTS):
            return self._cached(self._ref_key(ref), lambda out: self._build(out, ref, cwd=None))
        path = local_path(ref, search_from)
        if path is not None:
            if path.suffix == ".def" and path.is_file():
                return self._from_definition(path)
            if path.exists():
                return path, False
            raise ContainerError(f"image {ref!r} not found: {path} does not exist")
        definition = find_definition(ref, search_from, ".def", configured=self.definition_dirs)
        if definition is None:
            where = f" or above {search_from}" if search_from else ""
            raise ContainerError(
                f"image {ref!r} not found: no containers/{ref}.def in $SCALEBOX_CONTAINERS{where}"
            )
        return self._from_definition(definition)

    def _ref_key(self, ref: str) -> str:
        digest = re.search(r"@sha256:([0-9a-f]{64})", ref)
        if digest:
            return digest.group(1)[:20]
        h = hashlib.sha256(ref.encode())
        archive = ref.partition(":")[2]
        if ref.startswith(("docker-archive:", "oci-archive:")) and os.path.exists(archive):
            st = os.stat(archive)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:20]

    def _from_definition(self, definition: Path) -> tuple[Path, bool]:
        key = f"{definition.stem}-{definition_key(definition)}"

        def build(out: Path) -> None:
            with tempfile.TemporaryDirectory(prefix="scalebox-build-") as tmp:
                context = Path(tmp)
                prepare_context(definition, context)
                self._build(out, definition.name, cwd=context, fakeroot=self._needs_fakeroot(definition))

        return self._cached(key, build)

    @staticmethod
    def _needs_fakeroot(definition: Path) -> bool:
        return "%post" in definition.read_text(encoding="utf-8") or os.geteuid() != 0

    def _build(self, out: Path, source: str, *, cwd: Path | None, fakeroot: bool = False) -> None:
        """Make the SIF ``out``: ``apptainer pull`` a registry reference, ``apptainer build`` the rest."""
        logger.info("%s %s from %s", "pulling" if source.startswith(PULL_TRANSPORTS) else "building", out.name, source)
        if source.startswith(PULL_TRANSPORTS):
            self.client.pull(source, out, timeout=BUILD_TIMEOUT)
        else:
            self.client.build(out, source, cwd=cwd, fakeroot=fakeroot, timeout=BUILD_TIMEOUT)

    def _cached(self, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
        final = self.root / f"{key}.sif"
        if final.is_file():
            return final, False
        with exclusive(self.root / f"{key}.lock"):
            if final.is_file():  # another process or node built it while we waited
                return final, False
            self._sweep_tmp(key)
            tmp = self.root / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp.sif"
            try:
                build(tmp)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        return final, True

    def _sweep_tmp(self, key: str) -> None:
        """Remove temporary SIFs that killed builds left: every one of ``key`` (its lock is held,
        so no build of it runs) and those of other keys older than :data:`STALE_TMP_SECONDS`."""
        now = time.time()
        for path in self.root.glob(".*.tmp.sif"):
            try:
                age = now - path.lstat().st_mtime
                if path.name.startswith(f".{key}.") or age > STALE_TMP_SECONDS:
                    path.unlink()
                    logger.info("SIF cache %s: removed %s, left by an interrupted build (%.0f s old)",
                                self.root, path.name, age)
            except OSError:
                continue

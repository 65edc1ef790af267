"""What the container runtimes share: standard mounts, host→container path and environment
translation, the per-task session, and the in-container helper commands (POSIX sh).

Standard mounts (Scalebox layout):

===================  =====================================================
``/work``            the slot's work dir (``WORK_DIR=/work`` inside)
``/local``           node-local scratch (``SCALEBOX_LOCAL_DIR``)
``/data``            the cluster data root (``SCALEBOX_DATA_ROOT``, when set)
``/app/bin``         the module's ``code_path`` (read-only)
``/.scalebox/bin``   ``send-message``, ``send-job-message``, ``scalebox``, the slot agent (read-only, on PATH)
``/.scalebox/slot``  the slot's private dir (emit buffers, captured output, agent FIFOs)
===================  =====================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import posixpath
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from scalebox_hpc import taskapi
from scalebox_hpc.errors import ContainerError
from scalebox_hpc.runtime import fence
from scalebox_hpc.runtime.base import Outcome, RunSpec, SessionSpec
from scalebox_hpc.runtime.local import LocalRun, popen
from scalebox_hpc.runtime.paths import ensure_root
from scalebox_hpc.runtime.svcdir import RequestDir, socket_asker

logger = logging.getLogger(__name__)

CONTAINER_BIN = Path(__file__).resolve().parent / "container_bin"
HELPER_DIR = "/.scalebox/bin"
SLOT_DIR = "/.scalebox/slot"
WORK = "/work"
LOCAL = "/local"
DATA = "/data"
APP_BIN = "/app/bin"
CONTAINER_PATH = f"{HELPER_DIR}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

HOST_ONLY_ENV = frozenset({
    "PATH", "HOME", "PWD", "OLDPWD", "SHLVL", "_", "TMPDIR", "TMP", "TEMP", "VIRTUAL_ENV",
    "SCALEBOX_PYTHON", "MAIL", "PS1", "PROMPT_COMMAND",
})
"""Host variables that describe the host, not the task: never passed into a container."""
HOST_ONLY_PREFIXES = ("LD_", "PYTHON", "APPTAINER", "SINGULARITY", "CONDA", "XDG_", "BASH_FUNC_")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_UNSAFE_BIND = re.compile(r"[:,\n]")


@dataclass(frozen=True)
class Bind:
    """One bind mount: a host path at a container path."""

    host: Path
    container: str
    read_only: bool = False

    def spec(self) -> str:
        """``host:container[:ro]`` as apptainer ``--bind`` and podman/docker ``-v`` take it."""
        for part in (str(self.host), self.container):
            if _UNSAFE_BIND.search(part):
                raise ContainerError(f"cannot bind {part!r}: a bind path must not contain ':', ',' or newlines")
        return f"{self.host}:{self.container}" + (":ro" if self.read_only else "")


@dataclass(frozen=True)
class HostDirs:
    """Host-wide mount sources, from the host's configuration."""

    local_dir: Path | None = None
    """Node-local scratch, mounted at ``/local`` (created when missing): the launcher's scratch
    root when it has one (so what the scratch index holds is what containers see there)."""
    data_dir: Path | None = None
    """The cluster data root, mounted at ``/data`` when set."""


def parse_volume(text: str) -> Bind:
    """A module volume: ``host`` (same path inside), ``host:container`` or ``host:container:ro|rw``."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ContainerError(f"volume {text!r} is not HOST[:CONTAINER[:ro|rw]]")
    host = Path(parts[0])
    container = parts[1] if len(parts) > 1 and parts[1] else parts[0]
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw") or not host.is_absolute() or not container.startswith("/"):
        raise ContainerError(f"volume {text!r} is not /HOST[:/CONTAINER[:ro|rw]]")
    if not host.exists():
        raise ContainerError(f"volume {text!r}: {host} does not exist on this host")
    return Bind(host, container, mode == "ro")


def binds_for(spec: SessionSpec, host: HostDirs) -> list[Bind]:
    """The standard mounts plus the module's volumes."""
    binds = [
        Bind(spec.work_dir, WORK), Bind(spec.private_dir, SLOT_DIR),
        Bind(CONTAINER_BIN, HELPER_DIR, read_only=True), Bind(spec.code_path, APP_BIN, read_only=True),
    ]
    if host.local_dir is not None:
        ensure_root(host.local_dir)  # the default is private (0700); one given is checked as a root
        binds.append(Bind(host.local_dir, LOCAL))
    if host.data_dir is not None:
        if not host.data_dir.is_dir():
            raise ContainerError(f"data root {host.data_dir} (SCALEBOX_DATA_ROOT) does not exist")
        binds.append(Bind(host.data_dir, DATA))
    binds.extend(parse_volume(v) for v in spec.volumes)
    for b in binds:
        b.spec()  # validates early: a clear error at slot start, not at the first task
    return binds


class PathMap:
    """Host paths under a bind → their container paths (the longest host prefix wins), and back
    (the longest container prefix wins)."""

    def __init__(self, binds: Sequence[Bind], code_path: Path) -> None:
        self.binds = sorted(binds, key=lambda b: len(str(b.host)), reverse=True)
        self.inside = sorted(binds, key=lambda b: len(b.container.rstrip("/")), reverse=True)
        self.code_path = str(code_path)

    def to_container(self, path: str) -> str | None:
        """The container path of a host path, or None when no bind holds it."""
        for b in self.binds:
            root = str(b.host)
            if path == root:
                return b.container
            if path.startswith(root.rstrip("/") + "/"):
                return b.container.rstrip("/") + "/" + path[len(root.rstrip("/")) + 1:]
        return None

    def to_host(self, path: str) -> str | None:
        """The host path of an absolute container path (normalised first, so ``/work/../local/x``
        is ``/local/x``), or None when no bind holds it: the file exists only in the container."""
        if not path.startswith("/"):
            return None
        path = posixpath.normpath(path)
        for b in self.inside:
            inside = b.container.rstrip("/")
            if path == inside or (not inside and path == "/"):
                return str(b.host)
            if path.startswith(inside + "/"):
                return str(b.host / path[len(inside) + 1:])
        return None

    def argv(self, argv: Sequence[str]) -> list[str]:
        """Translate the script path (the first element under code_path); the arguments after it
        (task body, headers) are passed verbatim, never rewritten."""
        out = list(argv)
        root = self.code_path.rstrip("/") + "/"
        for i, arg in enumerate(out):
            if arg.startswith(root):
                out[i] = self.to_container(arg) or arg
                break
        return out

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        """The task's environment as the container sees it: host-only variables dropped, values
        that are host paths under a bind translated, PATH with the helper commands first."""
        out: dict[str, str] = {}
        for key, value in env.items():
            if key in HOST_ONLY_ENV or key.startswith(HOST_ONLY_PREFIXES) or not _ENV_NAME.match(key):
                continue
            mapped = self.to_container(value) if value.startswith("/") else None
            out[key] = mapped if mapped is not None else value
        out["PATH"] = CONTAINER_PATH
        return out


class Engine(Protocol):
    """How one container engine builds its command lines."""

    name: str

    def image_for(self, spec: SessionSpec) -> str:
        """The image argument for ``spec.image`` (building or converting it once if needed)."""
        ...

    def command(
        self, *, image: str, binds: Sequence[Bind], env: Mapping[str, str], cwd: str, argv: Sequence[str],
        name: str, options: Sequence[str], host_env: Mapping[str, str],
    ) -> tuple[list[str], dict[str, str]]:
        """The host argv and the host environment that run ``argv`` in a container."""
        ...

    def discard(self, name: str, grace: float) -> None:
        """Stop and remove the named container if the engine keeps one (no-op for Apptainer)."""
        ...

    def containers(self, prefix: str) -> list[str]:
        """Names of the engine's containers, running or not, that start with ``prefix`` ([] for
        Apptainer, which keeps none)."""
        ...

    def remove(self, names: Sequence[str]) -> None:
        """Kill and remove the named containers at once (no-op for Apptainer)."""
        ...


class ContainerRun(LocalRun):
    """A per-task container run: the engine's client process, plus the container behind it (and
    the task's request directory, removed when the run ends)."""

    def __init__(self, proc: subprocess.Popen[bytes], discard: Callable[[float], None],
                 served: RequestDir | None = None) -> None:
        super().__init__(proc)
        self._discard = discard
        self.served = served

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Wait up to ``timeout`` seconds; None while still running."""
        outcome = super().wait(timeout)
        if outcome is not None:
            unserve(self.served)
            self.served = None
        return outcome

    def kill(self, grace: float = 5.0) -> Outcome:
        """Stop the container (its whole PID namespace, for podman/docker), then the client's tree."""
        try:
            self._discard(grace)
            return super().kill(grace)
        finally:
            unserve(self.served)
            self.served = None


def serve(spec: RunSpec, private_dir: Path) -> tuple[RunSpec, RequestDir | None]:
    """For the run of a task (TASK_ID and the launcher's socket in its environment): its request
    directory in the slot's private dir (started), and ``spec`` with the directory's path in the
    environment instead of the socket's, which the container does not have."""
    env = spec.env
    socket_path, task = env.get(taskapi.SERVICES_ENV, ""), env.get("TASK_ID", "")
    if not socket_path or not task.isdigit():
        return spec, None
    served = RequestDir(private_dir, socket_asker(socket_path), int(task), env.get("APP_ID", "")).start()
    env = {k: v for k, v in env.items() if k != taskapi.SERVICES_ENV}
    env[taskapi.SERVICES_DIR_ENV] = str(served.path)
    return dataclasses.replace(spec, env=env), served


def unserve(served: RequestDir | None) -> None:
    """Stop ``served`` (when there is one)."""
    if served is not None:
        served.stop()


_counter = itertools.count(1)
_OWNED = re.compile(r"(\d+)-([0-9a-z]+)-\d+")


def container_prefix(spec: SessionSpec) -> str:
    """``sbx-SLOT-``: what every container name of the slot starts with, and only its. The slot's
    name in safe characters; a name that had to be changed or shortened gets a hash of itself,
    so two slots never share a prefix (the sweep removes by prefix)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", spec.name)
    if safe != spec.name or len(safe) > 64:
        safe = f"{safe[:52]}-{hashlib.sha256(spec.name.encode()).hexdigest()[:10]}"
    return f"sbx-{safe}-"


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def owner_tag(owner: fence.Proc | None = None) -> str:
    """``PID-START``: the launcher process (its pid and start time in base 36), unique per
    launcher process and checkable: a later process with the same pid has another start."""
    me = owner or fence.this_process()
    return f"{me.pid}-{_base36(round(me.start * 100))}"


def container_name(spec: SessionSpec) -> str:
    """``sbx-SLOT-PID-START-N``: the slot's prefix, this launcher's :func:`owner_tag` and a
    counter, so a new launcher never reuses a name its killed predecessor's container still holds."""
    return f"{container_prefix(spec)}{owner_tag()}-{next(_counter)}"


def _live_owner(name: str, prefix: str) -> int | None:
    """The pid of the live launcher *other than this one* that owns the container ``name``, or
    None when its owner is gone, is this launcher, or cannot be told (an older name format)."""
    match = _OWNED.fullmatch(name[len(prefix):])
    if match is None:
        return None
    pid = int(match.group(1))
    if pid == os.getpid():
        return None  # ours, from a session of this slot that was never closed: stale too
    owner = fence.Proc.of(pid)
    return pid if owner is not None and owner_tag(owner) == f"{pid}-{match.group(2)}" else None


def sweep_containers(engine: Engine, spec: SessionSpec) -> list[str]:
    """Remove (``rm -f``) the slot's containers that a launcher which is gone left behind (a
    kill -9 leaves a warm container running until its current run ends); those of another live
    launcher are reported and kept. Returns the names removed."""
    prefix = container_prefix(spec)
    names = [n for n in engine.containers(prefix) if n.startswith(prefix)]
    stale: list[str] = []
    kept: list[str] = []
    for n in names:
        owner = _live_owner(n, prefix)
        (stale if owner is None else kept).append(n)
    for n in kept:
        logger.error("slot %s: container %s belongs to a live launcher (pid %s): kept; two launchers must not "
                     "share a slot", spec.name, n, _live_owner(n, prefix))
    if stale:
        engine.remove(stale)
        logger.warning("slot %s: removed %d %s container(s) a previous launcher left: %s", spec.name, len(stale),
                       engine.name, ", ".join(stale))
    return stale


class ContainerSession:
    """What every container session of a slot holds: its engine, image, mounts (with the
    host/container path map) and the engine client's environment."""

    def __init__(
        self, engine: Engine, spec: SessionSpec, image: str, binds: Sequence[Bind], host_env: Mapping[str, str],
    ) -> None:
        self.engine = engine
        self.spec = spec
        self.image = image
        self.binds = list(binds)
        self.paths = PathMap(binds, spec.code_path)
        self.host_env = dict(host_env)

    def host_path(self, path: str) -> str | None:
        """Where a path a run reported (``/local/x``, ``/work/x``, or relative to the work dir)
        is on the host; None for a path only the container has."""
        if not path.startswith("/"):
            return path  # relative to the cwd: the work dir, the same directory on both sides
        return self.paths.to_host(path)


class PerTaskSession(ContainerSession):
    """One container per script run (``slot_options: [container_per_task]``)."""

    def start(self, spec: RunSpec) -> ContainerRun:
        """Run ``spec.argv`` in a fresh container; output goes to the spec's files on the host."""
        name = container_name(self.spec)
        spec, served = serve(spec, self.spec.private_dir)
        cmd, env = self.engine.command(
            image=self.image, binds=self.binds, env=self.paths.env(spec.env),
            cwd=self.paths.to_container(str(spec.cwd)) or WORK, argv=self.paths.argv(spec.argv),
            name=name, options=self.spec.options, host_env=self.host_env,
        )
        try:
            proc = popen(cmd, cwd=spec.cwd, env=env, stdout_path=spec.stdout_path, stderr_path=spec.stderr_path)
        except BaseException:
            unserve(served)
            raise
        run = ContainerRun(proc, lambda grace: self.engine.discard(name, grace), served)
        # apptainer's starter forks the container's processes and waits for them: its rusage is
        # the run's. A podman/docker client's container runs under conmon, not under us: what
        # wait4 sees is the client's own CPU, so nothing is reported rather than a wrong number
        run.measures_usage = self.engine.name == "apptainer"
        run.record(self.spec.private_dir, f"{spec.stdout_path.stem} of {self.spec.name} in container {name}")
        return run

    def close(self) -> None:
        """Nothing outlives a run."""

"""Podman and Docker: the same ``run`` command line, different executables."""

from __future__ import annotations

import logging
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from scalebox_hpc.errors import ContainerError
from scalebox_hpc.runtime.base import SessionSpec
from scalebox_hpc.runtime.container import Bind
from scalebox_hpc.runtime.images import _run, definition_key, exclusive, find_definition, prepare_context
from scalebox_hpc.runtime.paths import ensure_root, per_user_root
from scalebox_hpc.settings import environ_containers

logger = logging.getLogger(__name__)


class EngineCli:
    """``podman run`` / ``docker run`` command lines and image handling. ``containers``: the
    definition dirs searched first (default: SCALEBOX_CONTAINERS of this process's environment,
    for a caller without settings; the launcher passes its settings')."""

    def __init__(
        self, engine: str, exe: str, lock_dir: Path | None = None, *, containers: Sequence[Path] | None = None,
    ) -> None:
        if engine not in ("podman", "docker"):
            raise ValueError(f"unknown engine {engine!r}")
        self.name = engine
        self.exe = exe
        self.definition_dirs = tuple(environ_containers() if containers is None else containers)
        # under the per-user root (0700, checked): a shared /tmp name let anyone hold the lock (F8)
        self.lock_dir = lock_dir or per_user_root() / f"{engine}-locks"

    def image_for(self, spec: SessionSpec) -> str:
        """A local image name: as given, ``docker://`` stripped, or built from ``containers/NAME.Dockerfile``."""
        assert spec.image is not None
        ref = spec.image
        if ref.endswith(".sif"):
            raise ContainerError(f"image {ref!r}: {self.name} cannot run a SIF image (use runtime: apptainer)")
        if ref.startswith("docker://"):
            ref = ref.removeprefix("docker://")
        if ref.startswith(("docker-archive:", "oci-archive:")):
            return ref
        definition = find_definition(ref, spec.code_path, ".Dockerfile", configured=self.definition_dirs)
        if definition is not None:
            return self._built(definition)
        if self._exists(ref):
            return ref
        raise ContainerError(
            f"image {ref!r} not found: not a local {self.name} image and no containers/{ref}.Dockerfile "
            f"in $SCALEBOX_CONTAINERS or above {spec.code_path}"
        )

    def _exists(self, ref: str) -> bool:
        # the reference comes from the module's base_image: after `--`, never taken for an option
        argv = [self.exe, "image", "exists" if self.name == "podman" else "inspect", "--", ref]
        try:
            return subprocess.run(argv, capture_output=True, timeout=60, check=False).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _built(self, definition: Path) -> str:
        tag = f"localhost/scalebox/{definition.name.removesuffix('.Dockerfile').lower()}:{definition_key(definition)}"
        if self._exists(tag):
            return tag
        with exclusive(ensure_root(self.lock_dir) / f"{tag.rsplit('/', 1)[1].replace(':', '-')}.lock"):
            if self._exists(tag):
                return tag
            with tempfile.TemporaryDirectory(prefix="scalebox-build-") as tmp:
                prepare_context(definition, Path(tmp))
                _run([self.exe, "build", "-q", "--network", "none", "-t", tag, "-f", definition.name, "."],
                     cwd=Path(tmp), what=f"{self.name} build of {definition}")
        return tag

    def command(
        self, *, image: str, binds: Sequence[Bind], env: Mapping[str, str], cwd: str, argv: Sequence[str],
        name: str, options: Sequence[str], host_env: Mapping[str, str],
    ) -> tuple[list[str], dict[str, str]]:
        """``ENGINE run --rm --init --name NAME --network host -w CWD -v ... -e PATH=... -e K ... -- IMAGE ARGV``.

        Values other than PATH's are not in the argv (``-e K`` takes the value from the client's
        environment): a DSN with a password never shows in the process table."""
        cmd = [self.exe, "run", "--rm", "--init", "--name", name, "--network", "host",
               "--security-opt", "label=disable", "-w", cwd]
        for b in binds:
            cmd += ["-v", b.spec()]
        if any(o in ("gpu", "nv") for o in options):
            cmd += ["--device", "nvidia.com/gpu=all"] if self.name == "podman" else ["--gpus", "all"]
        proc_env = dict(host_env)
        for key, value in env.items():
            if key == "PATH":  # the client itself needs the host's PATH
                cmd += ["-e", f"PATH={value}"]
            else:
                cmd += ["-e", key]
                proc_env[key] = value
        return [*cmd, "--", image, *argv], proc_env  # `--`: an image named like an option stays the image

    def discard(self, name: str, grace: float) -> None:
        """Stop (TERM, KILL after ``grace``) and remove the container: its whole PID namespace ends."""
        t = str(max(0, int(grace)))
        steps = [[self.exe, "rm", "-f", "-t", t, name]] if self.name == "podman" else \
            [[self.exe, "stop", "-t", t, name], [self.exe, "rm", "-f", name]]
        for argv in steps:
            try:
                subprocess.run(argv, capture_output=True, timeout=grace + 30, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                logger.warning("%s: %s", " ".join(argv[:3]), exc)

    def containers(self, prefix: str) -> list[str]:
        """Names of containers (running or not) whose name contains ``prefix`` (the engine's name
        filter is a regular expression: the caller keeps those that start with it)."""
        argv = [self.exe, "ps", "-a", "--no-trunc", "--filter", f"name={prefix}", "--format", "{{.Names}}"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            logger.warning("%s ps: cannot list containers %s*: %s", self.name, prefix, exc)
            return []
        if proc.returncode != 0:
            logger.warning("%s ps: cannot list containers %s* (exit %d): %s", self.name, prefix, proc.returncode,
                           proc.stderr.strip()[-300:])
            return []
        return [line.strip() for line in proc.stdout.splitlines() if line.strip()]

    def remove(self, names: Sequence[str]) -> None:
        """Kill and remove the containers (``rm -f``; Podman: no stop timeout), one by one: Podman
        4.3 given a name that is already gone removes none of the others (and exits 0)."""
        for name in names:
            argv = [self.exe, "rm", "-f", *(["-t", "0"] if self.name == "podman" else []), "--", name]
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                logger.warning("%s rm -f %s: %s", self.name, name, exc)
                continue
            if proc.returncode != 0:
                logger.warning("%s rm -f %s (exit %d): %s", self.name, name, proc.returncode,
                               proc.stderr.strip()[-300:])

"""Per-module runtime choice: the module's ``runtime:``, else the host's default, ``auto`` = what is installed."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from scalebox_hpc.errors import ContainerError
from scalebox_hpc.runtime import fence
from scalebox_hpc.runtime.apptainer import ApptainerEngine
from scalebox_hpc.runtime.base import Session, SessionSpec
from scalebox_hpc.runtime.container import Engine, HostDirs, PerTaskSession, binds_for, sweep_containers
from scalebox_hpc.runtime.images import SifCache
from scalebox_hpc.runtime.local import LocalRuntime
from scalebox_hpc.runtime.podman import EngineCli
from scalebox_hpc.runtime.warm import WarmSession

logger = logging.getLogger(__name__)

ENGINES = ("apptainer", "podman", "docker")
RUNTIMES = ("local", *ENGINES, "auto")
PER_TASK_OPTION = "container_per_task"
"""``slot_options`` entry: a new container per script run instead of a warm slot container."""


class RuntimeChooser:
    """Opens each slot's session with the runtime its module asks for.

    A module without ``base_image`` runs bare (``local``) unless it names an engine (an error:
    nothing to run it in). With ``base_image`` and no ``runtime:`` the host's default applies.
    """

    name = "chooser"

    def __init__(
        self, default: str = "auto", *, host: HostDirs | None = None, sif_cache: Path | None = None,
        host_env: Mapping[str, str] | None = None, which: Callable[[str], str | None] = shutil.which,
        containers: Sequence[Path] | None = None,
    ) -> None:
        self.default = default.strip().lower() or "auto"
        if self.default not in RUNTIMES:
            raise ContainerError(f"unknown default runtime {default!r} (SCALEBOX_RUNTIME): use one of {RUNTIMES}")
        self.host = host or HostDirs()
        self.sif_cache = sif_cache
        # None: the engines read SCALEBOX_CONTAINERS themselves (a chooser built without settings)
        self.containers = None if containers is None else tuple(containers)
        self.host_env = dict(os.environ if host_env is None else host_env)
        self.which = which
        self.local = LocalRuntime()
        self._engines: dict[str, Engine] = {}

    def pick(self, spec: SessionSpec) -> str:
        """The runtime name for ``spec`` (``auto`` resolved)."""
        wanted = (spec.runtime or "").strip().lower()
        if not wanted:
            wanted = self.default if spec.image else "local"
        if wanted not in RUNTIMES:
            raise ContainerError(f"unknown runtime {spec.runtime!r}: use one of {', '.join(RUNTIMES)}")
        if wanted == "auto":
            for engine in ENGINES:
                if self.which(engine):
                    return engine
            raise ContainerError("runtime auto: none of apptainer, podman, docker is installed on this host")
        return wanted

    def engine(self, name: str) -> Engine:
        """The engine called ``name``; ContainerError when its executable is not installed."""
        if name not in self._engines:
            exe = self.which(name)
            if exe is None:
                raise ContainerError(f"container runtime {name!r} is not installed on this host (no `{name}` on PATH)")
            self._engines[name] = (
                ApptainerEngine(exe, SifCache(exe, self.sif_cache, containers=self.containers)) if name == "apptainer"
                else EngineCli(name, exe, containers=self.containers)
            )
        return self._engines[name]

    def open(self, spec: SessionSpec) -> Session:
        """The slot's session: bare, one container per run, or a warm slot container."""
        name = self.pick(spec)
        if name == "local":
            return self.local.open(spec)
        if not spec.image:
            raise ContainerError(f"runtime {name} needs a base_image for module slot {spec.name}")
        engine = self.engine(name)
        image = engine.image_for(spec)
        binds = binds_for(spec, self.host)
        # what a killed launcher left on this slot ends first: its containers, then its processes
        sweep_containers(engine, spec)
        fence.sweep(spec.private_dir, spec.name)
        if PER_TASK_OPTION in spec.options:
            return PerTaskSession(engine, spec, image, binds, self.host_env)
        return WarmSession(engine, spec, image, binds, self.host_env)

"""The Apptainer engine: ``apptainer exec`` with ``--bind``, ``--env``, ``--pwd`` (``--nv``, ``--containall``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from scalebox_hpc.runtime.base import SessionSpec
from scalebox_hpc.runtime.container import Bind
from scalebox_hpc.runtime.images import SifCache

logger = logging.getLogger(__name__)

GPU_OPTIONS = ("gpu", "nv")
"""``slot_options`` entries that add ``--nv``."""


class ApptainerEngine:
    """Builds ``apptainer exec`` command lines; images come from a :class:`SifCache`."""

    name = "apptainer"

    def __init__(self, exe: str, cache: SifCache | None = None) -> None:
        self.exe = exe
        self.cache = cache or SifCache(exe)

    def image_for(self, spec: SessionSpec) -> str:
        """The SIF (or sandbox) for the module's ``base_image``, converted or built once."""
        assert spec.image is not None
        return str(self.cache.resolve(spec.image, spec.code_path))

    def command(
        self, *, image: str, binds: Sequence[Bind], env: Mapping[str, str], cwd: str, argv: Sequence[str],
        name: str, options: Sequence[str], host_env: Mapping[str, str],
    ) -> tuple[list[str], dict[str, str]]:
        """``apptainer -s exec --cleanenv --no-eval --pwd CWD --bind ... --env PATH=... -- IMAGE ARGV``.

        Only PATH is an ``--env`` argument; every other variable travels as ``APPTAINERENV_K`` in
        the client's environment: values (a DSN with a password, say) never show in the process
        table, and arrive byte for byte (``--env`` parses CSV). ``--no-eval`` keeps ``$`` literal.
        ``name`` is unused: Apptainer keeps no container to remove."""
        cmd = [self.exe, "-s", "exec", "--cleanenv", "--no-eval", "--pwd", cwd]
        for b in binds:
            cmd += ["--bind", b.spec()]
        if any(o in GPU_OPTIONS for o in options):
            cmd.append("--nv")
        if "containall" in options:
            cmd.append("--containall")
        proc_env = {k: v for k, v in host_env.items() if not k.startswith(("APPTAINERENV_", "SINGULARITYENV_"))}
        for key, value in env.items():
            if key == "PATH":
                cmd += ["--env", f"PATH={value}"]
            else:
                proc_env[f"APPTAINERENV_{key}"] = value
        return [*cmd, "--", image, *argv], proc_env

    def discard(self, name: str, grace: float) -> None:
        """Nothing to remove: the container is the process tree, killed by the caller."""

    def containers(self, prefix: str) -> list[str]:
        """Apptainer keeps no named containers: a killed launcher's are ended through run records."""
        return []

    def remove(self, names: Sequence[str]) -> None:
        """Nothing to remove."""

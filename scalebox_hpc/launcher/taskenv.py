"""What of the launcher's environment a task's scripts see: an allow-list, not all of it.

A launcher holds what its scripts must not (audit F5): the DSN and PG* variables, cloud and
Slurm tokens, whatever the user's shell exported. A script gets the variables that describe
the place it runs in (paths, locale, the Slurm allocation, MPI and GPU bindings, the software
modules loaded), the documented task variables and the module's own ``environments``, which a
pipeline uses to pass anything else on purpose. A site or user may name more with
``SCALEBOX_PASS_ENV=NAME,NAME...``; credentials are never passed whatever it says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from scalebox_hpc.settings import Settings

PASS_ENV = "SCALEBOX_PASS_ENV"  # noqa: S105 (a variable name, not a password)

ALLOWED = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ", "TMPDIR", "HOSTNAME",
    # software stacks: environment modules / Lmod and what `module load` sets
    "LD_LIBRARY_PATH", "LIBRARY_PATH", "CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH", "MANPATH",
    "PKG_CONFIG_PATH", "CMAKE_PREFIX_PATH", "MODULEPATH", "LOADEDMODULES", "_LMFILES_", "MODULESHOME",
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV",
    # threads and devices the allocation gives
    "OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ZE_AFFINITY_MASK",
})
ALLOWED_PREFIXES = ("LC_", "SLURM_", "PMI_", "PMIX_", "MPICH_", "HYDRA_", "I_MPI_", "OMPI_MCA_", "LMOD_",
                    "APPTAINER_", "SINGULARITY_")
"""Whole families: the Slurm job and step, the MPI wire-up, the container engine's settings."""

_SECRET = re.compile(r"(PASS|SECRET|TOKEN|CREDENTIAL|PRIVATE|AUTH|COOKIE|_KEY\b|^KEY\b|API_?KEY)", re.IGNORECASE)
_NEVER = re.compile(r"^(PG[A-Z]*|SCALEBOX_DSN|SLURM_JWT|SBX_.*PASS.*)$")


def never_passed(name: str) -> bool:
    """A variable a script never gets, even when named in SCALEBOX_PASS_ENV: the database's
    and anything that looks like a credential (…PASSWORD, …TOKEN, …SECRET, …_KEY, SLURM_JWT)."""
    return bool(_NEVER.match(name) or _SECRET.search(name))


def passed(name: str, extra: frozenset[str] = frozenset()) -> bool:
    """Whether the launcher's variable ``name`` reaches a script."""
    if never_passed(name):
        return False
    return name in ALLOWED or name in extra or name.startswith(ALLOWED_PREFIXES)


def script_base_env(environ: Mapping[str, str], pass_env: frozenset[str] | None = None) -> dict[str, str]:
    """The part of the launcher's environment ``environ`` a script starts from: the allow-list and
    ``pass_env`` (default: the SCALEBOX_PASS_ENV of ``environ``, as :class:`Settings` reads it)."""
    extra = Settings.of(environ).pass_env if pass_env is None else pass_env
    return {k: v for k, v in environ.items() if passed(k, extra)}

"""Load and validate pipeline files (``app.yaml``) into frozen, JSON-round-trippable specs.

A pipeline file names an app and its modules (Scalebox style)::

    name: app-primes
    parameters: {start_task: start}
    modules:
      scatter: {sink_modules: [calc]}
      calc:
        sink_modules: [gather]
        environments: [LENGTH=${LENGTH}]
        slots: [".*:2"]
      gather: {}

:func:`load_pipeline` reads the file with ``yaml.compose`` so that every error names
``file:line: key.path``, substitutes ``${VAR}`` / ``${VAR:-default}`` from env files and the
environment, accepts the 2023 aliases (``jobs``, ``sink_jobs``, ``hosts`` ...), resolves each
module's ``code_path`` and checks that it holds a ``run.sh``. YAML aliases are expanded, but a
file that expands to more than :data:`MAX_YAML_NODES` nodes or :data:`MAX_YAML_DEPTH` levels, or
whose anchors contain themselves, is refused (files from others may be validated, ``app create --check``).

The models themselves never touch the filesystem: launchers on other hosts re-validate the
stored specs with ``ModuleSpec.model_validate(data)``.

The code is split by concern: :mod:`.parameters` and :mod:`.slurm` (option models),
:mod:`.spec` (``ModuleSpec``, ``AppSpec``), :mod:`.variables` (``${VAR}``, env files),
:mod:`.yaml_lines` (YAML with line marks, allowed keys, bounds) and :mod:`.load` (the loader).
Every public name is re-exported here: import from ``scalebox_hpc.pipeline``.
"""

from __future__ import annotations

from scalebox_hpc.pipeline.load import DATA_SOURCE, STANDARD_MODULES, STANDARD_PREFIX, load_pipeline, load_pipeline_data
from scalebox_hpc.pipeline.parameters import (
    AppParameters,
    ModuleArguments,
    ModuleParameters,
    SlotSpec,
    parse_slot,
)
from scalebox_hpc.pipeline.slurm import ClusterSpec, SlurmSpec, walltime_seconds
from scalebox_hpc.pipeline.spec import AppSpec, ModuleSpec, MpiSpec
from scalebox_hpc.pipeline.variables import DEFAULT_ENV_FILE, expand, read_env_file
from scalebox_hpc.pipeline.yaml_lines import MAX_YAML_DEPTH, MAX_YAML_NODES, _Path, _Reader, did_you_mean

__all__ = [
    "DATA_SOURCE",
    "DEFAULT_ENV_FILE",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "STANDARD_MODULES",
    "STANDARD_PREFIX",
    "AppParameters",
    "AppSpec",
    "ClusterSpec",
    "ModuleArguments",
    "ModuleParameters",
    "ModuleSpec",
    "MpiSpec",
    "SlotSpec",
    "SlurmSpec",
    "_Path",
    "_Reader",
    "did_you_mean",
    "expand",
    "load_pipeline",
    "load_pipeline_data",
    "parse_slot",
    "read_env_file",
    "walltime_seconds",
]

"""The sbatch script of a stage job: ``#SBATCH`` directives from a module's ``slurm:`` settings,
rendered into a template a site can copy and edit (``launchers/slurm/stage.sbatch``).

Pure functions: no Slurm call, no database. Values end up in ``#SBATCH`` lines (which sbatch
parses itself, without a shell) or shell-quoted in the script body.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.pipeline import SlurmSpec

TEMPLATE_NAME = "stage.sbatch"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Z_]+)\s*\}\}")
_SAFE_VALUE = re.compile(r"[^\s#'\"\\]+")
PLACEHOLDERS = frozenset({"SBATCH_DIRECTIVES", "SRUN_OPTIONS", "APP_ID", "MODULE", "WORK_ROOT", "LAUNCHER"})


class StageScriptError(ScaleboxError):
    """The stage job script cannot be rendered (bad template or a value sbatch would misread)."""

    hint = "check the module's slurm: settings and the template (`scalebox stage script MODULE` shows it)"


def default_template() -> Path:
    """The shipped template: inside the wheel, else in the source tree's ``launchers/slurm``."""
    packaged = Path(__file__).resolve().parent.parent / "templates" / TEMPLATE_NAME
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "launchers" / "slurm" / TEMPLATE_NAME


@dataclass(frozen=True)
class StageJob:
    """What one stage job runs: the module of an app, with which launcher command."""

    app_id: int
    module: str
    slurm: SlurmSpec
    slots_per_node: int
    work_root: Path
    launcher: Sequence[str]
    """The command srun starts on every node (argv), e.g. ``python -m scalebox_hpc launcher --stage-job``."""
    ranks_per_node: int | None = None
    """An MPI stage (farm/collective): srun starts this many ranks per node (``--mpi=pmi2``),
    one CPU slot each, instead of one launcher per node."""

    @property
    def srun_options(self) -> list[str]:
        """One launcher per node (a failing node does not end the others), or the MPI ranks."""
        if self.ranks_per_node is not None:
            return ["--mpi=pmi2", "--kill-on-bad-exit=1"]
        return ["--kill-on-bad-exit=0"]

    @property
    def job_name(self) -> str:
        """``sbx-<app>-<module>``: what squeue shows."""
        return f"sbx-{self.app_id}-{self.module}"

    @property
    def log_dir(self) -> Path:
        """Where the jobs' stdout/stderr go (one file per job)."""
        return self.work_root / f"app-{self.app_id}" / "slurm"


def directives(job: StageJob) -> list[str]:
    """The sbatch options of the job, in a fixed order (``--name=value``)."""
    spec = job.slurm
    per_node, cpus = (1, job.slots_per_node * spec.cpus_per_slot) if job.ranks_per_node is None \
        else (job.ranks_per_node, spec.cpus_per_slot)
    opts = [
        f"--job-name={job.job_name}",
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={per_node}",
        f"--cpus-per-task={cpus}",
        f"--signal=B:USR1@{spec.signal_grace_seconds}",
        f"--output={job.log_dir / (job.module + '-%j.out')}",
    ]
    for name in ("time", "mem", "gres", "partition", "account", "qos", "constraint"):
        value = getattr(spec, name)
        if value is not None:
            opts.append(f"--{name}={value}")
    opts += spec.extra_sbatch_args
    for opt in opts:
        if not _SAFE_VALUE.fullmatch(opt):
            raise StageScriptError(f"sbatch option {opt!r} has whitespace or quotes, which #SBATCH lines cannot carry")
    return opts


def render(template: str, job: StageJob) -> str:
    """The job script: ``template`` with its ``{{PLACEHOLDER}}``s filled in."""
    values = {
        "SBATCH_DIRECTIVES": "\n".join(f"#SBATCH {opt}" for opt in directives(job)),
        "APP_ID": str(job.app_id),
        "MODULE": shlex.quote(job.module),
        "WORK_ROOT": shlex.quote(str(job.work_root)),
        "LAUNCHER": shlex.join(job.launcher),
        "SRUN_OPTIONS": shlex.join(job.srun_options),
    }
    found = set(_PLACEHOLDER.findall(template))
    unknown = found - PLACEHOLDERS
    if unknown:
        raise StageScriptError(f"unknown placeholder(s) in the sbatch template: {', '.join(sorted(unknown))}")
    for required in ("SBATCH_DIRECTIVES", "LAUNCHER"):
        if required not in found:
            raise StageScriptError(f"the sbatch template lacks {{{{{required}}}}}")
    if not template.startswith("#!"):
        raise StageScriptError("the sbatch template must start with a #! line")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def read_template(path: str | Path | None) -> str:
    """The template text (``None``: the shipped one); a missing file is a StageScriptError."""
    file = Path(path) if path is not None else default_template()
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StageScriptError(f"cannot read the sbatch template {file}: {exc}") from exc

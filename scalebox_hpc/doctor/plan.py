"""What a pipeline asks of the site, as the doctor checks it: per cluster the partitions,
accounts and QOS its modules name, the container engines their images need, and one probe job
per distinct (cluster, partition, account, QOS, constraint) its stage jobs would run under.

Pure: module specs and settings in, a :class:`Plan` out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scalebox_hpc.pipeline import ModuleSpec


@dataclass
class SlurmTarget:
    """One cluster's Slurm: how to reach it and what the pipeline names on it."""

    cluster: str = ""
    """'' = the submitting host's default cluster."""
    submit_via: tuple[str, ...] = ()
    partitions: list[str] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    qos: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The cluster's name for the output ('' for the default one)."""
        return self.cluster


@dataclass
class ProbeTarget:
    """One probe job: where it runs (the stage jobs' placement) and what it tries there."""

    cluster: str = ""
    submit_via: tuple[str, ...] = ()
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gres: str | None = None
    """The first GPU gres a module of this placement asks for: the probe asks for it too, or it sees no GPU."""
    scratch: str | None = None
    engine: str | None = None
    image: str | None = None
    code_path: Path | None = None
    gpu: bool = False
    mpi: bool = False

    @property
    def label(self) -> str:
        """``cluster/partition`` (parts left out when default)."""
        parts = [p for p in (self.cluster, self.partition or "") if p]
        return "/".join(parts) or "default partition"

    @property
    def key(self) -> tuple[str, str | None, str | None, str | None, str | None]:
        """The placement: modules sharing it share one probe."""
        return self.cluster, self.partition, self.account, self.qos, self.constraint


@dataclass
class Plan:
    """Everything the doctor checks for one pipeline (or for none: the site's defaults)."""

    targets: list[SlurmTarget]
    probes: list[ProbeTarget]
    engines: list[str]
    """Engine names the images need (``auto`` resolved on this host when possible)."""
    source: str = ""
    """What the plan comes from (the pipeline file, ``app N``), for the output."""


def module_engine(spec: ModuleSpec, default: str) -> str | None:
    """The runtime a module's slots use: its ``runtime:``, else the host default; None when it runs bare."""
    wanted = (spec.arguments.runtime or (default if spec.base_image else "local")).strip().lower() or "auto"
    return None if wanted == "local" or not spec.base_image else wanted


def resolve_auto(engine: str, which: Callable[[str], str | None]) -> str:
    """``auto`` as the runtime chooser resolves it on this host (unchanged when nothing is installed)."""
    from scalebox_hpc.runtime.choose import ENGINES

    if engine != "auto":
        return engine
    return next((e for e in ENGINES if which(e)), engine)


def make_plan(
    modules: Sequence[ModuleSpec], *, partitions: Iterable[str] = (), runtime_default: str = "auto",
    which: Callable[[str], str | None], source: str = "",
) -> Plan:
    """The plan of these modules; ``partitions`` (``--partition``) are checked and probed on the
    default cluster besides. No module and no partition: one probe on the default partition."""
    targets: dict[str, SlurmTarget] = {}
    probes: dict[tuple[str, str | None, str | None, str | None, str | None], ProbeTarget] = {}
    engines: list[str] = []
    for spec in modules:
        slurm = spec.slurm
        cluster = slurm.cluster or ""
        target = targets.setdefault(cluster, SlurmTarget(cluster, tuple(slurm.submit_via)))
        for wanted, have in ((slurm.partition, target.partitions), (slurm.account, target.accounts),
                             (slurm.qos, target.qos)):
            if wanted and wanted not in have:
                have.append(wanted)
        engine = module_engine(spec, runtime_default)
        if engine is not None:
            engine = resolve_auto(engine, which)
            if engine not in engines:
                engines.append(engine)
        probe = ProbeTarget(cluster, tuple(slurm.submit_via), slurm.partition, slurm.account, slurm.qos,
                            slurm.constraint, scratch=slurm.local_scratch)
        probe = probes.setdefault(probe.key, probe)
        if engine is not None and probe.image is None:
            probe.engine, probe.image, probe.code_path = engine, spec.base_image, spec.code_path
        if slurm.gres and "gpu" in slurm.gres.lower():
            probe.gpu = True
            probe.gres = probe.gres or slurm.gres
        probe.mpi = probe.mpi or spec.mpi.mode is not None
    default = targets.setdefault("", SlurmTarget()) if partitions or not modules else None
    for name in partitions:
        assert default is not None
        if name not in default.partitions:
            default.partitions.append(name)
        probes.setdefault(("", name, None, None, None), ProbeTarget(partition=name))
    if not probes:
        probes[("", None, None, None, None)] = ProbeTarget()
    return Plan(list(targets.values()), list(probes.values()), engines, source)

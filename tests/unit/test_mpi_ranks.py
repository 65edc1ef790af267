"""The ``ranks`` task header (audit F19): honoured only by modules with ``mpi.ranks`` and bounded
by ``mpi.max_ranks``, the Slurm allocation, or the host's CPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from scalebox_hpc.errors import InvalidMessageError, PipelineError
from scalebox_hpc.launcher import mpirun
from scalebox_hpc.launcher.mpirun import allocation_ranks, check_ranks, task_ranks, wrap
from scalebox_hpc.pipeline import ModuleSpec, MpiSpec, load_pipeline

ARGV = ["/app/run.sh", "body", "{}"]
SLURM = {"SLURM_JOB_ID": "7"}


def spec(**mpi_keys: object) -> ModuleSpec:
    return ModuleSpec.model_validate({"name": "sim", "code_path": "/x", "mpi": mpi_keys})


@pytest.fixture
def cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with 4 CPUs."""
    monkeypatch.setattr(mpirun.os, "cpu_count", lambda: 4)


def test_ordinary_modules_ignore_the_header() -> None:
    for headers in ({"ranks": 100000}, {"ranks": "many"}, {"ranks": -1}, {"ranks": True}):
        assert task_ranks(spec(), headers) is None
        assert wrap(spec(), headers, ARGV, SLURM) is ARGV
    farm = ModuleSpec.model_validate({"name": "f", "code_path": "/x", "mpi": {"mode": "farm"}})
    assert wrap(farm, {"ranks": 8}, ARGV, {}) is ARGV  # a farm run as plain slots stays plain


def test_header_up_to_the_declared_ranks() -> None:
    assert task_ranks(spec(ranks=8), {}) == 8
    assert task_ranks(spec(ranks=8), {"ranks": ""}) == 8
    assert task_ranks(spec(ranks=8), {"ranks": " 2 "}) == 2
    assert task_ranks(spec(ranks=8), {"ranks": 8}) == 8
    with pytest.raises(InvalidMessageError, match=r"asks for 9 MPI ranks; module sim allows at most 8 "
                                                  r"\(mpi.max_ranks, default mpi.ranks\)"):
        task_ranks(spec(ranks=8), {"ranks": 9})
    with pytest.raises(InvalidMessageError, match="allows at most 8"):
        task_ranks(spec(ranks=8), {"ranks": "100000"})


def test_max_ranks_raises_the_cap() -> None:
    assert task_ranks(spec(ranks=2, max_ranks=16), {"ranks": "16"}) == 16
    assert task_ranks(spec(ranks=2, max_ranks=16), {}) == 2
    with pytest.raises(InvalidMessageError, match=r"allows at most 16 \(mpi.max_ranks\)"):
        task_ranks(spec(ranks=2, max_ranks=16), {"ranks": 17})


@pytest.mark.parametrize("raw", ["many", 0, -3, "0", "-3", "+3", "3.0", 2.0, True, "٣", "1_0", [2], {"n": 2}])
def test_malformed_headers(raw: object) -> None:
    with pytest.raises(InvalidMessageError, match="header ranks must be a positive integer"):
        task_ranks(spec(ranks=8), {"ranks": raw})


def test_huge_header_is_refused_without_converting_it() -> None:
    with pytest.raises(InvalidMessageError, match="is too large"):
        task_ranks(spec(ranks=8), {"ranks": "9" * 10000})
    with pytest.raises(InvalidMessageError, match="allows at most 8"):
        task_ranks(spec(ranks=8), {"ranks": 10**30})


def test_max_ranks_validation() -> None:
    assert MpiSpec(ranks=4).max_ranks is None
    assert MpiSpec(ranks=4, max_ranks=4).max_ranks == 4
    with pytest.raises(ValidationError, match="max_ranks 2 is below ranks 4"):
        MpiSpec(ranks=4, max_ranks=2)
    with pytest.raises(ValidationError, match="max_ranks needs ranks"):
        MpiSpec(max_ranks=4)
    with pytest.raises(ValidationError, match="max_ranks needs ranks"):
        MpiSpec(mode="farm", max_ranks=4)
    with pytest.raises(ValidationError):
        MpiSpec(ranks=1, max_ranks=0)


def test_allocation_size_from_the_environment() -> None:
    assert allocation_ranks({}) is None
    assert allocation_ranks({"SLURM_NTASKS": "4"}) == 4
    assert allocation_ranks({"SLURM_NPROCS": "6"}) == 6
    assert allocation_ranks({"SLURM_NTASKS": "4", "SLURM_NPROCS": "6"}) == 4  # NTASKS first
    assert allocation_ranks({"SLURM_CPUS_ON_NODE": "8"}) == 8  # one node
    assert allocation_ranks({"SLURM_CPUS_ON_NODE": "8", "SLURM_NNODES": "3"}) == 24
    assert allocation_ranks({"SLURM_CPUS_ON_NODE": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "3"}) == 16
    # a stage job: one launcher task per node, each with the node's CPUs; srun -n K may use them all
    assert allocation_ranks({"SLURM_NTASKS": "2", "SLURM_CPUS_ON_NODE": "16", "SLURM_NNODES": "2"}) == 32
    assert allocation_ranks({"SLURM_NTASKS": "8", "SLURM_CPUS_ON_NODE": "2", "SLURM_NNODES": "2"}) == 8
    assert allocation_ranks({"SLURM_NTASKS": "x", "SLURM_CPUS_ON_NODE": "0"}) is None  # malformed: unknown


def test_inside_slurm_the_allocation_bounds_the_run(cpus: None) -> None:
    sim = spec(ranks=2, max_ranks=64)
    env = {**SLURM, "SLURM_NTASKS": "8"}
    assert wrap(sim, {"ranks": 8}, ARGV, env)[:6] == ["srun", "--mpi=pmi2", "--overlap", "--kill-on-bad-exit=1",
                                                      "-n", "8"]
    with pytest.raises(InvalidMessageError, match="asks for 9 MPI ranks but the Slurm allocation runs at most 8"):
        wrap(sim, {"ranks": 9}, ARGV, env)
    # max_ranks does not lift the allocation's bound, and the host's CPU count (4) does not apply
    with pytest.raises(InvalidMessageError, match="allocation runs at most 8"):
        check_ranks(sim, 64, env)
    check_ranks(sim, 8, env)
    check_ranks(sim, 64, SLURM)  # nothing known about the allocation: srun decides


def test_outside_slurm_the_host_cpus_bound_the_run(cpus: None) -> None:
    assert wrap(spec(ranks=4), {}, ARGV, {})[1:3] == ["-n", "4"]
    with pytest.raises(InvalidMessageError, match=r"asks for 6 MPI ranks but this host has 4 CPUs "
                                                  r"\(set mpi.max_ranks to allow more\)"):
        wrap(spec(ranks=6), {}, ARGV, {})
    with pytest.raises(InvalidMessageError, match="this host has 4 CPUs"):
        check_ranks(spec(ranks=2), 5, {})
    assert wrap(spec(ranks=2, max_ranks=3), {"ranks": 3}, ARGV, {})[1:3] == ["-n", "3"]
    # mpi.max_ranks says more: the module's author accepts oversubscribing the host
    assert wrap(spec(ranks=2, max_ranks=16), {"ranks": 16}, ARGV, {})[1:3] == ["-n", "16"]
    assert wrap(spec(ranks=6, max_ranks=6), {}, ARGV, {})[1:3] == ["-n", "6"]


def test_unknown_cpu_count_is_no_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpirun.os, "cpu_count", lambda: None)
    check_ranks(spec(ranks=64), 64, {})


def test_max_ranks_in_a_pipeline_file(tmp_path: Path) -> None:
    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "run.sh").write_text("true\n")
    app = tmp_path / "app.yaml"
    app.write_text("name: t\nmodules:\n  sim:\n    mpi: {ranks: 2, max_ranks: 8}\n")
    assert load_pipeline(app, environ={}).module("sim").mpi.max_ranks == 8
    app.write_text("name: t\nmodules:\n  sim:\n    mpi:\n      ranks: 4\n      max_ranks: 2\n")
    with pytest.raises(PipelineError, match="max_ranks 2 is below ranks 4") as exc:
        load_pipeline(app, environ={})
    assert exc.value.line == 4 and exc.value.key == "modules.sim.mpi"

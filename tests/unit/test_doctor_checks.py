"""`scalebox doctor`'s judgements (pure functions over facts), its plan of a pipeline, and the
small parsers of sinfo/sacctmgr/srun output."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalebox_hpc.doctor import checks
from scalebox_hpc.doctor.gather import parse_associations, parse_names, parse_partitions
from scalebox_hpc.doctor.plan import make_plan
from scalebox_hpc.doctor.probe import mpi_plugins
from scalebox_hpc.doctor.report import (
    DatabaseFacts,
    EngineFacts,
    GpuFacts,
    MpiFacts,
    PathFacts,
    ProbeReport,
    PythonFacts,
    ResourceFacts,
)
from scalebox_hpc.doctor.result import Check, Status, exit_code
from scalebox_hpc.pipeline import load_pipeline
from tests.helpers import write_app

GIB = 1 << 30


def _ids(found: list[Check]) -> dict[str, Status]:
    return {c.id: c.status for c in found}


# -- result -------------------------------------------------------------------------------------
def test_only_a_failure_makes_the_exit_code_1() -> None:
    assert exit_code([Check("a", Status.PASS, ""), Check("b", Status.WARN, ""), Check("c", Status.SKIP, "")]) == 0
    assert exit_code([Check("a", Status.PASS, ""), Check("b", Status.FAIL, "")]) == 1
    assert exit_code([]) == 0


# -- database -----------------------------------------------------------------------------------
def test_the_embedded_database_is_a_warning_that_says_compute_nodes_cannot_reach_it() -> None:
    check = checks.dsn_check("embedded", "postgresql://me@/home/me/pg:5432/scalebox")
    assert check.status is Status.WARN and "compute nodes" in check.hint
    assert checks.dsn_check("env", "postgresql://me@db:5432/x").status is Status.PASS
    bad = checks.dsn_check("env", "", error="missing '=' after 'nonsense'")
    assert bad.status is Status.FAIL and "postgresql://" in bad.hint


@pytest.mark.parametrize(("version", "status", "hint"), [
    (None, Status.FAIL, "db init"), (12, Status.FAIL, "db upgrade"), (14, Status.FAIL, "pip install -U"),
    (13, Status.PASS, ""),
])
def test_schema_check(version: int | None, status: Status, hint: str) -> None:
    check = checks.schema_check(version, 13)
    assert check.status is status and hint in check.hint


def test_unreachable_database_fails_with_a_hint() -> None:
    check = checks.reachable_check("postgresql://me@db:5432/x", "connection refused")
    assert check.status is Status.FAIL and "pg_hba.conf" in check.hint and "connection refused" in check.summary


@pytest.mark.parametrize(("skew", "status"), [
    (0.0, Status.PASS), (1.9, Status.PASS), (-2.5, Status.WARN), (29.0, Status.WARN), (31.0, Status.FAIL),
    (-100.0, Status.FAIL), (None, Status.SKIP),
])
def test_clock_skew_thresholds(skew: float | None, status: Status) -> None:
    assert checks.clock_check("probe.clock", skew, "node1").status is status


# -- Slurm ----------------------------------------------------------------------------------------
def test_a_missing_slurm_command_fails_naming_it() -> None:
    check = checks.commands_check({"sinfo": None, "squeue": "slurm 22.05", "sbatch": None, "scancel": "slurm 22.05"})
    assert check.status is Status.FAIL and "sinfo, sbatch" in check.summary and "module load" in check.hint
    assert checks.commands_check({"sinfo": "slurm 22.05.8"}).status is Status.PASS


def test_controller_check() -> None:
    assert checks.controller_check("Unable to contact slurm controller", {}).status is Status.FAIL
    assert checks.controller_check(None, {}).status is Status.WARN
    assert checks.controller_check(None, {"debug": "up"}).status is Status.PASS


def test_partitions_missing_down_and_up() -> None:
    found = checks.partition_checks(["debgu", "gpu", "debug"], {"debug": "up", "gpu": "down"}, "c1")
    missing, down, up = found
    assert missing.status is Status.FAIL and "did you mean 'debug'" in missing.summary and missing.target == "c1/debgu"
    assert down.status is Status.WARN and "down" in down.summary
    assert up.status is Status.PASS


def test_accounts_and_qos() -> None:
    assoc = checks.Associations({"proj1": frozenset({"normal", "long"}), "proj2": frozenset({"normal"})},
                                frozenset({"normal", "long", "debug"}))
    found = checks.account_checks(["proj1", "proj3"], ["long", "debug", "nope"], assoc)
    assert [c.status for c in found] == [Status.PASS, Status.FAIL, Status.PASS, Status.FAIL, Status.FAIL]
    assert "yours: proj1, proj2" in found[1].summary
    assert "not yours" in found[3].summary and "does not exist" in found[4].summary


def test_accounts_cannot_be_checked_without_slurmdbd_is_a_warning() -> None:
    [check] = checks.account_checks(["proj1"], [], "sacctmgr: error: slurmdbd unreachable")
    assert check.status is Status.WARN and "proj1" in check.summary
    assert checks.account_checks([], [], "whatever") == []


def test_engine_checks() -> None:
    assert checks.engine_check("apptainer", None, needed=True).status is Status.FAIL
    assert checks.engine_check("apptainer", None, needed=False).status is Status.WARN
    assert checks.engine_check("apptainer", "apptainer version 1.4.5").status is Status.PASS
    assert checks.no_engine_check([]).status is Status.WARN
    assert checks.no_engine_check(["podman"]).status is Status.PASS


# -- the probe's report ----------------------------------------------------------------------------
EXPECT = checks.Expectations(python="/shared/venv/bin/python", python_version="3.11.2", scalebox="0.1.0",
                             engine="apptainer")


def _report(**parts: object) -> ProbeReport:
    base: dict[str, object] = {
        "host": "node1",
        "python": PythonFacts(executable="/shared/venv/bin/python", version="3.11.2", scalebox="0.1.0"),
        "db": DatabaseFacts(ok=True, dsn="postgresql://me@db:5432/x", skew_seconds=0.01),
        "engine": EngineFacts(name="apptainer", version="apptainer version 1.4.5", image="/c/x.sif", ok=True),
        "paths": [PathFacts(role="scratch", path="/local", writable=True, free_bytes=50 * GIB, total_bytes=100 * GIB),
                  PathFacts(role="work_root", path="/w", writable=True, free_bytes=9 * GIB, total_bytes=9 * GIB)],
        "resources": ResourceFacts(cpus_usable=1, cpus_online=8, memory_total_bytes=GIB * 16),
        "gpu": GpuFacts(),
        "mpi": MpiFacts(srun=True, plugins=["none", "pmi2"]),
    }
    base.update(parts)
    return ProbeReport.model_validate(base)


def test_a_healthy_node_passes_everything_but_the_gpu_nobody_asked_for() -> None:
    found = checks.probe_checks(_report(), EXPECT, "debug")
    assert _ids(found) == {
        "probe.python": Status.PASS, "probe.db": Status.PASS, "probe.clock": Status.PASS, "probe.engine": Status.PASS,
        "probe.scratch": Status.PASS, "probe.work_root": Status.PASS, "probe.resources": Status.PASS,
        "probe.gpu": Status.SKIP, "probe.mpi": Status.PASS,
    }
    assert all(c.target == "debug" for c in found)
    assert "on node1" in found[0].summary


@pytest.mark.parametrize(("parts", "check_id", "status", "hint"), [
    ({"db": DatabaseFacts(dsn="postgresql://me@db:5432/x", error="connection refused")}, "probe.db", Status.FAIL,
     "listen_addresses"),
    ({"db": DatabaseFacts(ok=True, skew_seconds=45.0)}, "probe.clock", Status.FAIL, "NTP"),
    ({"engine": EngineFacts(name="apptainer", error="not installed")}, "probe.engine", Status.FAIL, "runtime:"),
    ({"engine": EngineFacts(skipped="no container engine asked for")}, "probe.engine", Status.SKIP, ""),
    ({"paths": [PathFacts(role="scratch", path="/local", error="No space left on device", free_bytes=0)]},
     "probe.scratch", Status.FAIL, "local_scratch"),
    ({"paths": [PathFacts(role="scratch", path="/local", writable=True, free_bytes=GIB // 2)]},
     "probe.scratch", Status.WARN, "room"),
    ({"paths": []}, "probe.work_root", Status.FAIL, "login and compute nodes share"),
    ({"python": PythonFacts(executable="/usr/bin/python3", version="3.11.2", scalebox="0.1.0")}, "probe.python",
     Status.FAIL, "venv"),
    ({"python": PythonFacts(executable="/shared/venv/bin/python", version="3.11.2", scalebox="0.0.9")},
     "probe.python", Status.FAIL, "same installation"),
    ({"python": PythonFacts(executable="/shared/venv/bin/python", version="3.12.1", scalebox="0.1.0")},
     "probe.python", Status.WARN, "venv"),
    ({"mpi": MpiFacts(srun=True, plugins=["none"])}, "probe.mpi", Status.WARN, "pmi2"),
    ({"mpi": MpiFacts()}, "probe.mpi", Status.WARN, "pmi2"),
    ({"gpu": GpuFacts(tool=True, devices=["GPU 0: A100 (UUID: GPU-1)"])}, "probe.gpu", Status.PASS, ""),
])
def test_each_fault_of_a_node(parts: dict[str, object], check_id: str, status: Status, hint: str) -> None:
    [check] = [c for c in checks.probe_checks(_report(**parts), EXPECT) if c.id == check_id]
    assert check.status is status, check
    assert hint in check.hint


def test_what_a_module_asks_for_turns_a_missing_gpu_or_pmi2_into_a_failure() -> None:
    wants = checks.Expectations(python=EXPECT.python, python_version="3.11.2", scalebox="0.1.0", gpu=True, mpi=True)
    found = _ids(checks.probe_checks(_report(mpi=MpiFacts(srun=True, plugins=["none"])), wants))
    assert found["probe.gpu"] is Status.FAIL and found["probe.mpi"] is Status.FAIL


def test_job_check() -> None:
    assert checks.job_check("12", "COMPLETED", "None", "").status is Status.PASS
    failed = checks.job_check("12", "FAILED", "NonZeroExitCode", "python: not found")
    assert failed.status is Status.FAIL and "FAILED/NonZeroExitCode" in failed.summary
    assert "not submitted" in checks.job_check("", "", "", "sbatch refused").summary


# -- the plan of a pipeline ------------------------------------------------------------------------
APP = """
name: doc
cluster: c1
slurm: {partition: batch, account: proj1}
clusters:
  c1: {}
  c2:
    slurm: {partition: gpu, qos: long, gres: "gpu:1"}
    local_scratch: /scratch/$${HOST}
modules:
  a: {sink_modules: [b], base_image: "docker://busybox", arguments: {runtime: podman}}
  b: {cluster: c2}
  c: {cluster: c2, base_image: scalebox-base, mpi: {mode: farm}}
  d: {}
"""


def test_the_plan_of_a_pipeline(tmp_path: Path) -> None:
    spec = load_pipeline(write_app(tmp_path / "app", APP, {f"{m}/run.sh": "true\n" for m in "abcd"}))
    plan = make_plan(spec.modules, partitions=["debug"], runtime_default="auto",
                     which=lambda name: f"/usr/bin/{name}" if name == "apptainer" else None, source="app.yaml")
    by_cluster = {t.cluster: t for t in plan.targets}
    assert by_cluster["c1"].partitions == ["batch"] and by_cluster["c1"].accounts == ["proj1"]
    assert by_cluster["c2"].partitions == ["gpu"] and by_cluster["c2"].qos == ["long"]
    assert by_cluster[""].partitions == ["debug"]
    assert plan.engines == ["podman", "apptainer"]  # auto resolved to what is installed
    assert [p.label for p in plan.probes] == ["c1/batch", "c2/gpu", "debug"]  # a and d share one placement
    c1, c2, debug = plan.probes
    assert (c1.engine, c1.image) == ("podman", "docker://busybox")
    assert (c2.engine, c2.image, c2.gres, c2.gpu, c2.mpi) == ("apptainer", "scalebox-base", "gpu:1", True, True)
    assert c2.scratch == "/scratch/${HOST}"
    assert debug.engine is None


def test_no_pipeline_is_one_probe_on_the_default_partition() -> None:
    plan = make_plan([], which=lambda name: None)
    assert [t.cluster for t in plan.targets] == [""] and [p.label for p in plan.probes] == ["default partition"]
    assert plan.engines == []


# -- parsers ---------------------------------------------------------------------------------------
def test_parse_partitions_skips_cluster_headers_and_garbage() -> None:
    text = "CLUSTER: c2\ndebug|up\ngpu|down\n\nnonsense\nbad name|up\ndebug|inact\n"
    assert parse_partitions(text) == {"debug": "up", "gpu": "down"}


def test_parse_associations_and_names() -> None:
    text = "proj1|normal,long\nproj1|debug\nproj2|\n|orphan\n"
    assert parse_associations(text) == {"proj1": frozenset({"normal", "long", "debug"}), "proj2": frozenset()}
    assert parse_names("normal\n\nlong\nnot one\n") == frozenset({"normal", "long"})


def test_mpi_plugins_of_each_slurm_version() -> None:
    assert mpi_plugins("MPI plugin types are...\n\tnone\n\tcray_shasta\n\tpmi2\n\tpmix\n"
                       "specific pmix plugin versions available: pmix_v4\n") == [
        "none", "cray_shasta", "pmi2", "pmix", "pmix_v4"]
    assert mpi_plugins("srun: MPI types are...\nsrun: none\nsrun: pmi2\n") == ["none", "pmi2"]
    assert mpi_plugins("") == []

"""The doctor against the real PostgreSQL: the probe run directly on this host (no Slurm) with
the faults it must report (unreachable database, missing engine, a full scratch), the database
checks, and a whole diagnosis over fake Slurm commands whose sbatch runs the probe here."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalebox_hpc.doctor import Services, Settings, diagnose, exit_code, gather, make_plan
from scalebox_hpc.doctor.probe import ProbeEnv, ProbeOptions, run_probe
from scalebox_hpc.doctor.result import Status
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.slurm.commands import SubprocessRunner
from tests.components import apptainer_available, apptainer_binary, need
from tests.doctor_fakes import make_fake_slurm

pytestmark = pytest.mark.pg

REPO = Path(__file__).resolve().parents[2]
UNREACHABLE = "postgresql://nobody:s3cret@127.0.0.1:1/none"


def _env(dsn: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEBOX_", "PG"))}
    env.update(SCALEBOX_DSN=dsn, SCALEBOX_LOCAL_DIR=str(tmp_path / "scratch"))
    return env


def _no_engines(name: str) -> str | None:
    return None


# -- the probe, run here -------------------------------------------------------------------------
def test_the_probe_reaches_the_database_and_cleans_up(pg_dsn: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    report = run_probe(ProbeOptions(work_root=work), ProbeEnv(environ=_env(pg_dsn, tmp_path), which=_no_engines))
    assert report.db.ok and report.db.error == "" and report.db.skew_seconds is not None
    assert abs(report.db.skew_seconds) < 30  # one host, one clock: the fail threshold is far away
    assert report.python.executable == sys.executable and report.python.scalebox
    for role in ("scratch", "work_root"):
        facts = report.path(role)
        assert facts is not None and facts.writable and facts.free_bytes and facts.total_bytes
    assert list(work.iterdir()) == []  # the file written was removed
    assert not (tmp_path / "scratch").exists()  # and the scratch dir it had to create
    assert report.engine.skipped and report.resources.cpus_usable


def test_an_unreachable_database_is_reported_without_its_password(tmp_path: Path) -> None:
    report = run_probe(ProbeOptions(work_root=tmp_path), ProbeEnv(environ=_env(UNREACHABLE, tmp_path),
                                                                   which=_no_engines))
    assert not report.db.ok and report.db.error and report.db.skew_seconds is None
    assert "s3cret" not in report.model_dump_json()


def test_a_missing_engine(tmp_path: Path) -> None:
    options = ProbeOptions(work_root=tmp_path, engine="apptainer", image="scalebox-base")
    report = run_probe(options, ProbeEnv(environ=_env(UNREACHABLE, tmp_path), which=_no_engines))
    assert not report.engine.ok and "not installed" in report.engine.error


@pytest.mark.apptainer
def test_the_engine_runs_the_pipelines_image(tmp_path: Path) -> None:
    reason = apptainer_available()
    if reason:
        need("apptainer", reason)
    exe = apptainer_binary()
    assert exe is not None
    options = ProbeOptions(work_root=tmp_path, engine="apptainer", image="scalebox-base",
                           code_path=REPO / "examples" / "app-primes")
    env = ProbeEnv(environ=_env(UNREACHABLE, tmp_path), which=lambda name: exe if name == "apptainer" else None)
    report = run_probe(options, env)
    assert report.engine.ok, report.engine.error
    assert report.engine.version.startswith("apptainer") and report.engine.image.endswith(".sif")


@contextlib.contextmanager
def _tiny_tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_scratch(tmp_path: Path) -> None:
    with _tiny_tmpfs(tmp_path / "full") as full:
        with contextlib.suppress(OSError), open(full / "filler", "wb") as fh:
            fh.write(b"x" * (128 << 10))  # fills it
        report = run_probe(ProbeOptions(work_root=tmp_path, scratch=str(full)),
                           ProbeEnv(environ=_env(UNREACHABLE, tmp_path), which=_no_engines))
        scratch = report.path("scratch")
        assert scratch is not None and not scratch.writable and "No space left" in scratch.error
        assert scratch.free_bytes == 0
        assert sorted(p.name for p in full.iterdir()) == ["filler"]  # the half-written file was removed


def test_low_free_space_through_an_injected_statvfs(tmp_path: Path) -> None:
    from scalebox_hpc.doctor import checks

    env = ProbeEnv(environ=_env(UNREACHABLE, tmp_path), which=_no_engines, statvfs=lambda p: (5 << 20, 1 << 40))
    report = run_probe(ProbeOptions(work_root=tmp_path), env)
    check = checks.path_check("probe.scratch", report.path("scratch"), checks.FREE_WARN_BYTES)
    assert check.status is Status.WARN and "5.0 MiB free" in check.summary


# -- the database checks from the login node ------------------------------------------------------
def test_database_checks_pass_on_a_current_schema(pg_dsn: str) -> None:
    facts = gather.database({"SCALEBOX_DSN": pg_dsn}, lambda: pytest.fail("no embedded server wanted"))
    assert facts.dsn == pg_dsn
    assert [(c.id, c.status) for c in facts.checks] == [
        ("db.dsn", Status.PASS), ("db.reachable", Status.PASS), ("db.schema", Status.PASS), ("db.clock", Status.PASS)]


def test_a_database_without_the_schema(empty_db: str) -> None:
    facts = gather.database({"SCALEBOX_DSN": empty_db}, lambda: pytest.fail("no embedded server wanted"))
    schema = next(c for c in facts.checks if c.id == "db.schema")
    assert schema.status is Status.FAIL and "db init" in schema.hint


def test_an_unreachable_database_from_the_login_node() -> None:
    facts = gather.database({"SCALEBOX_DSN": UNREACHABLE}, lambda: pytest.fail("no embedded server wanted"))
    assert facts.dsn is None
    reachable = next(c for c in facts.checks if c.id == "db.reachable")
    assert reachable.status is Status.FAIL and "pg_hba.conf" in reachable.hint
    assert all("s3cret" not in f"{c.summary} {c.hint}" for c in facts.checks)


# -- a whole diagnosis, Slurm faked ---------------------------------------------------------------
def test_a_whole_diagnosis_is_green_with_a_probe_that_ran(pg_dsn: str, tmp_path: Path) -> None:
    fake = make_fake_slurm(tmp_path / "slurm")
    extra = fake.env(FAKE_SBATCH_RUN="1")

    def runner(env: object) -> SubprocessRunner:
        return SubprocessRunner(base_env=env, extra_env={"SLURM_TIME_FORMAT": "standard", **extra})  # type: ignore[arg-type]

    spec = load_pipeline(REPO / "examples" / "app-primes" / "app.yaml")
    plan = make_plan(spec.modules, partitions=["debug"], which=_no_engines, source="app-primes")
    settings = Settings(plan=plan, python=sys.executable, work_root=tmp_path / "work", environ=_env(pg_dsn, tmp_path),
                        user="me")
    found = diagnose(settings, Services(runner=runner, which=_no_engines,
                                        start_embedded=lambda: pytest.fail("no embedded server wanted")))
    statuses = {c.id: c.status for c in found}
    assert exit_code(found) == 0, [c for c in found if c.status is not Status.PASS]
    for check_id in ("db.reachable", "db.schema", "slurm.commands", "slurm.controller", "slurm.partition",
                     "probe.job", "probe.python", "probe.db", "probe.clock", "probe.scratch", "probe.work_root",
                     "probe.resources", "probe.mpi"):
        assert statuses[check_id] is Status.PASS, check_id
    assert statuses["engine.present"] is Status.SKIP and statuses["probe.gpu"] is Status.SKIP
    # its --version, one probe job for the modules (they share the default placement), one for --partition debug
    assert len(fake.calls("sbatch")) == 3
    assert [c.target for c in found if c.id == "probe.job"] == ["default partition", "debug"]

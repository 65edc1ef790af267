"""The probe: what ``python -m scalebox_hpc doctor-probe`` finds on the node it runs on.

It runs as a tiny Slurm job with the stage jobs' Python and environment, and only gathers
facts (the login side judges them, :mod:`scalebox_hpc.doctor.checks`): the database reached
from here and its clock, the container engine run on the pipeline's image, a file written to
(and removed from) the local scratch and the work root, free space, CPUs and memory,
``nvidia-smi -L``, ``srun --mpi=list``, the interpreter. Nothing it meets raises: every
failure is a fact in the report, so the report always gets printed.

Every outside effect goes through :class:`ProbeEnv`, so tests inject a full disk, a missing
engine or an unreachable database without the real thing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

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
from scalebox_hpc.doctor.result import clip
from scalebox_hpc.slurm.commands import CommandRunner, SlurmCommandError, SubprocessRunner

logger = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0
"""Seconds for each small command (nvidia-smi, srun --mpi=list, ENGINE --version)."""
ENGINE_TIMEOUT = 300.0
"""Seconds for the container run, an image build or conversion on first use included."""
WRITE_BYTES = 1 << 20
"""What the probe writes to each directory: enough to need real free blocks."""


def _statvfs(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _subprocess_runner(env: Mapping[str, str] | None) -> CommandRunner:
    return SubprocessRunner(extra_env={}, base_env=env)


def _db_now(dsn: str) -> datetime:
    from scalebox_hpc.db.connection import connect
    from scalebox_hpc.db.sql import query

    with connect(dsn, timeout=10.0, autocommit=True) as conn:
        row = conn.execute(query("server_now")).fetchone()
    if row is None:  # pragma: no cover - SELECT now() always returns a row
        raise RuntimeError("SELECT now() returned no row")
    value = row["now"]
    assert isinstance(value, datetime)
    return value


@dataclass
class ProbeEnv:
    """The probe's view of the node: replaced piecewise in tests."""

    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    runner: Callable[[Mapping[str, str] | None], CommandRunner] = _subprocess_runner
    """A command runner with this environment (None: the process's)."""
    which: Callable[[str], str | None] = shutil.which
    statvfs: Callable[[str], tuple[int, int]] = _statvfs
    """(free bytes for an unprivileged user, total bytes) of the filesystem holding a path."""
    clock: Callable[[], float] = time.time
    db_now: Callable[[str], datetime] = _db_now
    """The database's ``now()`` over a new connection to the DSN (raises when unreachable)."""
    meminfo: Path = Path("/proc/meminfo")


@dataclass(frozen=True)
class ProbeOptions:
    """What to probe: the directories, and the engine and image to run (none: skipped)."""

    work_root: Path
    scratch: str | None = None
    """The cluster's local scratch (``${HOST}`` allowed); None: SCALEBOX_LOCAL_SCRATCH, else
    SCALEBOX_LOCAL_DIR, else ``$TMPDIR/scalebox-<euid>/local`` (the launcher's order)."""
    engine: str | None = None
    """apptainer, podman, docker or auto; None: no container check."""
    image: str | None = None
    code_path: Path | None = None
    """Where the module's scripts are: a ``NAME`` image is built from the ``containers/`` above it."""


def run_probe(options: ProbeOptions, env: ProbeEnv | None = None) -> ProbeReport:
    """Probe this node; never raises for what it finds (a failure is a fact in the report)."""
    from scalebox_hpc.launcher.launcher import host_name

    env = env or ProbeEnv()
    host = host_name(env.environ)
    return ProbeReport(
        host=host,
        python=_python(),
        db=_database(env),
        engine=_engine(options, env),
        paths=[_write_test("scratch", _scratch_dir(options.scratch, host, env.environ), env),
               _write_test("work_root", options.work_root, env)],
        resources=_resources(env),
        gpu=_gpu(env),
        mpi=_mpi(env),
    )


def _python() -> PythonFacts:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("scalebox_hpc")
    except PackageNotFoundError:
        installed = ""
    return PythonFacts(executable=sys.executable, version=platform.python_version(), scalebox=installed)


def _database(env: ProbeEnv) -> DatabaseFacts:
    from scalebox_hpc.db.connection import configured_dsn, redact

    dsn = configured_dsn(env.environ)
    if dsn is None:
        return DatabaseFacts(error="no SCALEBOX_DSN (or PG* variables) in the job's environment")
    shown = redact(dsn)
    try:
        before = env.clock()
        now = env.db_now(dsn)
        after = env.clock()
    except Exception as exc:  # any failure to reach the database is the fact to report
        return DatabaseFacts(dsn=shown, error=_error_text(exc, dsn))
    return DatabaseFacts(ok=True, dsn=shown, skew_seconds=round(now.timestamp() - (before + after) / 2, 3))


def _error_text(exc: BaseException, dsn: str) -> str:
    """One line, without the DSN's password even if a message repeated it."""
    from psycopg.conninfo import conninfo_to_dict

    text = clip(str(exc) or type(exc).__name__)
    with contextlib.suppress(Exception):
        password = conninfo_to_dict(dsn).get("password")
        if password:
            text = text.replace(str(password), "***")
    return text


def _engine(options: ProbeOptions, env: ProbeEnv) -> EngineFacts:
    from scalebox_hpc.errors import ScaleboxError
    from scalebox_hpc.runtime.base import SessionSpec
    from scalebox_hpc.runtime.choose import RuntimeChooser

    if not options.engine:
        return EngineFacts(skipped="no container engine asked for (the pipeline has no base_image)")
    try:
        chooser = RuntimeChooser(options.engine, host_env=env.environ, which=env.which)
        with tempfile.TemporaryDirectory(prefix="sbx-doctor-") as tmp:
            spec = SessionSpec(name="doctor-probe", work_dir=Path(tmp), private_dir=Path(tmp),
                               code_path=options.code_path or Path(tmp), image=options.image or "x")
            name = chooser.pick(spec)
            engine = chooser.engine(name)
            version = _version(str(getattr(engine, "exe", name)), env)
            if not options.image:
                return EngineFacts(name=name, version=version, skipped="no image to run")
            image = engine.image_for(spec)
            argv, proc_env = engine.command(image=image, binds=[], env={"PATH": "/usr/bin:/bin"}, cwd="/",
                                            argv=["true"], name=f"sbx-doctor-{os.getpid()}-{secrets.token_hex(3)}",
                                            options=[], host_env=env.environ)
            result = env.runner(proc_env).run(argv, timeout=ENGINE_TIMEOUT)
    except (ScaleboxError, OSError) as exc:
        return EngineFacts(name=options.engine, image=options.image or "", error=clip(str(exc)))
    if not result.ok:
        return EngineFacts(name=name, version=version, image=image,
                           error=clip(f"`{name} run {options.image} true` exited {result.returncode}: "
                                      f"{result.stderr.strip() or result.stdout.strip()}"))
    return EngineFacts(name=name, version=version, image=image, ok=True)


def _version(exe: str, env: ProbeEnv) -> str:
    if Path(exe).name == "apptainer":
        from scalebox_hpc.errors import ScaleboxError

        try:
            return clip(apptainer_version(exe, env.runner(None), COMMAND_TIMEOUT), 100)
        except ScaleboxError as exc:
            return clip(str(exc), 100)
    try:
        result = env.runner(None).run([exe, "--version"], timeout=COMMAND_TIMEOUT)
    except SlurmCommandError as exc:
        return clip(str(exc), 100)
    lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
    return clip(lines[0], 100) if lines else ""


def apptainer_version(exe: str, runner: CommandRunner, timeout: float) -> str:
    """``apptainer --version`` through the runtime's Apptainer adapter (the one that pulls and
    builds the images), its command run by ``runner``; ScaleboxError when it does not answer."""
    import subprocess

    from scalebox_hpc.runtime.spython_adapter import SpythonApptainer

    def run(argv: Sequence[str], *, cwd: Path | None, timeout: float) -> subprocess.CompletedProcess[str]:
        result = runner.run(argv, timeout=timeout)
        return subprocess.CompletedProcess(list(argv), result.returncode, result.stdout, result.stderr)

    return SpythonApptainer(exe, runner=run).version()


def _scratch_dir(scratch: str | None, host: str, environ: Mapping[str, str]) -> Path:
    if scratch or environ.get("SCALEBOX_LOCAL_SCRATCH"):
        return Path(str(scratch or environ["SCALEBOX_LOCAL_SCRATCH"]).replace("${HOST}", host))
    from scalebox_hpc.runtime.paths import default_local_dir

    return Path(environ.get("SCALEBOX_LOCAL_DIR") or default_local_dir())


def _write_test(role: str, path: Path, env: ProbeEnv) -> PathFacts:
    """Write, sync, read back and remove a file in ``path`` (and the directories it had to make)."""
    free = total = None
    error = ""
    try:
        with _made_dirs(path):
            free, total = env.statvfs(str(path))
            probe = path / f".sbx-doctor-{os.getpid()}-{secrets.token_hex(4)}"
            data = secrets.token_bytes(WRITE_BYTES)
            try:
                with open(probe, "xb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                if probe.read_bytes() != data:
                    error = "the file read back differs from what was written"
            finally:
                with contextlib.suppress(FileNotFoundError):
                    probe.unlink()
    except OSError as exc:
        error = clip(f"{exc.strerror or exc} ({exc.filename or path})")
    return PathFacts(role=role, path=str(path), writable=not error, error=error, free_bytes=free, total_bytes=total)


@contextlib.contextmanager
def _made_dirs(path: Path) -> Iterator[None]:
    """Create ``path`` when missing, and remove afterwards the directories this made (if empty)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        for made in missing:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()


def _resources(env: ProbeEnv) -> ResourceFacts:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    memory: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in env.meminfo.read_text(encoding="ascii", errors="replace").splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable") and rest.split():
                memory[key] = int(rest.split()[0]) * 1024  # /proc/meminfo counts kB
    return ResourceFacts(cpus_usable=usable, cpus_online=os.cpu_count(),
                         memory_total_bytes=memory.get("MemTotal"), memory_available_bytes=memory.get("MemAvailable"))


def _gpu(env: ProbeEnv) -> GpuFacts:
    exe = env.which("nvidia-smi")
    if exe is None:
        return GpuFacts()
    try:
        result = env.runner(None).run([exe, "-L"], timeout=COMMAND_TIMEOUT)
    except SlurmCommandError as exc:
        return GpuFacts(tool=True, error=clip(str(exc)))
    devices = [clip(line, 200) for line in result.stdout.splitlines() if line.startswith("GPU ")]
    error = "" if result.ok else clip(f"nvidia-smi -L exited {result.returncode}: {result.stderr or result.stdout}")
    return GpuFacts(tool=True, devices=devices[:64], error=error)


def _mpi(env: ProbeEnv) -> MpiFacts:
    exe = env.which("srun")
    if exe is None:
        return MpiFacts()
    try:
        result = env.runner(None).run([exe, "--mpi=list"], timeout=COMMAND_TIMEOUT)
    except SlurmCommandError as exc:
        return MpiFacts(srun=True, error=clip(str(exc)))
    plugins = mpi_plugins(result.stdout + "\n" + result.stderr)
    error = "" if result.ok else clip(f"srun --mpi=list exited {result.returncode}: {result.stderr}")
    return MpiFacts(srun=True, plugins=plugins, error=error)


def mpi_plugins(text: str) -> list[str]:
    """The plug-in names in ``srun --mpi=list`` output (22.05 prints ``MPI plugin types are...``
    then one name a line, older ones ``srun: pmi2``; newer ones list sub-plugin versions too)."""
    names: list[str] = []
    for line in text.splitlines():
        word = line.strip().removeprefix("srun:").strip()
        if word and " " not in word and word.replace("_", "").replace("-", "").isalnum() and word not in names:
            names.append(word)
        elif ":" in word and "versions available" in word:  # "specific sub-plugin versions available: pmix_v3"
            names += [w.strip() for w in word.split(":", 1)[1].split(",") if w.strip() and w.strip() not in names]
    return names[:64]

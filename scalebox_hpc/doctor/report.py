"""The probe's report: what ``python -m scalebox_hpc doctor-probe`` prints on a compute node,
and the parser the login side reads it back with.

The probe prints one JSON object on one line of stdout, tagged ``"scalebox_doctor_probe": 1``.
The job's output file may hold anything besides (site banners from ``module load``, a Python
traceback, a truncated line when the job was killed, megabytes of noise): :func:`parse_report`
takes the last tagged line that validates, and raises :class:`ProbeParseError` otherwise.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scalebox_hpc.errors import ScaleboxError

TAG = "scalebox_doctor_probe"
VERSION = 1
MAX_OUTPUT = 1 << 20
"""Only the last MiB of the job's output is read: the report is its last line, and a job
gone wrong may have printed gigabytes."""
MAX_LINE = 256 << 10
"""A longer line is not the report (which is a few kB)."""

_LENIENT = ConfigDict(extra="ignore", frozen=True)


class ProbeParseError(ScaleboxError):
    """The probe job's output holds no report."""

    hint = "see the probe job's output file; run `python -m scalebox_hpc doctor-probe` on a compute node by hand"


class PythonFacts(BaseModel):
    """The interpreter the probe ran under."""

    model_config = _LENIENT
    executable: str = ""
    version: str = ""
    scalebox: str = ""
    """The installed scalebox_hpc version."""


class DatabaseFacts(BaseModel):
    """The probe's connection back to the database."""

    model_config = _LENIENT
    ok: bool = False
    dsn: str = ""
    """Redacted: never a password."""
    error: str = ""
    skew_seconds: float | None = None
    """Database ``now()`` minus the node's clock (midpoint of the query), seconds."""


class EngineFacts(BaseModel):
    """The container engine run on the node."""

    model_config = _LENIENT
    name: str = ""
    version: str = ""
    image: str = ""
    ok: bool = False
    error: str = ""
    skipped: str = ""
    """Why nothing was run (no engine or image asked for)."""


class PathFacts(BaseModel):
    """A directory the probe wrote a file to (and removed it from)."""

    model_config = _LENIENT
    role: str = ""
    """``scratch`` or ``work_root``."""
    path: str = ""
    writable: bool = False
    error: str = ""
    free_bytes: int | None = Field(default=None, ge=0)
    total_bytes: int | None = Field(default=None, ge=0)


class ResourceFacts(BaseModel):
    """CPUs and memory of the node as the job sees them."""

    model_config = _LENIENT
    cpus_usable: int | None = Field(default=None, ge=0)
    """CPUs this process may run on (its affinity: the job's allocation under cgroups)."""
    cpus_online: int | None = Field(default=None, ge=0)
    memory_total_bytes: int | None = Field(default=None, ge=0)
    memory_available_bytes: int | None = Field(default=None, ge=0)


class GpuFacts(BaseModel):
    """``nvidia-smi -L`` on the node."""

    model_config = _LENIENT
    tool: bool = False
    """nvidia-smi is installed."""
    devices: list[str] = Field(default_factory=list)
    error: str = ""


class MpiFacts(BaseModel):
    """``srun --mpi=list`` on the node."""

    model_config = _LENIENT
    srun: bool = False
    plugins: list[str] = Field(default_factory=list)
    error: str = ""


class ProbeReport(BaseModel):
    """Everything the probe found; each part defaults to "not found" when absent."""

    model_config = _LENIENT
    host: str = ""
    python: PythonFacts = Field(default_factory=PythonFacts)
    db: DatabaseFacts = Field(default_factory=DatabaseFacts)
    engine: EngineFacts = Field(default_factory=EngineFacts)
    paths: list[PathFacts] = Field(default_factory=list)
    resources: ResourceFacts = Field(default_factory=ResourceFacts)
    gpu: GpuFacts = Field(default_factory=GpuFacts)
    mpi: MpiFacts = Field(default_factory=MpiFacts)

    def path(self, role: str) -> PathFacts | None:
        """The facts of the directory with this role, None when the probe did not report it."""
        return next((p for p in self.paths if p.role == role), None)


def render_report(report: ProbeReport) -> str:
    """The probe's stdout line: the report tagged, as one line of JSON."""
    return json.dumps({TAG: VERSION, **report.model_dump()}, ensure_ascii=True, separators=(",", ":"))


def parse_report(output: str | bytes) -> ProbeReport:
    """The report in a probe job's output (its last tagged line that validates); anything else
    around it is ignored. Raises :class:`ProbeParseError` when there is none."""
    text = output.decode("utf-8", errors="replace") if isinstance(output, bytes) else output
    text = text[-MAX_OUTPUT:]
    problem = "no report line (the probe did not run, or died before it printed)"
    for line in reversed(text.splitlines()):
        found = _report_of(line)
        if isinstance(found, ProbeReport):
            return found
        if found:
            problem = found
    raise ProbeParseError(f"the probe's output holds no report: {problem}")


def _report_of(line: str) -> ProbeReport | str:
    """The report on this line; else why not ('' when the line is not even tagged)."""
    line = line.strip()
    if not line.startswith("{") or TAG not in line or len(line) > MAX_LINE:
        return ""
    try:
        data: Any = json.loads(line)
    except (ValueError, RecursionError):
        return "a truncated or malformed report line"
    if not isinstance(data, dict) or data.get(TAG) != VERSION:
        return f"a report of another version ({TAG}={str(data.get(TAG))[:20]!r})" if isinstance(data, dict) else ""
    try:
        return ProbeReport.model_validate(data)
    except (ValidationError, RecursionError) as exc:
        return f"an invalid report ({exc.error_count() if isinstance(exc, ValidationError) else 'too deep'} errors)"

"""Pure parsers for Slurm 22.05 command output: no I/O, no subprocesses.

Covered: ``sbatch --parsable``; ``squeue --json`` and ``sacct --json`` (openapi v0.0.38, plus
the ``{"set", "infinite", "number"}`` / list shapes of later versions); delimited
``squeue --noheader --Format=...`` and ``sacct -X --parsable2 --noheader -o ...`` rows in the
field orders given by ``SQUEUE_FIELDS`` / ``SACCT_FIELDS``; ``scontrol -o show job``;
Slurm hostlists and array job ids. Everything returns ``JobInfo`` records whose ``state``
is a ``SlurmState``. Unparseable output raises ``SlurmParseError`` quoting the bad text.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import hostlist

from scalebox_hpc.errors import ScaleboxError


class SlurmParseError(ScaleboxError):
    """Slurm printed something this parser does not understand."""

    hint = "the Slurm version or site configuration may differ from what scalebox supports (Slurm 22.05+)"

    def __init__(self, what: str, text: str) -> None:
        self.what = what
        self.text = text
        snippet = text if len(text) <= 120 else text[:117] + "..."
        super().__init__(f"cannot parse {what}: {snippet!r}")


class SlurmState(enum.Enum):
    """A job's state, reduced to what an orchestrator acts on."""

    PENDING = "PENDING"
    """Queued, waiting for resources, a begin time, a dependency or a hold."""
    RUNNING = "RUNNING"
    """Allocated and running (also while resizing or being signalled)."""
    COMPLETING = "COMPLETING"
    """The batch script ended; Slurm is still cleaning up on some nodes."""
    COMPLETED = "COMPLETED"
    """Every process exited 0."""
    FAILED = "FAILED"
    """The batch script exited non-zero, or the launch failed."""
    CANCELLED = "CANCELLED"
    """Cancelled by a user or an administrator (``scancel``)."""
    TIMEOUT = "TIMEOUT"
    """Killed at its time limit. For a long-lived stage job this is expected: resubmit it."""
    PREEMPTED = "PREEMPTED"
    """Terminated to make room for a higher-priority job: resubmit, not a failure."""
    NODE_FAIL = "NODE_FAIL"
    """Terminated because one of its nodes failed: resubmit, not a failure of the job."""
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    """Killed by the memory cgroup (the OOM killer fired)."""
    BOOT_FAIL = "BOOT_FAIL"
    """A node could not be booted for the job; it never ran."""
    DEADLINE = "DEADLINE"
    """Terminated (or never started) because of its ``--deadline``."""
    SUSPENDED = "SUSPENDED"
    """Stopped (SIGSTOP or suspended by the scheduler); it still holds or will regain its allocation."""
    REQUEUED = "REQUEUED"
    """Being put back into the queue (``scontrol requeue``, preemption with requeue); it will run again."""
    UNKNOWN = "UNKNOWN"
    """A state string this module does not know, or no state at all."""

    @property
    def is_terminal(self) -> bool:
        """True when the job will never run (again) under this id."""
        return self in _TERMINAL

    @property
    def is_resubmittable(self) -> bool:
        """True when a long-lived stage job ended this way should simply be submitted again."""
        return self in _RESUBMIT

    @property
    def is_active(self) -> bool:
        """True while the job is queued, running or about to run again."""
        return not self.is_terminal and self is not SlurmState.UNKNOWN


_TERMINAL = frozenset({
    SlurmState.COMPLETED, SlurmState.FAILED, SlurmState.CANCELLED, SlurmState.TIMEOUT, SlurmState.PREEMPTED,
    SlurmState.NODE_FAIL, SlurmState.OUT_OF_MEMORY, SlurmState.BOOT_FAIL, SlurmState.DEADLINE,
})
_RESUBMIT = frozenset({SlurmState.TIMEOUT, SlurmState.PREEMPTED, SlurmState.NODE_FAIL})

STATE_TABLE: Mapping[str, SlurmState] = {
    **{s.value: s for s in SlurmState if s is not SlurmState.UNKNOWN},
    # flag states that `job_state_string()` prints instead of the base state
    "CONFIGURING": SlurmState.PENDING, "POWER_UP_NODE": SlurmState.PENDING,
    "RESV_DEL_HOLD": SlurmState.PENDING, "REQUEUE_HOLD": SlurmState.REQUEUED,
    "REQUEUE_FED": SlurmState.REQUEUED, "RESIZING": SlurmState.RUNNING, "SIGNALING": SlurmState.RUNNING,
    "STAGE_OUT": SlurmState.COMPLETING, "STOPPED": SlurmState.SUSPENDED, "SPECIAL_EXIT": SlurmState.FAILED,
    "LAUNCH_FAILED": SlurmState.FAILED, "REVOKED": SlurmState.CANCELLED,
    # compact codes (squeue %t, sacct short forms)
    "PD": SlurmState.PENDING, "CF": SlurmState.PENDING, "R": SlurmState.RUNNING, "RS": SlurmState.RUNNING,
    "SI": SlurmState.RUNNING, "CG": SlurmState.COMPLETING, "SO": SlurmState.COMPLETING,
    "CD": SlurmState.COMPLETED, "F": SlurmState.FAILED, "SE": SlurmState.FAILED, "CA": SlurmState.CANCELLED,
    "RV": SlurmState.CANCELLED, "TO": SlurmState.TIMEOUT, "PR": SlurmState.PREEMPTED,
    "NF": SlurmState.NODE_FAIL, "OOM": SlurmState.OUT_OF_MEMORY, "BF": SlurmState.BOOT_FAIL,
    "DL": SlurmState.DEADLINE, "S": SlurmState.SUSPENDED, "ST": SlurmState.SUSPENDED,
    "RQ": SlurmState.REQUEUED, "RH": SlurmState.REQUEUED, "RF": SlurmState.REQUEUED,
    "RD": SlurmState.PENDING,
}
"""Native Slurm state strings (long names, flag states, compact codes) → ``SlurmState``."""

# flag states win over the base state when a newer Slurm reports a list (["RUNNING", "COMPLETING"])
_FLAG_PRECEDENCE = (SlurmState.COMPLETING, SlurmState.REQUEUED, SlurmState.SUSPENDED)


def translate_state(native: str | Iterable[str] | None) -> SlurmState:
    """Map a native state ("RUNNING", "CANCELLED by 0", "CANCELLED+", "CD", a JSON list) to ``SlurmState``."""
    if native is None:
        return SlurmState.UNKNOWN
    if not isinstance(native, str):
        states = [translate_state(s) for s in native]
        for flag in _FLAG_PRECEDENCE:
            if flag in states:
                return flag
        return next((s for s in states if s is not SlurmState.UNKNOWN), SlurmState.UNKNOWN)
    word = native.strip().split(" ", 1)[0].rstrip("+").upper()
    return STATE_TABLE.get(word, SlurmState.UNKNOWN)


@dataclass(frozen=True)
class JobInfo:
    """One job (or array task) as Slurm reports it.

    ``job_id`` is Slurm's display id (``"123"``, or ``"12_3"`` for an array task); ``raw_id`` the
    unique numeric id when known (an array task's own id). ``exit_code``/``signal`` mirror
    Slurm's ``ExitCode=code:signal``. ``end_time`` is when the job ended or, while it runs, when
    its time limit expires; None when unknown or unlimited.
    """

    job_id: str
    name: str
    state: SlurmState
    nodes: list[str] = field(default_factory=list)
    exit_code: int | None = None
    signal: int | None = None
    end_time: datetime | None = None
    time_limit: timedelta | None = None
    reason: str | None = None
    raw_id: str | None = None
    native_state: str = ""


# ---------------------------------------------------------------- small value parsers

_NONE_WORDS = frozenset({"", "none", "n/a", "unknown", "(null)", "none assigned", "unlimited", "infinite",
                         "partition_limit", "not_set"})
_JOB_ID = re.compile(r"^(\d+)(?:_(\d+|\[([0-9,\-%]+)\])|\+\d+)?$")
_DURATION = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def _is_none(text: str | None) -> bool:
    return text is None or text.strip().lower() in _NONE_WORDS


def expand_hostlist(text: str | None) -> list[str]:
    """Expand a Slurm hostlist (``node[1-3,7],gpu01``) into host names; empty/"(null)"/"N/A" → []."""
    if text is None or _is_none(text):
        return []
    try:
        return [str(h) for h in hostlist.expand_hostlist(text.strip())]
    except hostlist.BadHostlist as exc:
        raise SlurmParseError("hostlist", text) from exc


def expand_job_ids(text: str) -> list[str]:
    """Expand a job id as Slurm prints it: ``12_[2,4-6%2]`` → [12_2, 12_4, 12_5, 12_6].

    ``12``, ``12_3`` (array task) and ``12+1`` (het job component) come back unchanged.
    """
    text = text.strip()
    match = _JOB_ID.match(text)
    if not match:
        raise SlurmParseError("job id", text)
    base, ranges = match.group(1), match.group(3)
    if ranges is None:
        return [text]
    tasks: list[str] = []
    for part in ranges.split("%", 1)[0].split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or not (hi.isdigit() or not hi) or int(hi or lo) < int(lo):
            raise SlurmParseError("array job id", text)
        tasks.extend(f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1))
    return tasks


def parse_duration(text: str | None) -> timedelta | None:
    """Parse a Slurm duration (``D-HH:MM:SS``, ``HH:MM:SS``, ``MM:SS``, ``D-HH``, plain minutes); unlimited → None."""
    if text is None or _is_none(text):
        return None
    match = _DURATION.match(text.strip())
    if not match:
        raise SlurmParseError("duration", text)
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return timedelta(days=days, hours=a or 0, minutes=b or 0, seconds=c or 0)
    if c is not None:
        return timedelta(hours=a or 0, minutes=b or 0, seconds=c)
    if b is not None:
        return timedelta(minutes=a or 0, seconds=b)
    return timedelta(minutes=a or 0)


def parse_timestamp(text: str | None) -> datetime | None:
    """Parse a Slurm ISO timestamp (local time, as with ``SLURM_TIME_FORMAT=standard``); "Unknown" → None."""
    if text is None or _is_none(text):
        return None
    try:
        return datetime.fromisoformat(text.strip()).astimezone()
    except ValueError as exc:
        raise SlurmParseError("timestamp", text) from exc


def parse_exit_code(text: str | None) -> tuple[int | None, int | None]:
    """Parse ``"3:0"`` (sacct/scontrol) → (3, 0), or a raw wait status (``"768"``, squeue) → (3, 0)."""
    if text is None or _is_none(text):
        return None, None
    code, sep, sig = text.strip().partition(":")
    if not code.isdigit() or (sep and not sig.isdigit()):
        raise SlurmParseError("exit code", text)
    if sep:
        return int(code), int(sig)
    return _wait_status(int(code))


def _final_exit(state: SlurmState, code: int | None, sig: int | None) -> tuple[int | None, int | None]:
    """Slurm reports ExitCode 0:0 for jobs that have not ended yet; report None instead."""
    return (code, sig) if state.is_terminal or state is SlurmState.COMPLETING else (None, None)


def _wait_status(status: int) -> tuple[int, int]:
    return (status >> 8) & 0xFF, status & 0x7F


def _epoch(value: Any) -> datetime | None:
    number = _number(value)
    return datetime.fromtimestamp(number, tz=UTC) if number else None


def _number(value: Any) -> int | None:
    """An int, or the ``{"set": true, "infinite": false, "number": N}`` object of Slurm 23.02+."""
    if isinstance(value, dict):
        if not value.get("set", True) or value.get("infinite", False):
            return None
        value = value.get("number")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _minutes(value: Any) -> timedelta | None:
    number = _number(value)
    return None if number is None else timedelta(minutes=number)


# ---------------------------------------------------------------- sbatch

def parse_sbatch_parsable(text: str) -> tuple[str, str | None]:
    """Parse ``sbatch --parsable`` output: ``"123\\n"`` → ("123", None), ``"123;cluster"`` → ("123", "cluster")."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SlurmParseError("sbatch --parsable output", text)
    job_id, _, cluster = lines[-1].partition(";")
    if not job_id.isdigit():
        raise SlurmParseError("sbatch --parsable output", text)
    return job_id, cluster or None


# ---------------------------------------------------------------- JSON (openapi v0.0.38)

def _load_jobs(text: str, what: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SlurmParseError(what, text) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise SlurmParseError(what, text)
    errors = doc.get("errors") or []
    if errors and not doc["jobs"]:
        raise SlurmParseError(f"{what} (errors reported)", json.dumps(errors))
    return [j for j in doc["jobs"] if isinstance(j, dict)]


def _json_exit(value: Any) -> tuple[int | None, int | None]:
    if isinstance(value, dict):  # v0.0.39+: {"status": [...], "return_code": {...}, "signal": {...}}
        signal = value.get("signal") or {}
        return _number(value.get("return_code")), _number(signal.get("id", signal.get("signal_id")))
    number = _number(value)
    return (None, None) if number is None else _wait_status(number)


def _json_ids(job: Mapping[str, Any]) -> list[str]:
    job_id = str(job["job_id"])
    array_id = _number(job.get("array_job_id"))
    task = _number(job.get("array_task_id"))
    task_string = job.get("array_task_string") or ""
    if array_id and task is not None:
        return [f"{array_id}_{task}"]
    if array_id and task_string:
        return expand_job_ids(f"{array_id}_[{task_string}]")
    return [job_id]


def _json_end(job: Mapping[str, Any], state: SlurmState, limit: timedelta | None) -> datetime | None:
    # pending jobs carry a made-up end_time; running ones without a limit start + 365 days
    if state is SlurmState.PENDING or (limit is None and not state.is_terminal):
        return None
    return _epoch(job.get("end_time"))


def _squeue_json_job(job: Mapping[str, Any]) -> list[JobInfo]:
    state = translate_state(job.get("job_state"))
    limit = _minutes(job.get("time_limit"))
    code, sig = _final_exit(state, *_json_exit(job.get("exit_code")))
    ids = _json_ids(job)
    info = JobInfo(
        job_id=ids[0], name=str(job.get("name") or ""), state=state, nodes=expand_hostlist(job.get("nodes")),
        exit_code=code, signal=sig, end_time=_json_end(job, state, limit), time_limit=limit,
        reason=None if _is_none(job.get("state_reason")) else str(job["state_reason"]),
        raw_id=str(job["job_id"]) if len(ids) == 1 else None, native_state=str(job.get("job_state")),
    )
    return [replace(info, job_id=i) for i in ids]


def parse_squeue_json(text: str) -> list[JobInfo]:
    """Parse ``squeue --json``. Slurm 22.05 ignores ``--jobs``/``--states`` with ``--json``: filter the result."""
    try:
        return [info for job in _load_jobs(text, "squeue --json output") for info in _squeue_json_job(job)]
    except (KeyError, TypeError) as exc:
        raise SlurmParseError("squeue --json job", text) from exc


# ---------------------------------------------------------------- delimited squeue / sacct

SQUEUE_FIELDS = ("JobArrayID", "JobID", "State", "NodeList", "Reason", "EndTime", "TimeLimit", "exit_code", "Name")
"""``squeue --Format`` fields in the order ``parse_squeue_delimited`` expects (Name last: it may hold ``|``)."""
SQUEUE_FORMAT = ",".join(f"{f}:|" for f in SQUEUE_FIELDS)
"""The ``--Format=`` value: ``:|`` gives each field a ``|`` suffix and no width limit."""
SACCT_FIELDS = ("JobID", "JobIDRaw", "State", "ExitCode", "NodeList", "End", "TimelimitRaw", "Reason", "JobName")
"""``sacct -o`` fields in the order ``parse_sacct_delimited`` expects (JobName last)."""


def _split_row(line: str, count: int, what: str) -> list[str]:
    parts = line.split("|", count - 1)
    if len(parts) != count:
        raise SlurmParseError(what, line)
    return parts


def parse_squeue_delimited(text: str) -> list[JobInfo]:
    """Parse ``squeue --noheader --Format=SQUEUE_FORMAT`` output (one row per job; pending arrays expanded)."""
    infos: list[JobInfo] = []
    for line in filter(None, text.splitlines()):
        line = line[:-1] if line.endswith("|") else line
        display, raw, state, nodes, reason, end, limit, code, name = _split_row(
            line, len(SQUEUE_FIELDS), "squeue row")
        ids = expand_job_ids(display)
        slurm_state = translate_state(state)
        exit_code, sig = _final_exit(slurm_state, *parse_exit_code(code))
        info = JobInfo(
            job_id=ids[0], name=name, state=slurm_state, nodes=expand_hostlist(nodes),
            exit_code=exit_code, signal=sig, end_time=parse_timestamp(end), time_limit=parse_duration(limit),
            reason=None if _is_none(reason) else reason, raw_id=raw if len(ids) == 1 else None, native_state=state,
        )
        infos.extend(replace(info, job_id=i) for i in ids)
    return infos


def parse_sacct_delimited(text: str) -> list[JobInfo]:
    """Parse ``sacct -X --parsable2 --noheader -o SACCT_FIELDS`` output; steps are skipped, the last row per id wins."""
    latest: dict[str, JobInfo] = {}
    for line in filter(None, text.splitlines()):
        display, raw, state, code, nodes, end, limit, reason, name = _split_row(
            line, len(SACCT_FIELDS), "sacct row")
        if "." in display:
            continue
        ids = expand_job_ids(display)
        slurm_state = translate_state(state)
        exit_code, sig = _final_exit(slurm_state, *parse_exit_code(code))
        info = JobInfo(
            job_id=ids[0], name=name, state=slurm_state, nodes=expand_hostlist(nodes),
            exit_code=exit_code, signal=sig, end_time=parse_timestamp(end), time_limit=parse_duration(limit),
            reason=None if _is_none(reason) else reason, raw_id=raw if raw and len(ids) == 1 else None,
            native_state=state,
        )
        latest.update((i, replace(info, job_id=i)) for i in ids)
    return list(latest.values())


# ---------------------------------------------------------------- scontrol -o show job

SCONTROL_SPACE_KEYS = frozenset({
    "JobName", "Comment", "AdminComment", "SystemComment", "Command", "WorkDir", "StdIn", "StdOut", "StdErr",
    "Reason", "Features", "Dependency", "Licenses", "Reservation", "Network", "Container",
})
"""``scontrol`` keys whose values may contain spaces."""
SCONTROL_KEYS = SCONTROL_SPACE_KEYS | frozenset({
    "JobId", "ArrayJobId", "ArrayTaskId", "ArrayTaskThrottle", "HetJobId", "HetJobOffset", "HetJobIdSet",
    "UserId", "GroupId", "MCS_label", "Priority", "Nice", "Account", "QOS", "JobState", "Requeue", "Restarts",
    "BatchFlag", "Reboot", "ExitCode", "DerivedExitCode", "RunTime", "TimeLimit", "TimeMin", "SubmitTime",
    "EligibleTime", "AccrueTime", "StartTime", "EndTime", "Deadline", "SuspendTime", "SecsPreSuspend",
    "LastSchedEval", "Scheduler", "Partition", "AllocNode:Sid", "ReqNodeList", "ExcNodeList", "NodeList",
    "BatchHost", "NumNodes", "NumCPUs", "NumTasks", "CPUs/Task", "ReqB:S:C:T", "TRES", "Socks/Node",
    "NtasksPerN:B:S:C", "CoreSpec", "MinCPUsNode", "MinMemoryCPU", "MinMemoryNode", "MinTmpDiskNode",
    "DelayBoot", "OverSubscribe", "Contiguous", "Power", "TresPerNode", "TresPerTask", "MailUser", "MailType",
    "CpusPerTres", "MemPerTres", "TresPerJob", "NodeListIndices", "Prefer", "StepMgrEnabled",
})
"""Keys ``scontrol -o show job`` prints in 22.05 (others are accepted where no space-valued key is open)."""
_KEY = re.compile(r"^([A-Za-z][A-Za-z0-9_:/]*)=(.*)$", re.DOTALL)


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Split one ``scontrol -o`` line into ``{key: value}``; values of ``SCONTROL_SPACE_KEYS`` may contain spaces."""
    record: dict[str, str] = {}
    key: str | None = None
    for token in line.strip().split(" "):
        match = _KEY.match(token)
        starts_key = match is not None and (
            key is None or key not in SCONTROL_SPACE_KEYS or match.group(1) in SCONTROL_KEYS)
        if match is not None and starts_key:
            key = match.group(1)
            record[key] = match.group(2)
        elif key is not None:
            record[key] += " " + token
        elif token:
            raise SlurmParseError("scontrol -o line", line)
    return record


def parse_scontrol_show_job(text: str) -> list[JobInfo]:
    """Parse ``scontrol -o show job [ID]`` (one job per line; an array job id lists all its tasks)."""
    infos = []
    for line in filter(str.strip, text.splitlines()):
        rec = parse_scontrol_record(line)
        if "JobId" not in rec or "JobState" not in rec:
            raise SlurmParseError("scontrol -o show job line", line)
        infos.extend(_scontrol_info(rec))
    return infos


def _scontrol_info(rec: Mapping[str, str]) -> list[JobInfo]:
    state = translate_state(rec["JobState"])
    array, task = rec.get("ArrayJobId"), rec.get("ArrayTaskId", "")
    ids = expand_job_ids(f"{array}_{task}" if array and task.isdigit() else
                         f"{array}_[{task}]" if array and task else rec["JobId"])
    code, sig = _final_exit(state, *parse_exit_code(rec.get("ExitCode")))
    end = None if state is SlurmState.PENDING else parse_timestamp(rec.get("EndTime"))
    info = JobInfo(
        job_id=ids[0], name=rec.get("JobName", ""), state=state, nodes=expand_hostlist(rec.get("NodeList")),
        exit_code=code, signal=sig, end_time=end, time_limit=parse_duration(rec.get("TimeLimit")),
        reason=None if _is_none(rec.get("Reason")) else rec["Reason"],
        raw_id=rec["JobId"] if len(ids) == 1 else None, native_state=rec["JobState"],
    )
    return [replace(info, job_id=i) for i in ids]


# ---------------------------------------------------------------- sinfo

SINFO_NODE_FORMAT = "%N|%P|%T|%C"
"""``sinfo --Node --format``: node, partition, long state, CPUs allocated/idle/other/total."""


@dataclass(frozen=True)
class NodeInfo:
    """One node as ``sinfo --Node`` reports it (a node in several partitions: merged)."""

    name: str
    state: str
    """Slurm's long state, lower case (``idle``, ``mixed``, ``allocated``, ``drained``, ``down*``, ``idle~`` ...)."""
    idle_cpus: int
    partitions: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        """Up and taking jobs now: idle or mixed, with no flag (``*`` not responding, ``~``
        powered down, ``#`` powering up, ``!`` powering down, ``%`` ``@`` ``$`` ``^`` ``-`` ...)."""
        return self.state in ("idle", "mixed")


def parse_sinfo_nodes(text: str) -> dict[str, NodeInfo]:
    """``sinfo --noheader --Node --format=%N|%P|%T|%C`` output, by node name."""
    nodes: dict[str, NodeInfo] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, partition, state, cpus = _split_row(line, 4, "sinfo")
        counts = cpus.split("/")
        if len(counts) != 4 or not counts[1].isdigit():
            raise SlurmParseError("sinfo", line)
        partition = partition.rstrip("*")
        known = nodes.get(name)
        partitions = (*known.partitions, partition) if known else (partition,)
        nodes[name] = NodeInfo(name=name, state=state.strip().lower(), idle_cpus=int(counts[1]),
                               partitions=partitions)
    return nodes

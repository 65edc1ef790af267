"""``SlurmClient``: submit, query and cancel jobs through Slurm's command-line tools.

All commands go through an injected ``CommandRunner``. Status queries are batched: one
``squeue`` call for every id, then one ``sacct`` call for the ids that already left the
controller (after ``MinJobAge``). ``sacct`` is tried against slurmdbd first; when the site
has no accounting database ("Slurm accounting storage is disabled") the client switches to
``sacct -c`` (the jobcomp/filetxt log) and remembers that, and when neither works it logs
once and reports only what ``squeue`` knows.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shlex
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.slurm.commands import CommandResult, CommandRunner, SlurmCommandError, check
from scalebox_hpc.slurm.parse import (
    SACCT_FIELDS,
    SINFO_NODE_FORMAT,
    SQUEUE_FORMAT,
    JobInfo,
    NodeInfo,
    parse_sacct_delimited,
    parse_sbatch_parsable,
    parse_scontrol_show_job,
    parse_sinfo_nodes,
    parse_squeue_delimited,
    parse_squeue_json,
)

logger = logging.getLogger(__name__)

_UNKNOWN_JOB = "invalid job id specified"
_NO_ACCOUNTING = ("accounting storage is disabled", "not configured with slurmdbd", "jobcomp/none")


class _Accounting(enum.Enum):
    UNPROBED = "unprobed"
    DATABASE = "database"  # plain sacct (slurmdbd)
    JOBCOMP = "jobcomp"  # sacct -c (JobCompType=jobcomp/filetxt)
    NONE = "none"


class _Outcome(enum.Enum):
    UNAVAILABLE = "unavailable"
    FAILED = "failed"


_SOURCES: dict[_Accounting, tuple[_Accounting, ...]] = {
    _Accounting.UNPROBED: (_Accounting.DATABASE, _Accounting.JOBCOMP),
    _Accounting.DATABASE: (_Accounting.DATABASE,),
    _Accounting.JOBCOMP: (_Accounting.JOBCOMP,),
    _Accounting.NONE: (),
}


class SlurmClient:
    """Submit, query and cancel Slurm jobs.

    ``use_json``: True forces ``squeue --json``, False the delimited format, None (default)
    probes ``squeue --help`` once and uses JSON when offered. ``sacct`` always uses the
    delimited format: ``sacct --json`` needs slurmdbd, and in 22.05 (openapi v0.0.38) it
    reports any normal exit as return code 0. ``timeout`` bounds every command (seconds).

    ``cluster``: every command gets ``-M CLUSTER`` (Slurm multi-cluster: the clusters share a
    slurmdbd, and any of their client configs reaches all of them). ``prefix``: argv put before
    every command, for a cluster whose commands must run elsewhere (``["ssh", "login2"]``: its
    own login node); with a prefix the cluster is that host's local one, so no ``-M``.
    """

    def __init__(
        self, runner: CommandRunner, *, use_json: bool | None = None, timeout: float = 30.0,
        cluster: str | None = None, prefix: Sequence[str] = (),
    ) -> None:
        self._runner = runner
        self._use_json = use_json
        self._timeout = timeout
        self._prefix = [str(a) for a in prefix]
        self._cluster_args = ["-M", cluster] if cluster and not self._prefix else []
        self.cluster = cluster or ""
        """The cluster this client talks to ('' for the local default), as stage jobs record it."""
        self._accounting = _Accounting.UNPROBED
        self.commands_run = 0
        """Slurm commands run so far that reach the controller (or slurmdbd): every one but the
        local ``squeue --help`` probe. An autoscale pass counts its calls by the difference."""

    def json_enabled(self) -> bool:
        """Whether ``squeue --json`` is used (probed once with ``squeue --help`` when not forced)."""
        if self._use_json is None:
            result = self._run(["squeue", "--help"], counted=False)
            self._use_json = result.ok and "--json" in result.stdout
            logger.debug("squeue --json probed: %s", "used" if self._use_json else "not offered",
                         extra={"action": "slurm_probe_json", "json": self._use_json})
        return self._use_json

    # ------------------------------------------------------------ submit / cancel

    def submit(self, script: str | os.PathLike[str], extra_args: Sequence[str] = ()) -> str:
        """Submit a batch script with ``sbatch --parsable``; return the job id.

        ``script`` is a path (``Path`` or a string) or the script text itself (a string
        starting with ``#!``, passed on stdin). ``extra_args`` are sbatch options, placed before
        the script. Raises ``SlurmCommandError`` with sbatch's message when it refuses.
        """
        text = script if isinstance(script, str) and script.startswith("#!") else None
        argv = ["sbatch", "--parsable", *extra_args]
        if text is None:
            argv.append(str(Path(script)))
        result = check(argv, self._run(argv, input=text))
        job_id, cluster = parse_sbatch_parsable(result.stdout)
        logger.info("slurm job %s submitted%s", job_id, f" on cluster {cluster}" if cluster else "",
                    extra={"action": "slurm_submit", "job_id": job_id, "cluster": cluster})
        return job_id

    def cancel(self, job_ids: Iterable[str], signal: str | None = None) -> None:
        """Cancel jobs (``scancel``), or with ``signal`` only send it to every process of them (``--full``).

        Unknown or finished ids are not an error (scancel 22.05 exits 0 for them).
        """
        ids = checked_ids(job_ids)
        if not ids:
            return
        # ids come from the database: validated, and after `--` so none is taken for an option (F23)
        argv = ["scancel", *([f"--signal={signal}", "--full"] if signal else []), "--", *ids]
        check(argv, self._run(argv))
        logger.info("slurm jobs %s %s", ",".join(ids), f"sent {signal}" if signal else "cancelled",
                    extra={"action": "slurm_cancel", "job_ids": ids, "signal": signal})

    # ------------------------------------------------------------ status

    def status(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """Current state of each id: one ``squeue`` call, then one ``sacct`` call for ids squeue no longer knows.

        The result is keyed by the requested ids (an id matches a job's display id, e.g.
        ``12_3``, or its numeric raw id); ids neither command knows are absent.
        """
        ids = checked_ids(job_ids)
        if not ids:
            return {}
        found = _match(ids, self._squeue(ids))
        missing = [i for i in ids if i not in found]
        if missing:
            found.update(_match(missing, self._sacct(missing)))
        return found

    def show_job(self, job_id: str) -> JobInfo | None:
        """The job as ``scontrol -o show job`` sees it; None when the controller no longer knows it."""
        checked_ids([job_id])
        argv = ["scontrol", "-o", "show", "job", job_id]
        result = self._run(argv)
        if not result.ok and _UNKNOWN_JOB in result.stderr.lower():
            return None
        infos = parse_scontrol_show_job(check(argv, result).stdout)
        return _match([job_id], infos).get(job_id)

    def job_end_time(self, job_id: str) -> datetime | None:
        """When the job ends: its time-limit expiry while it runs, its real end once over; None if unknown."""
        info = self.show_job(job_id)
        return None if info is None else info.end_time

    def nodes(self, names: Iterable[str], partition: str | None = None) -> dict[str, NodeInfo]:
        """The state and idle CPUs of these nodes (of ``partition`` when given), one ``sinfo``
        call; names Slurm does not know are absent."""
        wanted = _unique(names)
        if not wanted:
            return {}
        argv = ["sinfo", "--noheader", "--Node", f"--nodes={','.join(wanted)}", f"--format={SINFO_NODE_FORMAT}"]
        if partition:
            argv.append(f"--partition={partition}")
        return parse_sinfo_nodes(check(argv, self._run(argv)).stdout)

    # ------------------------------------------------------------ internals

    def _run(self, argv: Sequence[str], *, input: str | None = None, counted: bool = True) -> CommandResult:
        if counted:
            self.commands_run += 1
        # -M right after the command name: before any option taken from data, and before sbatch's script
        full = [argv[0], *self._cluster_args, *argv[1:]]
        if self._prefix:
            # ssh joins its arguments into one remote shell command: quote each, so a value from
            # the pipeline file (a partition, a node list) stays one argument there
            remote = Path(self._prefix[0]).name == "ssh"
            full = [*self._prefix, *([shlex.quote(a) for a in full] if remote else full)]
        return self._runner.run(full, timeout=self._timeout, input=input)

    def _squeue(self, ids: list[str]) -> list[JobInfo]:
        jobs = f"--jobs={','.join(ids)}"
        if self.json_enabled():  # 22.05 ignores --jobs/--states here and lists every job
            argv = ["squeue", "--json", "--states=all", jobs]
            return parse_squeue_json(check(argv, self._run(argv)).stdout)
        argv = ["squeue", "--noheader", "--states=all", jobs, f"--Format={SQUEUE_FORMAT}"]
        result = self._run(argv)
        if not result.ok and _UNKNOWN_JOB in result.stderr.lower():
            return []  # a single id the controller no longer knows
        return parse_squeue_delimited(check(argv, result).stdout)

    def _sacct(self, ids: list[str]) -> list[JobInfo]:
        for source in _SOURCES[self._accounting]:
            outcome = self._sacct_call(ids, completion=source is _Accounting.JOBCOMP)
            if isinstance(outcome, CommandResult):
                self._accounting = source
                return parse_sacct_delimited(outcome.stdout)
            if outcome is _Outcome.FAILED:
                return []  # logged; try the same source next time
        if self._accounting is not _Accounting.NONE:
            self._accounting = _Accounting.NONE
            logger.warning(
                "no Slurm accounting: finished jobs are visible to squeue only for MinJobAge",
                extra={"action": "slurm_no_accounting"},
            )
        return []

    def _sacct_call(self, ids: list[str], *, completion: bool) -> CommandResult | _Outcome:
        """One sacct call: its result, ``UNAVAILABLE`` (no such accounting here) or ``FAILED`` (logged)."""
        argv = ["sacct", *(["-c"] if completion else []), "-X", "--parsable2", "--noheader",
                f"--jobs={','.join(ids)}", f"--format={','.join(SACCT_FIELDS)}"]
        try:
            result = self._run(argv)
        except SlurmCommandError as exc:
            logger.warning("sacct failed for jobs %s: %s", ",".join(ids), exc,
                           extra={"action": "slurm_sacct_failed", "job_ids": ids, "error": str(exc)})
            return _Outcome.FAILED
        if result.ok:
            return result
        if any(marker in result.stderr.lower() for marker in _NO_ACCOUNTING):
            return _Outcome.UNAVAILABLE
        error = SlurmCommandError(argv, result.returncode, result.stderr)
        logger.warning("sacct failed for jobs %s: %s", ",".join(ids), error,
                       extra={"action": "slurm_sacct_failed", "job_ids": ids, "error": str(error)})
        return _Outcome.FAILED


_STORED_JOB_ID = re.compile(r"[0-9]+(?:_[0-9]+)?")
"""A job id as sbatch gives it and scalebox stores it: ``123``, or an array task ``123_4``."""


class InvalidJobIdError(ScaleboxError):
    """A Slurm job id read back (from the database) is not one sbatch gave."""

    hint = "the row of sbx_stage_jobs was changed by hand (or by someone else): check it; it is not passed to Slurm"


def checked_ids(job_ids: Iterable[str]) -> list[str]:
    """The ids, unique, in order; :class:`InvalidJobIdError` if any is not ``123`` or ``123_4``
    (a stored ``--me`` or ``-u alice`` would make scancel cancel every job of the caller)."""
    ids = _unique(job_ids)
    bad = [i for i in ids if not _STORED_JOB_ID.fullmatch(i)]
    if bad:
        raise InvalidJobIdError(f"refusing Slurm job id(s) {', '.join(repr(b) for b in bad[:5])}: "
                                "a job id is digits, or digits_digits for an array task")
    return ids


def _unique(job_ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(str(i).strip() for i in job_ids if str(i).strip()))


def _match(ids: Sequence[str], infos: Iterable[JobInfo]) -> dict[str, JobInfo]:
    """Key ``infos`` by the requested ids, matching display ids first, then raw numeric ids."""
    by_display: dict[str, JobInfo] = {}
    by_raw: dict[str, JobInfo] = {}
    for info in infos:
        by_display[info.job_id] = info
        if info.raw_id:
            by_raw.setdefault(info.raw_id, info)
    out: dict[str, JobInfo] = {}
    for job_id in ids:
        match = by_display.get(job_id) or by_raw.get(job_id)
        if match is not None:
            out[job_id] = match
    return out

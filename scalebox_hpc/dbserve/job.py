"""The served database as a Slurm job, and its hand-over to the next job.

The job runs ``scalebox db serve --here --in-job`` on its node. ``handover_before`` its
walltime ends (or when ``db serve --handover-now`` asks), it hands over:

1. it submits its successor (the same script and sbatch options, kept in ``serve-job.json``);
2. the successor, once running, writes ``handover-ready.json`` and waits;
3. the old job records ``handover_started`` and stops its server (fast shutdown: sessions
   ended, a checkpoint written), then writes ``handover-released.json``;
4. the successor starts the server on its node (any node: the data dir is on the shared
   filesystem) and rewrites the service file with its host, port and generation + 1.

Clients see an outage from 3 to 4, which they survive: they retry, and every connect re-reads
the service file (:func:`scalebox_hpc.servicefile.refreshed`). If the successor is not running
by ``MARGIN`` before the walltime the old job hands over anyway (the successor starts whenever
Slurm runs it); if the predecessor's job ended without releasing, the successor starts
(PostgreSQL recovers from its WAL).

The builders and the timing are pure (the clock is injected); :func:`serve_in_job` does the I/O.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from scalebox_hpc import servicefile
from scalebox_hpc.dbserve import server
from scalebox_hpc.dbserve.server import Layout
from scalebox_hpc.errors import EmbeddedDatabaseError, ScaleboxError
from scalebox_hpc.servicefile import ServiceInfo
from scalebox_hpc.slurm import JobEnvironment, SlurmClient, SlurmState, SubprocessRunner

logger = logging.getLogger(__name__)

JOB_NAME = "sbx-db"
MARGIN = timedelta(seconds=60)
"""Hand over by this long before the walltime even when the successor is not running yet."""
JOB_FILE = "serve-job.json"
RETRY = timedelta(seconds=30)
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The wall clock, UTC (the default :data:`Clock`)."""
    return datetime.now(UTC)


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d`` as a timedelta."""
    match = _DURATION.match(text)
    if not match:
        raise EmbeddedDatabaseError(f"{text!r} is not a duration", hint="write e.g. 600, 90s, 10m or 2h")
    return timedelta(seconds=int(match.group(1)) * _UNIT[match.group(2)])


def handover_at(end: datetime | None, before: timedelta) -> datetime | None:
    """When to hand over: ``before`` the job's end (None: the job has no known end)."""
    return None if end is None else end - before


def handover_due(now: datetime, end: datetime | None, before: timedelta) -> bool:
    """True once ``now`` reaches :func:`handover_at`."""
    at = handover_at(end, before)
    return at is not None and now >= at


def ready_deadline(now: datetime, end: datetime | None, forced_wait: timedelta = timedelta(minutes=10)) -> datetime:
    """Until when the old job waits for its successor to run: ``MARGIN`` before its end (not
    before now), or, with no known end, ``forced_wait`` from now."""
    if end is None:
        return now + forced_wait
    return max(now, end - MARGIN)


def sbatch_args(
    *, log: Path, partition: str | None = None, time_limit: str | None = None, account: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The sbatch options of a database job: one task on one node, its log in ``log``."""
    args = [f"--job-name={JOB_NAME}", "--nodes=1", "--ntasks=1", f"--output={log}", "--open-mode=append"]
    if partition:
        args.append(f"--partition={partition}")
    if time_limit:
        args.append(f"--time={time_limit}")
    if account:
        args.append(f"--account={account}")
    return [*args, *extra]


def job_script(python: str, data: Path, port: int, handover_before: timedelta) -> str:
    """The batch script: exec ``scalebox db serve --here --in-job`` (every value quoted)."""
    argv = [python, "-m", "scalebox_hpc", "-v", "db", "serve", "--here", "--in-job", "--data", str(data),
            "--port", str(int(port)), "--handover-before", f"{int(handover_before.total_seconds())}s"]
    return "#!/bin/bash\n# scalebox served database (scalebox db serve --slurm)\nexec " + shlex.join(argv) + "\n"


def job_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment sbatch sees: this one without an enclosing job's SLURM_* variables."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}


def slurm_client() -> SlurmClient:
    """The Slurm adapter, for sbatch from a login node or from inside the database job."""
    return SlurmClient(SubprocessRunner(base_env=job_env()))


def submit(lay: Layout, client: SlurmClient, args: Sequence[str], script: str) -> str:
    """Submit a database job and keep its script and options for its successors."""
    job_file = lay.service / JOB_FILE
    job_file.write_text(json.dumps({"args": list(args), "script": script}))
    job_file.chmod(0o600)
    return client.submit(script, list(args))


def resubmit(lay: Layout, client: SlurmClient) -> str:
    """Submit the successor: the same script and options as the first job."""
    saved = json.loads((lay.service / JOB_FILE).read_text())
    args, script = saved.get("args"), saved.get("script")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or not isinstance(script, str):
        raise EmbeddedDatabaseError(f"{lay.service / JOB_FILE} is not a saved database job")
    return client.submit(script, args)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(value))
    tmp.chmod(0o600)
    os.replace(tmp, path)


def request_handover(lay: Layout, job_id: str) -> None:
    """Ask the running database job ``job_id`` to hand over now (it looks every half second)."""
    _write_json(lay.handover_file("request"), {"job_id": job_id})


def _requested(lay: Layout, job_id: str) -> bool:
    request = _read_json(lay.handover_file("request"))
    return request is not None and request.get("job_id") == job_id


def _alive(client: SlurmClient, job_id: str) -> bool:
    info = client.status([job_id]).get(job_id)
    return info is not None and info.state in (SlurmState.RUNNING, SlurmState.PENDING)


def wait_for_release(
    lay: Layout, prev: ServiceInfo, own_job: str, client: SlurmClient, *, sleep: Callable[[float], None] = time.sleep,
) -> str:
    """As the successor: announce this job, then wait until the predecessor released the data
    dir (returns when it began to shut down), or its job is gone ('')."""
    _write_json(lay.handover_file("ready"), {"job_id": own_job, "generation": prev.generation + 1})
    logger.info("waiting for generation %d (job %s) to hand over", prev.generation, prev.job_id)
    checked = time.monotonic()
    while True:
        released = _read_json(lay.handover_file("released"))
        if released is not None and released.get("generation") == prev.generation:
            return str(released.get("at") or "")
        if time.monotonic() - checked > 10:
            checked = time.monotonic()
            if prev.job_id is not None and not _alive(client, prev.job_id):
                logger.warning("job %s ended without handing over: starting anyway", prev.job_id)
                return ""
        sleep(0.1)


def hand_over(
    lay: Layout, served: server.Served, successor: str, end: datetime | None, *,
    clock: Clock = utcnow, sleep: Callable[[float], None] = time.sleep,
) -> None:
    """As the old job, once the successor is submitted: wait for it to run, stop, release."""
    info = served.info
    servicefile.write(lay.service_file, info.with_changes(state="handover"))
    logger.info("hand-over: job %s submitted to follow job %s", successor, info.job_id)
    deadline = ready_deadline(clock(), end)
    while clock() < deadline:
        ready = _read_json(lay.handover_file("ready"))
        if ready is not None and ready.get("job_id") == successor and ready.get("generation") == info.generation + 1:
            break
        sleep(0.1)
    else:
        logger.warning("hand-over: job %s is not running yet; stopping anyway", successor)
    started = clock().isoformat(timespec="milliseconds")
    servicefile.write(lay.service_file, info.with_changes(state="handover", handover_started=started))
    server.stop_served(lay, served)
    _write_json(lay.handover_file("released"), {"generation": info.generation, "at": started})
    lay.handover_file("request").unlink(missing_ok=True)
    logger.info("hand-over: generation %d stopped (shutdown began %s)", info.generation, started)


class _Stop:
    """SIGINT/SIGTERM (``db stop``: ``scancel --signal=INT``) ask the supervisor to stop."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.event.set())


def supervise(
    lay: Layout, served: server.Served, *, client: SlurmClient | None, end: datetime | None,
    before: timedelta, clock: Clock = utcnow, sleep: Callable[[float], None] = time.sleep,
    stop: threading.Event | None = None,
) -> int:
    """Watch the server until it is told to stop (0), hands over (0) or dies (1). A successor
    that cannot be submitted (sbatch refuses) is tried again every ``RETRY`` while this one
    keeps serving."""
    stop = stop or threading.Event()
    info = served.info
    not_before = clock()
    while True:
        if served.proc.poll() is not None:
            server.release(served)
            server.mark_stopped(lay, info)
            if stop.is_set() or served.proc.returncode == 0:  # `scancel --signal=INT --full` reached it first
                logger.info("stopped generation %d", info.generation)
                return 0
            logger.error("the served PostgreSQL exited (%s); see %s", served.proc.returncode, lay.log)
            return 1
        if stop.is_set():
            server.stop_served(lay, served)
            server.mark_stopped(lay, info)
            logger.info("stopped generation %d", info.generation)
            return 0
        if client is not None and info.job_id is not None and clock() >= not_before and (
            handover_due(clock(), end, before) or _requested(lay, info.job_id)
        ):
            try:
                successor = resubmit(lay, client)
            except (ScaleboxError, OSError, ValueError) as exc:
                logger.error("hand-over: cannot submit the next job (%s); still serving, trying again in %s",
                             exc, RETRY)
                not_before = clock() + RETRY
            else:
                hand_over(lay, served, successor, end, clock=clock, sleep=sleep)
                return 0
        sleep(0.5)


def serve_in_job(lay: Layout, *, port: int, before: timedelta) -> int:
    """The database job's body: wait for the predecessor if any, serve, supervise."""
    job = JobEnvironment.from_env()
    client = slurm_client()
    stop = _Stop()
    stop.install()
    prev = servicefile.load(lay.service_file)
    generation, since = 0, ""
    if prev is not None:
        generation = prev.generation + 1
        if prev.state != "stopped":
            if prev.job_id is None:
                raise EmbeddedDatabaseError(f"the database is served on {prev.host}, not by a job",
                                            hint="`scalebox db stop` it first")
            if prev.job_id == job.job_id:
                raise EmbeddedDatabaseError(f"job {job.job_id} already serves generation {prev.generation}")
            since = wait_for_release(lay, prev, job.job_id, client)
    served = server.serve(lay, port=port, generation=generation, job_id=job.job_id, handover_started=since)
    for name in ("ready", "released"):
        lay.handover_file(name).unlink(missing_ok=True)
    try:
        end = client.job_end_time(job.job_id)
    except ScaleboxError as exc:  # serve on; Slurm's SIGTERM at the walltime still stops it cleanly
        logger.error("cannot read job %s's end time (%s): no hand-over before the walltime", job.job_id, exc)
        end = None
    logger.info("job %s serves until %s; hand-over %s before", job.job_id, end, before)
    sys.stdout.flush()
    return supervise(lay, served, client=client, end=end, before=before, stop=stop.event)

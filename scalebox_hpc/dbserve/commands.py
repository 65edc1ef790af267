"""What ``scalebox db serve`` / ``db stop`` do (the CLI's click layer only parses and prints)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from scalebox_hpc import embedded, servicefile
from scalebox_hpc.dbserve import job, server
from scalebox_hpc.errors import EmbeddedDatabaseError
from scalebox_hpc.servicefile import ServiceInfo


def _current(lay: server.Layout) -> ServiceInfo | None:
    info = servicefile.load(lay.service_file)
    return None if info is None or info.state == "stopped" else info


def _refuse_if_served(lay: server.Layout, info: ServiceInfo | None) -> None:
    if info is None:
        return
    if info.job_id is not None:
        raise EmbeddedDatabaseError(f"the database is already served by Slurm job {info.job_id} on {info.host}",
                                    hint="`scalebox db stop` it first")
    if info.host not in server.host_names() or embedded.postmaster_pid(Path(info.data)) is not None:
        raise EmbeddedDatabaseError(f"the database is already served on {info.host}:{info.port}",
                                    hint="`scalebox db stop` it first (on that host)")
    # else: a service file left by a server of this host that is gone (a reboot): serve again


def _generation(lay: server.Layout) -> int:
    info = servicefile.load(lay.service_file)
    return 0 if info is None else info.generation + 1


def _described(info: ServiceInfo) -> str:
    job_part = f", Slurm job {info.job_id}" if info.job_id else ""
    path = servicefile.service_dir() / servicefile.SERVICE_FILE
    return f"serving {info.host}:{info.port} (generation {info.generation}{job_part}); service file {path}"


def here(data: Path | None, port: int, foreground: bool) -> str:
    """``db serve --here``: serve on this host. In the foreground until SIGINT/SIGTERM; else a
    detached ``db serve --here --foreground`` (its own session, its log in the service dir)
    serves, and this returns once it does."""
    lay = server.layout(data)
    _refuse_if_served(lay, _current(lay))
    generation = _generation(lay)
    if foreground:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        served = server.serve(lay, port=port, generation=generation, job_id=None)
        print(_described(served.info), flush=True)
        job.supervise(lay, served, client=None, end=None, before=timedelta(0), stop=stop)
        return "stopped"
    server.prepare(lay)
    argv = [sys.executable, "-m", "scalebox_hpc", "-v", "db", "serve", "--here", "--foreground",
            "--data", str(lay.data), "--port", str(port)]
    log_path = lay.service / "serve.log"
    with log_path.open("ab") as log:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        info = servicefile.load(lay.service_file)
        if info is not None and info.pid == child.pid and info.state == "up":
            return _described(info)
        if child.poll() is not None:
            tail = (log_path.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise EmbeddedDatabaseError(f"db serve --here exited ({child.returncode}): {tail}",
                                        hint=f"see {log_path}")
        time.sleep(0.2)
    raise EmbeddedDatabaseError("the served PostgreSQL did not start within 180 s", hint=f"see {log_path}")


def slurm(
    data: Path | None, port: int, before: timedelta, *, partition: str | None, time_limit: str | None,
    account: str | None, extra: Sequence[str], wait_seconds: float,
) -> str:
    """``db serve --slurm``: submit the database job; wait until it serves (unless 0)."""
    lay = server.layout(data)
    _refuse_if_served(lay, _current(lay))
    server.prepare(lay)
    args = job.sbatch_args(log=lay.service / "db-%j.log", partition=partition, time_limit=time_limit,
                           account=account, extra=extra)
    script = job.job_script(sys.executable, lay.data, port, before)
    job_id = job.submit(lay, job.slurm_client(), args, script)
    if wait_seconds <= 0:
        return f"submitted Slurm job {job_id}; `scalebox db status` shows when it serves"
    info = _wait_for(lay, lambda i: i.job_id == job_id and i.state == "up", wait_seconds,
                     f"Slurm job {job_id} does not serve yet")
    return _described(info)


def _wait_for(lay: server.Layout, done: object, seconds: float, what: str) -> ServiceInfo:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        info = servicefile.load(lay.service_file)
        if info is not None and done(info):  # type: ignore[operator]
            return info
        time.sleep(0.25)
    raise EmbeddedDatabaseError(f"{what} after {seconds:.0f} s",
                                hint=f"see `squeue --me`, the job's log in {lay.service}")


def in_job(data: Path | None, port: int, before: timedelta) -> int:
    """``db serve --here --in-job``: the body of the database job."""
    return job.serve_in_job(server.layout(data), port=port, before=before)


def handover_now(data: Path | None, wait_seconds: float) -> str:
    """``db serve --handover-now``: ask the serving job to hand over; wait for the next generation."""
    lay = server.layout(data)
    info = _current(lay)
    if info is None or info.job_id is None:
        raise EmbeddedDatabaseError("no Slurm job serves the database", hint="`scalebox db serve --slurm` first")
    job.request_handover(lay, info.job_id)
    if wait_seconds <= 0:
        return f"asked job {info.job_id} to hand over"
    new = _wait_for(lay, lambda i: i.generation > info.generation and i.state == "up", wait_seconds,
                    f"generation {info.generation + 1} is not up")
    return _described(new)


def stop(timeout: float) -> str | None:
    """``db stop`` for a served database; None when none is served (the caller stops the embedded one)."""
    lay = server.layout(None)
    info = _current(lay)
    if info is None:
        return None
    if info.job_id is not None:
        client = job.slurm_client()
        client.cancel([info.job_id], signal="INT")  # the job shuts its server down cleanly, then ends
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = servicefile.load(lay.service_file)
            if now is None or now.state == "stopped" or now.generation != info.generation:
                return f"stopped (Slurm job {info.job_id})"
            time.sleep(0.25)
        client.cancel([info.job_id])
        raise EmbeddedDatabaseError(f"Slurm job {info.job_id} did not stop its server within {timeout:.0f} s; "
                                    "cancelled", hint=f"see its log in {lay.service}")
    if info.host not in server.host_names():
        raise EmbeddedDatabaseError(f"the database is served on {info.host}, not here",
                                    hint=f"run `scalebox db stop` on {info.host}")
    try:
        if info.pid <= 0:  # never os.kill(0): that is this process group
            raise ProcessLookupError
        os.kill(info.pid, signal.SIGINT)  # its `db serve --here` shuts down cleanly and marks it stopped
    except (ProcessLookupError, PermissionError):
        server.shutdown(Path(info.data), timeout=timeout)
        server.mark_stopped(lay, info)
        return "the serving process was gone (service file marked stopped)"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = servicefile.load(lay.service_file)
        if now is None or now.state == "stopped":
            return "stopped"
        time.sleep(0.1)
    raise EmbeddedDatabaseError(f"the served PostgreSQL (pid {info.pid}) did not stop within {timeout:.0f} s")

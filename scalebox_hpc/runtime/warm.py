"""Warm container slots: one container per slot, fed run after run by a POSIX-sh agent.

The launcher makes two FIFOs in the slot's private dir (mounted at ``/.scalebox/slot``) and
starts ``/bin/sh /.scalebox/bin/agent`` in the container once. Per run it writes a request
script (every value single-quoted: cwd, environment, output files, the exec argv) and one line
``run ID SCRIPT``; the agent runs it and answers ``exit ID CODE``. The database connection
stays with the launcher on the host. A kill (timeout, cancel, drain) signals every process
under the agent on the host (psutil), so nothing keeps running inside the container; closing
the session stops the agent and removes the container.

A request's processes end with it: the agent runs each request as a new session (``setsid``)
and ends what is left of its process group when the request's script exits. While the
container lives, a run record in the private dir names the engine client and the agent, so
that the next session on this slot (after a kill -9 of this launcher) ends them
(:mod:`scalebox_hpc.runtime.fence`); stale Podman/Docker containers of the slot are removed by
name when a session opens (:func:`scalebox_hpc.runtime.container.sweep_containers`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from scalebox_hpc.errors import ContainerError, ScriptError
from scalebox_hpc.models import Usage
from scalebox_hpc.runtime import fence
from scalebox_hpc.runtime.base import Outcome, RunSpec, SessionSpec
from scalebox_hpc.runtime.container import (
    CONTAINER_PATH,
    HELPER_DIR,
    SLOT_DIR,
    WORK,
    Bind,
    ContainerSession,
    Engine,
    container_name,
    serve,
    unserve,
)
from scalebox_hpc.runtime.local import popen
from scalebox_hpc.runtime.paths import write_fresh
from scalebox_hpc.runtime.svcdir import RequestDir

logger = logging.getLogger(__name__)

START_TIMEOUT = 120.0
"""Seconds a container may take to start its agent (a first SIF mount can be slow)."""
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second of /proc's times (USER_HZ: the kernel's, shared by every container)."""
_TICKS = re.compile(r"[0-9]{1,15}\Z")


def exit_reply(line: str, ticks_per_second: int = CLOCK_TICKS) -> tuple[int, Usage | None]:
    """The agent's ``exit ID CODE [UTICKS STICKS]`` → (code, the run's CPU; None when the agent
    could not read it). The container's shell answers: anything but two tick counts is no usage.
    The peak RSS of a run inside a warm container is not measured (procfs has no children's
    peak; only wait4 has it, and the run's processes are the agent's children, not ours)."""
    fields = line.split()
    code = int(fields[2])
    if len(fields) != 5 or not all(_TICKS.match(f) for f in fields[3:]):
        return code, None
    user, system = (int(f) / ticks_per_second for f in fields[3:])
    return code, Usage(cpu_user_s=user, cpu_system_s=system)


def sh_quote(text: str) -> str:
    """``text`` as one single-quoted POSIX-sh word (any bytes but NUL, which argv cannot hold)."""
    return "'" + text.replace("'", "'\\''") + "'"


def request_script(argv: Sequence[str], env: Mapping[str, str], cwd: str, stdout: str, stderr: str) -> str:
    """The script the agent runs for one request: every value quoted, nothing evaluated. Given a
    file as its argument (the agent's ``request.pgid``) it first writes its pid there: run under
    ``setsid``, that is its process group, which the agent ends when the script exits."""
    lines = ['[ "$#" -eq 0 ] || echo "$$" >"$1"',
             f"exec </dev/null >{sh_quote(stdout)} 2>{sh_quote(stderr)}", f"cd {sh_quote(cwd)} || exit 126"]
    lines += [f"export {k}={sh_quote(v)}" for k, v in env.items() if _NAME.match(k)]
    lines.append("exec " + " ".join(sh_quote(a) for a in argv))
    return "\n".join(lines) + "\n"


class WarmSession(ContainerSession):
    """A slot's container, started once; runs are requests to its agent."""

    def __init__(
        self, engine: Engine, spec: SessionSpec, image: str, binds: Sequence[Bind], host_env: Mapping[str, str],
    ) -> None:
        super().__init__(engine, spec, image, binds, host_env)
        self.fifo_in = spec.private_dir / "agent.in"
        self.fifo_out = spec.private_dir / "agent.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.agent: psutil.Process | None = None
        self.name = ""
        self.record_file: Path | None = None
        self._in = self._out = -1
        self._buf = b""
        self._seq = 0
        self._current = 0
        self._boot()

    # -- container lifecycle ----------------------------------------------------------------------
    def _boot(self) -> None:
        for fifo in (self.fifo_in, self.fifo_out):
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo, 0o600)
        # both ends O_RDWR: opening never blocks, and the agent's open never blocks either
        self._in = os.open(self.fifo_in, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._out = os.open(self.fifo_out, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._buf = b""
        token = f"scalebox-agent-{uuid.uuid4().hex}"
        self.name = container_name(self.spec)
        cmd, env = self.engine.command(
            image=self.image, binds=self.binds, env={"PATH": CONTAINER_PATH}, cwd=WORK,
            argv=["/bin/sh", f"{HELPER_DIR}/agent", SLOT_DIR, token], name=self.name,
            options=self.spec.options, host_env=self.host_env,
        )
        err = self.spec.private_dir / "container.err"
        self.proc = popen(cmd, cwd=self.spec.work_dir, env=env,
                          stdout_path=self.spec.private_dir / "container.out", stderr_path=err)
        line = self._line(time.monotonic() + START_TIMEOUT, expect="ready")
        if line is None:
            self._teardown(grace=1.0)
            tail = err.read_text(errors="replace").strip().splitlines()[-3:] if err.exists() else []
            raise ContainerError(
                f"{self.engine.name} container for {self.spec.name} did not start"
                + (f": {' | '.join(tail)}" if tail else "")
            )
        fields = line.split()
        self.agent = self._find_agent(int(fields[1]), token)
        logger.info("slot %s: warm %s container %s up (agent pid %s)", self.spec.name, self.engine.name,
                    self.name, self.agent.pid if self.agent else "?")
        if fields[2:3] != ["setsid"]:
            logger.warning("slot %s: image %s has no setsid: background processes a run leaves keep running "
                           "in the container until it ends", self.spec.name, self.image)
        roots = [fence.Proc.of(self.proc.pid), fence.Proc.of(self.agent.pid) if self.agent else None]
        self.record_file = fence.write_record(self.spec.private_dir, [r for r in roots if r is not None],
                                              f"warm {self.engine.name} container {self.name}")

    @staticmethod
    def _find_agent(pid: int, token: str) -> psutil.Process | None:
        """The agent as a host process: its own pid when the container shares the host's PID
        namespace, else the process whose command line holds the token."""
        def is_agent(p: psutil.Process) -> bool:
            with contextlib.suppress(psutil.Error):
                cmd = p.cmdline()
                # the engine's client and init also carry the token in their command lines
                return len(cmd) == 4 and cmd[0].endswith("sh") and cmd[1].endswith("/agent") and cmd[3] == token
            return False

        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if is_agent(p):
                return p
        for p in psutil.process_iter():
            if is_agent(p):
                return p
        logger.warning("agent process %s not found on the host: kills reach only the container", token)
        return None

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _line(self, deadline: float, expect: str) -> str | None:
        """The next reply line starting with ``expect`` (others are stale), None at the deadline
        or when the container ended."""
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                text = raw.decode(errors="replace")
                if text.startswith(expect):
                    return text
            left = deadline - time.monotonic()
            if left <= 0 or not self._alive():
                return None
            poller = select.poll()
            poller.register(self._out, select.POLLIN)
            if poller.poll(min(left, 0.5) * 1000):
                with contextlib.suppress(BlockingIOError):
                    self._buf += os.read(self._out, 65536)

    # -- runs -------------------------------------------------------------------------------------
    def start(self, spec: RunSpec) -> WarmRun:
        """Send one run to the agent (restarting the container first if it has died)."""
        if not self._alive():
            if self.proc is not None:
                logger.warning("slot %s: container ended, starting a new one", self.spec.name)
                self._teardown(grace=1.0)
            self._boot()
        stdout = self.paths.to_container(str(spec.stdout_path))
        stderr = self.paths.to_container(str(spec.stderr_path))
        if stdout is None or stderr is None:
            raise ScriptError(f"output files {spec.stdout_path.parent} are not inside the container")
        self._seq += 1
        self._current = self._seq
        spec, served = serve(spec, self.spec.private_dir)  # the task's request directory (task services)
        try:
            script = request_script(
                self.paths.argv(spec.argv), self.paths.env(spec.env),
                self.paths.to_container(str(spec.cwd)) or WORK, stdout, stderr,
            )
            req = self.spec.private_dir / "request.sh"
            write_fresh(req, script)  # a new file renamed into place, owner only: nothing planted is written
            os.write(self._in, f"run {self._seq} {SLOT_DIR}/request.sh\n".encode())
        except BaseException:
            unserve(served)
            raise
        return WarmRun(self, self._seq, served)

    def wait_run(self, seq: int, timeout: float | None) -> Outcome | None:
        """The outcome of run ``seq`` when it ends within ``timeout``."""
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        prefix = f"exit {seq} "
        line = self._line(deadline, expect=prefix)
        if line is not None:
            self._current = 0
            code, usage = exit_reply(line)
            return Outcome(code, usage=usage)
        if not self._alive():
            self._current = 0
            logger.error("slot %s: container ended during a run", self.spec.name)
            return Outcome(-signal.SIGKILL)
        return None

    def kill_run(self, seq: int, grace: float) -> Outcome:
        """TERM every process under the agent, KILL what is left after ``grace``."""
        if self.agent is None or not self._alive():
            self._teardown(grace)
            return Outcome(-signal.SIGKILL, timed_out=True)
        try:
            procs = self.agent.children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=grace)
        line = self._line(time.monotonic() + max(grace, 2.0), expect=f"exit {seq} ")
        self._current = 0
        code, usage = exit_reply(line) if line else (-signal.SIGKILL, None)
        return Outcome(code, timed_out=True, usage=usage)

    # -- end --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Ask the agent to quit; remove the container; close and remove the FIFOs."""
        if self._alive() and self._current == 0:
            with contextlib.suppress(OSError):
                os.write(self._in, b"quit\n")
            assert self.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10.0)
        self._teardown(grace=2.0)

    def _teardown(self, grace: float) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.engine.discard(self.name, grace)
                try:
                    root = psutil.Process(self.proc.pid)
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    procs = []
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
                psutil.wait_procs(procs, timeout=grace)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        for fd in (self._in, self._out):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._in = self._out = -1
        for fifo in (self.fifo_in, self.fifo_out):
            fifo.unlink(missing_ok=True)
        fence.remove_record(self.record_file)
        self.record_file = None


class WarmRun:
    """One run inside a warm container."""

    def __init__(self, session: WarmSession, seq: int, served: RequestDir | None = None) -> None:
        self.session = session
        self.seq = seq
        self.served = served
        self._outcome: Outcome | None = None

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Wait up to ``timeout`` seconds; None while still running."""
        if self._outcome is None:
            self._outcome = self.session.wait_run(self.seq, timeout)
        if self._outcome is not None:
            unserve(self.served)
            self.served = None
        return self._outcome

    def kill(self, grace: float = 5.0) -> Outcome:
        """Kill the run's processes inside the container (the container keeps running)."""
        try:
            if self._outcome is None:
                self._outcome = self.session.kill_run(self.seq, grace)
            return self._outcome
        finally:
            unserve(self.served)
            self.served = None

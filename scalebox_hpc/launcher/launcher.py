"""The per-node launcher: the slots of one host for one app, their heartbeats, and the drain."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scalebox_hpc import taskapi
from scalebox_hpc.errors import NotFoundError
from scalebox_hpc.launcher import scratch, taskenv
from scalebox_hpc.launcher.dispatcher import Dispatcher
from scalebox_hpc.launcher.ports import QueueFactory, TaskQueue
from scalebox_hpc.launcher.runner import HeartbeatLoop, SlotContext, SlotControl, lease_for, rank_work_dir
from scalebox_hpc.launcher.services import TaskServices
from scalebox_hpc.launcher.slot import Slot
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.launcher.workdirs import claim_app_dir
from scalebox_hpc.models import Beat
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.base import ContainerRuntime
from scalebox_hpc.settings import Settings

logger = logging.getLogger(__name__)

ABORT_WAIT_SECONDS = 10.0
"""After an abort (the grace over, a stop now, a cancel), how long the slots get to kill their
runs and give the tasks back (a run gets TERM, then KILL 2 s later)."""
ABORT_POLL_SECONDS = 0.1
"""How often a drain's wait looks whether it has been turned into a stop now."""


def host_name(settings: Settings | Mapping[str, str] | None = None) -> str:
    """This node's name: the settings' SCALEBOX_HOST, else SLURMD_NODENAME inside Slurm, else the
    hostname (``settings``: the root's; a mapping or nothing is read as :meth:`Settings.of` does)."""
    site = Settings.of(settings)
    return site.host or site.environ.get("SLURMD_NODENAME") or socket.gethostname()


def slots_for_host(module: ModuleSpec, host: str, *, local: bool = False) -> int:
    """How many slots ``module`` runs on ``host``: the counts of every ``hostRegex[:n]`` that
    matches it. ``local`` (``scalebox run``) runs every declared slot here, whatever the regex."""
    if module.schedule_mode == "HEAD":
        return 1
    if local:
        return sum(s.count for s in module.slots)
    return sum(s.count for s in module.slots if re.fullmatch(s.host_regex, host))


@dataclass(frozen=True)
class LauncherConfig:
    """What to run: the app, optionally one module, and where."""

    app_id: int
    host: str
    work_root: Path
    modules: Sequence[str] = ()
    slots: int | None = None
    local: bool = False
    script_env: Mapping[str, str] = field(default_factory=dict)
    """Added to every script's environment (after the allow-list of :mod:`taskenv`): never a
    credential; run.sh reaches semaphores and variables through the task-services socket."""
    local_scratch: Path | None = None
    """This node's local scratch root: scanned into the scratch index at start, and the files
    tasks report there are indexed (location-aware dispatch). Containers see it at ``/local``
    (``LOCAL_SCRATCH=/local`` inside), bare scripts at its host path."""


class Launcher:
    """Starts the slots of this host as threads; ``stop()`` drains them. Every database call
    of the slots, the heartbeat and the plan goes through one :class:`Dispatcher`, which owns
    the node's one connection (``queue_factory`` is called once)."""

    def __init__(
        self, config: LauncherConfig, queue_factory: QueueFactory, runtime: ContainerRuntime, wakeups: Wakeups,
        *, may_idle_exit: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.wakeups = wakeups
        self.control = SlotControl() if may_idle_exit is None else SlotControl(may_idle_exit=_once_true(may_idle_exit))
        self.dispatcher = Dispatcher(queue_factory, wakeups=wakeups)
        self.slots: list[Slot] = []
        self._threads: list[threading.Thread] = []
        self._heartbeat: threading.Thread | None = None
        self._specs: dict[str, ModuleSpec] = {}
        self._stopped = threading.Event()
        self._sent_output: dict[int, object] = {}
        self.services: TaskServices | None = None
        """The live output each slot's row holds (as last sent): a beat sends only what changed."""

    def plan(self) -> list[SlotContext]:
        """The slots this host runs, from the app's stored module specs."""
        cfg = self.config
        queue = self.dispatcher.port()
        refs = queue.modules(cfg.app_id)
        uid = queue.app_uid(cfg.app_id)
        specs = {name: ModuleSpec.model_validate(raw) for name, raw in queue.module_specs(cfg.app_id).items()}
        self._specs = specs
        queue.register_host(cfg.host, {"pid": os.getpid()})
        if cfg.local_scratch is not None:
            files = scratch.scan(cfg.local_scratch)
            queue.index_scratch(cfg.host, files, [], replace=True)
            adopted = queue.adopt_tasks(cfg.app_id, cfg.host) if files else 0
            logger.info("scratch %s: %d files indexed, %d queued task(s) now prefer a holder",
                        cfg.local_scratch, len(files), adopted,
                        extra={"action": "scratch_indexed", "app_id": cfg.app_id, "host": cfg.host,
                               "files": len(files), "adopted": adopted})
        for name in cfg.modules:
            if name not in specs:
                raise NotFoundError("module", name)
        root = claim_app_dir(cfg.work_root, cfg.app_id, uid)
        env = {**taskenv.script_base_env(os.environ), **cfg.script_env}
        self.services = self._services(queue)
        env[taskapi.SERVICES_ENV] = str(self.services.path)
        if cfg.local_scratch is not None:
            env["LOCAL_SCRATCH"] = str(cfg.local_scratch)
        contexts = []
        for name, spec in specs.items():
            if cfg.modules and name not in cfg.modules:
                continue
            if spec.mpi.mode == "collective" or (spec.mpi.mode == "farm" and not (cfg.local or cfg.modules)):
                continue  # an MPI stage (`scalebox launcher --mpi`); a farm runs as slots when named or local
            count = cfg.slots if cfg.slots is not None else slots_for_host(spec, cfg.host, local=cfg.local)
            for seq in range(count):
                work = rank_work_dir(root, name, cfg.host, f"slot{seq}")
                contexts.append(SlotContext(
                    app_id=cfg.app_id, module=spec, ref=refs[name], modules=refs, host=cfg.host, seq=seq,
                    work_dir=work, runtime=self.runtime, wakeups=self.wakeups, control=self.control,
                    base_env=env, scratch=cfg.local_scratch,
                ))
        return contexts

    def _services(self, queue: TaskQueue) -> TaskServices:
        """The task-services socket (semaphores, variables... for run.sh: no DSN in a task), in
        a fresh private directory: short (a socket path has 107 bytes at most), 0700, random."""
        base = tempfile.gettempdir()
        if len(base) > 60:  # a long TMPDIR (tests, some sites): the system's own
            base = "/tmp"  # noqa: S108 (mkdtemp below: a fresh 0700 dir of a random name)
        directory = Path(tempfile.mkdtemp(prefix="sbx-task-", dir=base))  # 0700, O_EXCL: never a planted one
        app_id = self.config.app_id
        return TaskServices(directory / "s", lambda req: queue.task_service(app_id, req), self._runs_task)

    def _runs_task(self, task_id: int) -> bool:
        """Whether one of this launcher's slots runs task ``task_id`` now."""
        return any(slot.current is not None and slot.current.id == task_id for slot in self.slots)

    def start(self) -> int:
        """Start every planned slot; returns how many."""
        contexts = self.plan()
        if self.services is not None:
            if contexts:
                self.services.start()
            else:
                self.services.path.parent.rmdir()
                self.services = None
        for ctx in contexts:
            slot = Slot(ctx, self.dispatcher.port(prefetch=may_prefetch(ctx.module, self._specs)))
            thread = threading.Thread(target=slot.run, name=f"slot-{ctx.module.name}-{ctx.seq}", daemon=True)
            self.slots.append(slot)
            self._threads.append(thread)
            thread.start()
        if self.slots:
            self._heartbeat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
            self._heartbeat.start()
        else:
            self.dispatcher.close()
        logger.info("launcher on %s: %d slots", self.config.host, len(self.slots),
                    extra={"action": "launcher_started", "app_id": self.config.app_id, "host": self.config.host,
                           "slots": len(self.slots)})
        return len(self.slots)

    def alive(self) -> int:
        """Slots still running."""
        return sum(t.is_alive() for t in self._threads)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every slot to end; False if some still run after ``timeout`` (one deadline
        for all slots: a drain's grace is not multiplied by the number of busy slots)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        done = self.alive() == 0
        if done:
            self._shutdown()
        return done

    def exit_code(self) -> int:
        """0, or 1 when every slot ended in ERROR (setup.sh failed, an engine missing, a crash
        loop): a stage job whose node can run nothing must fail, not end COMPLETED and be
        resubmitted for ever."""
        ended = [s.final_status for s in self.slots]
        if ended and all(status == "ERROR" for status in ended):
            return 1
        return 0

    def running_tasks(self) -> int:
        """How many tasks this host's slots run now (no database call: safe in a signal handler)."""
        return sum(slot.current is not None for slot in self.slots)

    def stop_now(self) -> int:
        """Claim nothing more and kill what runs now (process groups, containers, handler
        workers); the slots give the tasks back READY, the attempt not counted. Returns how many
        tasks ran. Only sets flags: :meth:`stop` (running or called next) waits for the slots."""
        running = self.running_tasks()
        self.control.draining.set()
        self.control.abort.set()
        self.wakeups.notify_all()
        return running

    def stop(self, grace: float = 30.0) -> None:
        """Drain: claim nothing more; running tasks get ``grace`` seconds, then are killed and
        released. A :meth:`stop_now` meanwhile (a second Ctrl-C) ends the grace at once."""
        self.control.draining.set()
        self.wakeups.notify_all()
        if not self._wait_unless_aborted(grace):
            if not self.control.abort.is_set():
                logger.warning("drain grace of %ss over: killing running tasks and releasing them", grace,
                               extra={"action": "drain_grace_over", "app_id": self.config.app_id,
                                      "host": self.config.host, "grace_seconds": grace})
            self.control.abort.set()
            self.wakeups.notify_all()
            self.wait(ABORT_WAIT_SECONDS)
        self._shutdown()

    def _wait_unless_aborted(self, timeout: float) -> bool:
        """:meth:`wait` up to ``timeout``, cut short when ``control.abort`` is set; True when
        every slot has ended."""
        deadline = time.monotonic() + timeout
        abort = self.control.abort
        for thread in self._threads:
            while thread.is_alive() and not abort.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return self.alive() == 0
                thread.join(min(left, ABORT_POLL_SECONDS))
        return self.alive() == 0

    def _shutdown(self) -> None:
        """The slots are gone (or given up on): stop the heartbeat, then close the node's session."""
        self._stopped.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(15.0)
        if self.services is not None:
            self.services.stop()
            with contextlib.suppress(OSError):
                self.services.path.parent.rmdir()
        if self.alive() == 0:
            self.dispatcher.close()

    def _heartbeats(self) -> None:
        """Every half heartbeat renew each live slot and its task leases; every quarter heartbeat
        recover the expired leases of dead slots anywhere (:class:`HeartbeatLoop`, as MPI rank 0
        does). The thread never dies of an error."""
        queue = self.dispatcher.port()
        loop = HeartbeatLoop(
            beat=lambda: self._beat(queue), cancelled=lambda: queue.app_cancelled(self.config.app_id),
            on_cancel=self._cancel, recover=lambda every: queue.recover_expired(every=every),
            heartbeat_seconds=min(s.ctx.module.arguments.heartbeat_seconds for s in self.slots),
            lease_seconds=max(lease_for(s.ctx.module.arguments.heartbeat_seconds) for s in self.slots),
            connects=lambda: self.dispatcher.connects, who=f"heartbeat of {self.config.host}",
        )
        try:
            loop.run(self._stopped.wait, lambda: self.alive() > 0)
        finally:
            queue.close()

    def _cancel(self) -> None:
        if not self.control.abort.is_set():
            logger.warning("app %s cancelled: killing and releasing running tasks", self.config.app_id,
                           extra={"action": "app_cancelled", "app_id": self.config.app_id, "host": self.config.host})
        self.control.draining.set()
        self.control.abort.set()
        self.wakeups.notify_all()

    def _beat(self, queue: TaskQueue) -> None:
        """One statement renews every live slot of the node and the leases of the tasks each
        runs (the dispatcher adds those it prefetched). It also carries why a slot waits (its
        gates) and the tail of each running task's output, when that changed since the last beat."""
        beats = []
        sending: dict[int, object] = {}
        for slot in self.slots:
            if slot.slot_id and slot.running:
                current = slot.current
                output = slot.live_output() or {"task_id": None}
                changed = output != self._sent_output.get(slot.slot_id)
                if changed:
                    sending[slot.slot_id] = output
                beats.append(Beat(slot.slot_id, "RUNNING" if current is not None else "READY",
                                  lease_for(slot.ctx.module.arguments.heartbeat_seconds),
                                  () if current is None else (current.id,),
                                  waiting=slot.waiting, output=output if changed else None))
        released = queue.heartbeat_slots(beats)
        self._sent_output.update(sending)  # only once stored: a failed beat sends it again
        for task_id in released:
            logger.warning("task %s: held by a slot of %s that does not run it (a lost claim reply): released",
                           task_id, self.config.host,
                           extra={"action": "stray_released", "task_id": task_id, "host": self.config.host})


def may_prefetch(module: ModuleSpec, specs: Mapping[str, ModuleSpec]) -> bool:
    """Whether a slot of ``module`` may hold a task it does not run yet: not when something
    decides, claim by claim, whether it may take one — a gate (check.sh, disk gates), a
    semaphore, or back-pressure (a sink with ``max_pending``)."""
    args = module.arguments
    gated = module.script("check.sh") is not None or args.free_space_gb is not None or bool(args.dir_limit_gb)
    pressed = any(specs[s].arguments.max_pending is not None for s in module.sink_modules if s in specs)
    return not gated and not pressed and args.semaphore is None


def _once_true(ask: Callable[[], bool]) -> Callable[[], bool]:
    """``ask`` until it says True, then True without asking: once one slot of the host may
    leave (its job is marked draining), all may; the slots ask from their own threads."""
    lock = threading.Lock()
    said_yes = False

    def asked() -> bool:
        nonlocal said_yes
        with lock:
            if not said_yes:
                said_yes = ask()
            return said_yes

    return asked

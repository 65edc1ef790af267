"""Fences around runs: a run's processes end with it, and a slot's next session ends what a
killed launcher left running in the slot's directories.

A run's main process (run.sh, or a container engine's client) starts in a session of its own
(``setsid``), so its session id is its pid. Every process that stays in that session — its
background children, also after they are re-parented to init — is a part of the run:

- **When the main process exits** (normally or killed), :func:`end_session` ends what is left
  of its session (TERM, KILL after a short grace) before the task-exec files are read. The main
  process is not reaped until then: while it is a zombie its pid, and so its session id, cannot
  be reused by an unrelated process.
- **While the run lives**, a record ``fence-PID.json`` in the slot's private dir names it (pid
  and start time, so a reused pid is never taken for it) and the launcher process that owns it.
  :func:`sweep`, called when a session opens on that private dir — usually the next launcher on
  the host after the previous one was killed — ends what such a record still names: the process,
  its descendants, and the sessions they lead. So an orphan cannot write into the next task's
  work dir. A record whose owner is another *live* launcher is left alone (that launcher shares
  the slot dir; ending its runs is not this session's business) and reported.

A process that leaves the run's session on purpose (``setsid``, a daemon's double fork) and is
re-parented before the run ends is not tracked: only a cgroup (a Slurm step, a container's PID
namespace) can follow it.

**Finding a session's members cheaply.** Linux has no call that lists a session; the general
way is a scan of every process (``/proc``: about 1 ms per run on a small VM, more on a busy
node), which used to cost a short task as much as its own spawn. A run armed at its start
(:func:`arm`, done by :func:`write_record`) is instead looked for among the pids allocated
since its main process: every member of its session was forked after it, and pids are handed
out cyclically, so while fewer than ``pid_max`` processes were forked system-wide meanwhile
(the kernel's fork counter, ``processes`` in ``/proc/stat``, says so) they all lie between the
main process's pid and the last pid allocated (``/proc/loadavg``). For a short task that is a
handful of ``getsid`` calls; when the window is large (a long task, a busy host, a wrap) or the
counters cannot be read, the full scan is used as before.

``PR_SET_PDEATHSIG`` is not used. It can only be set in the child between fork and exec:
``preexec_fn`` is unsafe in a threaded launcher, and a wrapper (``setpriv --pdeathsig TERM --``)
measured +1.1 ms per run (more than the whole bare-process overhead), reaches only the main
process (children do not inherit it) and fires when the forking *thread* ends, not the
launcher. So a killed launcher's runs go on until the slot's next session opens (or, under
Slurm, until the step's cgroup is killed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

RECORD_PREFIX = "fence-"
RECORD_SUFFIX = ".json"
EMIT_GLOB = "emit-*.jsonl"
"""Emit buffers of runs (``emit-TASK.ATTEMPT.jsonl``); a session's open removes leftovers."""
EXIT_GRACE = 1.0
"""Seconds the leftovers of a run that ended get between TERM and KILL."""
SWEEP_GRACE = 2.0
"""Seconds a killed launcher's orphans get between TERM and KILL when a new session opens."""
_MAX_RECORD = 4096
_START_SLACK = 0.05
"""Start times are psutil's ``create_time`` (10 ms ticks); equal within this many seconds."""
RANGE_SCAN_LIMIT = 512
"""At most this many pids are probed one by one for a run's session members; a wider window of
pids allocated since the run started is scanned the general way (every process)."""
FORK_MARGIN = 1024
"""Forks that may have happened between a run's spawn and its arming (never counted), and slack."""
_ARMED_MAX = 4096
"""Armed runs remembered at most (a run whose session is never ended must not grow the table)."""
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_boot_time: float | None = None
_armed: dict[int, int] = {}
"""Main pid of an armed run → the fork counter when it was armed."""
_proc_fds: dict[str, int] = {}
_pid_top: int | None = None


def _start_time(pid: int) -> float | None:
    """psutil's ``create_time`` of ``pid`` (boot time + start ticks), or None when unreadable."""
    global _boot_time
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        ticks = int(data.rsplit(b")", 1)[1].split()[19])  # field 22 (starttime), after "pid (comm)"
        if _boot_time is None:
            _boot_time = psutil.boot_time()
        return ticks / _CLOCK_TICKS + _boot_time
    except (OSError, ValueError, IndexError):
        return None


def _read_proc(name: str) -> bytes | None:
    """``/proc/<name>`` (a kept-open descriptor, re-read with pread), or None when unreadable."""
    fd = _proc_fds.get(name)
    try:
        if fd is None:
            fd = os.open(f"/proc/{name}", os.O_RDONLY | os.O_CLOEXEC)
            _proc_fds[name] = fd
        return os.pread(fd, 65536, 0)
    except OSError:
        return None


def _forks() -> int | None:
    """Processes (and threads) forked since boot: ``processes`` in ``/proc/stat``."""
    data = _read_proc("stat")
    if data is None:
        return None
    at = data.find(b"\nprocesses ")
    if at < 0:
        return None
    return int(data[at + 11:data.index(b"\n", at + 1)])


def _last_pid() -> int | None:
    """The pid allocated last in this pid namespace (the fifth field of ``/proc/loadavg``)."""
    data = _read_proc("loadavg")
    try:
        return int(data.split()[4].split(b"/")[0]) if data is not None else None
    except (IndexError, ValueError):
        return None


def _pid_max() -> int:
    """The pid allocator's wrap point (read once: it is raised at boot, if ever)."""
    global _pid_top
    if _pid_top is None:
        data = _read_proc("sys/kernel/pid_max")
        try:
            _pid_top = int(data) if data is not None else 32768
        except ValueError:
            _pid_top = 32768
    return _pid_top


def arm(pid: int) -> None:
    """Note a run's start (its main process ``pid``, just spawned), so that :func:`end_session`
    can find what is left of its session among the pids allocated since (see the module doc)."""
    forks = _forks()
    if forks is None:
        return
    if len(_armed) >= _ARMED_MAX:
        _armed.pop(next(iter(_armed)))
    _armed[pid] = forks


def _window(sid: int) -> range | list[int] | None:
    """The pids allocated since the armed run ``sid`` started, when small and certainly complete;
    None: use the full scan."""
    since = _armed.pop(sid, None)
    if since is None:
        return None
    now, last, top = _forks(), _last_pid(), _pid_max()
    if now is None or last is None or now - since + FORK_MARGIN >= top - 300:
        return None  # the counters are unreadable, or pids may have wrapped past the run's own
    if last >= sid:
        window: range | list[int] = range(sid + 1, last + 1)
    else:  # wrapped at pid_max: to the top, then from the bottom
        window = [*range(sid + 1, top), *range(2, last + 1)]
    return window if len(window) <= RANGE_SCAN_LIMIT else None


def _is_process(pid: int) -> bool:
    """Whether ``pid`` is a process (a thread group leader), not another thread of one."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1]) == pid
    except (OSError, ValueError):
        return False
    return False


def _members_in(sid: int, pids: Iterable[int]) -> list[psutil.Process]:
    """The processes among ``pids`` in session ``sid`` (never this process)."""
    me = os.getpid()
    found: list[psutil.Process] = []
    for pid in pids:
        try:
            if pid != me and os.getsid(pid) == sid and _is_process(pid):
                found.append(psutil.Process(pid))
        except (OSError, psutil.Error):
            continue
    return found


@dataclass(frozen=True)
class Proc:
    """A process as a record names it: its pid and start time (a reused pid has another)."""

    pid: int
    start: float

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        """The running process ``pid`` (None when it is gone); also a zombie, until reaped. Its
        start time is psutil's ``create_time``, read from ``/proc/PID/stat`` directly (one read
        instead of psutil's several; the same formula, so records stay comparable)."""
        start = _start_time(pid)
        if start is None:
            try:
                return cls(pid, psutil.Process(pid).create_time())
            except psutil.Error:
                return None
        return cls(pid, start)

    def find(self) -> psutil.Process | None:
        """This very process when it still runs (not a zombie), else None."""
        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.start) > _START_SLACK or p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None

    def to_json(self) -> dict[str, float | int]:
        """``{"pid": ..., "start": ...}``."""
        return {"pid": self.pid, "start": self.start}


_me: Proc | None = None


def this_process() -> Proc:
    """The calling process (the launcher) as a record's owner (looked up once per process)."""
    global _me
    if _me is None or _me.pid != os.getpid():  # a forked child is another owner
        me = Proc.of(os.getpid())
        assert me is not None
        _me = me
    return _me


@dataclass(frozen=True)
class Record:
    """What a run record says: who owns the run, which processes it is, what it is."""

    owner: Proc
    roots: tuple[Proc, ...]
    label: str

    def to_json(self) -> str:
        """The record's file content."""
        return json.dumps({"owner": self.owner.to_json(), "roots": [r.to_json() for r in self.roots],
                           "label": self.label})

    @classmethod
    def parse(cls, text: str) -> Record:
        """A record from its file content; ValueError when it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        roots = data.get("roots")
        if not isinstance(roots, list):
            raise ValueError("no roots")
        label = data.get("label", "")
        return cls(_proc(data.get("owner")), tuple(_proc(r) for r in roots), label if isinstance(label, str) else "")


def _proc(raw: object) -> Proc:
    if not isinstance(raw, dict):
        raise ValueError("a process is not an object")
    pid, start = raw.get("pid"), raw.get("start")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1 or not isinstance(start, int | float):
        raise ValueError(f"bad process {raw!r}")
    return Proc(pid, float(start))


# -- records ----------------------------------------------------------------------------------------
def record_path(private_dir: Path, pid: int) -> Path:
    """Where the record of the run whose first root is ``pid`` lives."""
    return private_dir / f"{RECORD_PREFIX}{pid}{RECORD_SUFFIX}"


def write_record(private_dir: Path, roots: Iterable[Proc], label: str) -> Path | None:
    """Write a record (atomically: a new temporary file, never followed through a symlink, renamed
    into place); None, with a warning, when it cannot be written (the run goes on unfenced)."""
    procs = tuple(roots)
    if not procs:
        return None
    for p in procs:
        arm(p.pid)
    final = record_path(private_dir, procs[0].pid)
    data = Record(this_process(), procs, label).to_json().encode()
    if _create(final, data):
        return final
    tmp = private_dir / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, final)  # replaces a planted symlink itself, never its target
    except OSError as exc:
        logger.warning("run %s (pid %d): cannot write its record %s: %s; a killed launcher's successor "
                       "will not end it", label, procs[0].pid, final, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return final


def _create(path: Path, data: bytes) -> bool:
    """Write a new record file in one write (a fresh name: nothing there to replace, no symlink
    followed); False when the name is taken (a stale record, a planted link: then the general
    way, a temporary file renamed over it) or the write failed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        written = os.write(fd, data)
    except OSError:
        written = -1
    finally:
        os.close(fd)
    if written != len(data):
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    return True


def remove_record(path: Path | None) -> None:
    """Remove a record (missing is fine)."""
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def read_record(path: Path) -> Record:
    """A record file: opened without following symlinks or blocking on a FIFO, a regular file of
    at most 4 KiB; OSError or ValueError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_RECORD:
            raise ValueError(f"not a small regular file ({st.st_size} bytes)")
        return Record.parse(os.read(fd, _MAX_RECORD).decode())
    finally:
        os.close(fd)


# -- finding and ending processes -------------------------------------------------------------------
def session_members(sids: set[int]) -> list[psutil.Process]:
    """Every process whose session id is in ``sids`` (never this process or its own session)."""
    me, my_sid = os.getpid(), os.getsid(0)
    wanted = sids - {my_sid, 0, 1}
    found: list[psutil.Process] = []
    if not wanted:
        return found
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            if os.getsid(pid) in wanted:
                found.append(psutil.Process(pid))
        except (OSError, psutil.Error):
            continue
    return found


def tree_of(root: Proc) -> list[psutil.Process]:
    """What a record's root still is: the process (same start time), its descendants, and every
    member of the sessions any of them leads. A root that is gone leaves its session's members,
    if any (its pid cannot have been reused while they hold it as their session id)."""
    p = root.find()
    if p is None:
        now = Proc.of(root.pid)  # a zombie root keeps its start time
        if now is not None and abs(now.start - root.start) > _START_SLACK:
            return []  # the pid is another process now: the root's session ended long ago
        return [m for m in session_members({root.pid}) if _started_after(m, root.start)]
    procs: dict[int, psutil.Process] = {p.pid: p}
    with contextlib.suppress(psutil.Error):
        procs.update((c.pid, c) for c in p.children(recursive=True))
    leaders = set()
    for q in procs.values():
        with contextlib.suppress(OSError):
            if os.getsid(q.pid) == q.pid:
                leaders.add(q.pid)
    procs.update((m.pid, m) for m in session_members(leaders))
    procs.pop(os.getpid(), None)
    return list(procs.values())


def _started_after(p: psutil.Process, start: float) -> bool:
    try:
        return p.create_time() >= start - _START_SLACK
    except psutil.Error:
        return False


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(procs: Iterable[psutil.Process], sig: signal.Signals) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def _signal_group(pgid: int | None, sig: signal.Signals) -> None:
    if pgid is not None and pgid > 1:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for the processes to end (a zombie counts as ended); the survivors."""
    alive = [p for p in procs if _running(p)]
    deadline = time.monotonic() + timeout
    delay = 0.005
    while alive and time.monotonic() < deadline:
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.1)
        alive = [p for p in alive if _running(p)]
    return alive


def end(procs: list[psutil.Process], grace: float, group: int | None = None) -> list[psutil.Process]:
    """TERM the processes (and the process group ``group``, atomically, which also reaches
    children forked meanwhile), KILL what is left after ``grace`` s; the processes that were
    still running when TERM was sent."""
    alive = [p for p in procs if _running(p)]
    _signal_group(group, signal.SIGTERM)
    _signal(alive, signal.SIGTERM)
    left = wait_gone(alive, grace)
    if left or group is not None:
        _signal_group(group, signal.SIGKILL)
        _signal(left, signal.SIGKILL)
        wait_gone(left, max(grace, 1.0))
    return alive


def end_session(sid: int, grace: float = EXIT_GRACE) -> list[psutil.Process]:
    """End what is left of session ``sid`` (its leader has exited, unreaped): TERM, KILL after
    ``grace``, again for anything forked meanwhile; the processes found."""
    found: list[psutil.Process] = []
    window = _window(sid)
    if window is not None:  # an armed short run: only the pids allocated since it started
        members = [m for m in _members_in(sid, window) if _running(m)]
        if not members:
            return found
        found += end(members, grace, group=sid)
    for _ in range(3):  # a process that forks while being ended leaves members for a next round
        members = [m for m in session_members({sid}) if _running(m)]
        if not members:
            break
        found += end(members, grace if not found else 0.2, group=sid)
    return found


def describe(procs: Iterable[psutil.Process], limit: int = 8) -> str:
    """``pid name, ...`` for a log message (at most ``limit`` named)."""
    parts = []
    for p in procs:
        try:
            parts.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            parts.append(str(p.pid))
    more = f", +{len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


# -- the sweep at a session's open ------------------------------------------------------------------
def sweep(private_dir: Path, slot: str, grace: float = SWEEP_GRACE) -> list[int]:
    """End what records in ``private_dir`` name and remove the records; without a live foreign
    owner also remove leftover emit buffers and temporary record files. Returns the pids ended."""
    try:
        names = sorted(os.listdir(private_dir))
    except FileNotFoundError:
        return []
    me = os.getpid()
    ended: list[int] = []
    foreign = False
    for name in names:
        if not (name.startswith(RECORD_PREFIX) and name.endswith(RECORD_SUFFIX)):
            continue
        path = private_dir / name
        try:
            record = read_record(path)
        except (OSError, ValueError) as exc:
            logger.warning("slot %s: removing the unreadable run record %s: %s", slot, path, exc)
            remove_record(path)
            continue
        if record.owner.pid != me and record.owner.find() is not None:
            foreign = True
            logger.error("slot %s: %s is in use by the live launcher pid %d (run %s): not ending its run; "
                         "two launchers must not share a slot dir", slot, private_dir, record.owner.pid, record.label)
            continue
        procs = {p.pid: p for root in record.roots for p in tree_of(root)}
        if procs:
            doomed = end(list(procs.values()), grace)
            if doomed:
                logger.warning("slot %s: ended %d process(es) that run %s of a previous launcher (pid %d) left "
                               "running in %s: %s", slot, len(doomed), record.label, record.owner.pid,
                               private_dir.parent, describe(doomed))
                ended += [p.pid for p in doomed]
        remove_record(path)
    if not foreign:
        _remove_leftovers(private_dir, names, slot)
    return ended


def _remove_leftovers(private_dir: Path, names: list[str], slot: str) -> None:
    """Emit buffers of runs that never finished and temporary record files of interrupted writes."""
    gone = []
    for name in names:
        path = private_dir / name
        if path.match(EMIT_GLOB) or (name.startswith(f".{RECORD_PREFIX}") and name.endswith(".tmp")):
            with contextlib.suppress(OSError):
                path.unlink()
                gone.append(name)
    if gone:
        logger.info("slot %s: removed %d leftover file(s) of killed runs from %s: %s", slot, len(gone),
                    private_dir, ", ".join(gone[:5]) + (" ..." if len(gone) > 5 else ""))

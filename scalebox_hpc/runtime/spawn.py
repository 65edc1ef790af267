"""Starting a bare run cheaply: glibc's ``posix_spawn`` called through ctypes.

``subprocess.Popen`` (CPython 3.11) holds the GIL from its ``vfork`` until the child has
exec'ed: for a run.sh that is a few hundred microseconds per task during which no other slot
thread, nor the dispatcher, runs any Python. A ctypes call releases the GIL, and skips Popen's
own per-call work (its error pipe, its argument checks). What the child gets is what
:func:`scalebox_hpc.runtime.local.popen` gives it:

- a new session (``POSIX_SPAWN_SETSID``: its session and process group ids are its pid);
- the cwd (``posix_spawn_file_actions_addchdir_np``), stdin from /dev/null, stdout and stderr
  onto the given descriptors, every other descriptor closed (``addclosefrom_np(3)``, as
  ``close_fds=True``);
- SIGPIPE and SIGXFSZ back to their defaults (Python ignores them; ``restore_signals``), and
  no signal ignored that Popen's child had not ignored; the calling thread's signal mask (as
  Popen's child);
- ``argv[0]`` without a slash looked up in the ``PATH`` of the run's environment (as Popen does),
  not the launcher's.

It needs glibc >= 2.34 (``addclosefrom_np``); :func:`available` says whether this libc has it,
else the caller uses Popen. An exec that fails is reported by ``posix_spawn`` itself (glibc's
child shares the parent's memory until it execs), raised as the OSError Popen would raise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

_SETSIGDEF = 0x04
_SETSID = 0x80
"""glibc's ``POSIX_SPAWN_SETSIGDEF`` and ``POSIX_SPAWN_SETSID`` (bits/spawn.h, every Linux arch)."""
_OPAQUE = 1024
"""Bytes set aside for ``posix_spawn_file_actions_t`` / ``posix_spawnattr_t`` / ``sigset_t``
(80, 336 and 128 on x86_64): their init functions fill them, we never look inside."""
_ENV_CACHE_MAX = 4096
_DEVNULL = os.fsencode(os.devnull)
_DEFAULTS = (int(signal.SIGPIPE), int(signal.SIGXFSZ), *range(32, int(signal.SIGRTMIN)))
"""Signals the child gets at their defaults: Python's ignored ones (as Popen's
``restore_signals``), and glibc's internal ones (32, 33), which its posix_spawn would
otherwise leave ignored in the child, and so in the exec'ed program."""

_lock = threading.Lock()
_libc: ctypes.CDLL | None = None
_checked = False
_env_cache: dict[tuple[str, str], bytes] = {}
_exe_cache: dict[tuple[str, str], bytes] = {}

_NAMES = ("posix_spawn", "posix_spawn_file_actions_init", "posix_spawn_file_actions_destroy",
          "posix_spawn_file_actions_adddup2", "posix_spawn_file_actions_addopen",
          "posix_spawn_file_actions_addchdir_np", "posix_spawn_file_actions_addclosefrom_np",
          "posix_spawnattr_init", "posix_spawnattr_destroy", "posix_spawnattr_setflags",
          "posix_spawnattr_setsigdefault")


def _load() -> ctypes.CDLL | None:
    """The C library, when it has every function used here (else None: use Popen)."""
    global _libc, _checked
    with _lock:
        if not _checked:
            _checked = True
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                for name in _NAMES:
                    getattr(libc, name)
                libc.posix_spawnattr_setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]
                libc.posix_spawn_file_actions_addopen.argtypes = [
                    ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint]
                libc.posix_spawn_file_actions_addchdir_np.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
                _libc = libc
            except (OSError, AttributeError):
                _libc = None
        return _libc


def available() -> bool:
    """Whether runs can be started with :func:`spawn` here (Linux with glibc >= 2.34)."""
    return _load() is not None


class Spawned:
    """The started process, with the part of ``Popen``'s interface a :class:`LocalRun` uses."""

    def __init__(self, pid: int, args: Sequence[str]) -> None:
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code once it has exited (it is reaped then), else None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Reap it (``timeout`` is not supported: a LocalRun only calls this once it exited)."""
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:  # reaped elsewhere: the code is lost, as Popen says then
                self.returncode = 0
            else:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _env_block(env: Mapping[str, str]) -> list[bytes]:
    """``KEY=value`` lines; the encoded pairs are kept (a slot's variables repeat run after run)."""
    out = []
    for key, value in env.items():
        line = _env_cache.get((key, value))
        if line is None:
            k = os.fsencode(key)
            if b"=" in k or not k:
                raise ValueError(f"illegal environment variable name {key!r}")
            line = k + b"=" + os.fsencode(value)
            if len(_env_cache) >= _ENV_CACHE_MAX:
                _env_cache.clear()
            _env_cache[(key, value)] = line
        out.append(line)
    return out


def _executable(name: str, env: Mapping[str, str]) -> bytes:
    """``name`` itself when it has a slash, else its first executable file on the run's PATH."""
    if "/" in name:
        return os.fsencode(name)
    path = env.get("PATH", os.defpath)
    found = _exe_cache.get((name, path))
    if found is not None:
        return found
    for folder in os.get_exec_path(dict(env)):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            found = os.fsencode(candidate)
            _exe_cache[(name, path)] = found
            return found
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


def spawn(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], stdout_fd: int, stderr_fd: int) -> Spawned:
    """Start ``argv`` as described in the module doc; OSError (with ``strerror``) when it cannot
    be started, ValueError for an argument no process can get (a NUL, ``=`` in a name)."""
    libc = _load()
    if libc is None:
        raise OSError(errno.ENOSYS, "posix_spawn with closefrom is not available")
    if not argv:
        raise ValueError("no program to start")
    exe = _executable(argv[0], env)
    args = [os.fsencode(a) for a in argv]
    envp = _env_block(env)
    if any(b"\0" in a for a in (exe, *args, *envp)):
        raise ValueError("embedded null byte")
    try:
        return _spawn(libc, exe, args, envp, os.fsencode(cwd), stdout_fd, stderr_fd, argv)
    except FileNotFoundError:
        if "/" in argv[0]:
            raise
        _exe_cache.clear()  # moved since it was looked up: once more from the PATH
        return _spawn(libc, _executable(argv[0], env), args, envp, os.fsencode(cwd), stdout_fd, stderr_fd, argv)


def _spawn(libc: ctypes.CDLL, exe: bytes, args: list[bytes], envp: list[bytes], cwd: bytes,
           stdout_fd: int, stderr_fd: int, argv: Sequence[str]) -> Spawned:
    actions = ctypes.create_string_buffer(_OPAQUE)
    attr = ctypes.create_string_buffer(_OPAQUE)
    _check(libc.posix_spawn_file_actions_init(actions))
    try:
        _check(libc.posix_spawnattr_init(attr))
        try:
            _check(libc.posix_spawn_file_actions_addopen(actions, 0, _DEVNULL, os.O_RDONLY, 0))
            # dup2 onto 1 and 2 clears their close-on-exec flag (the sources stay close-on-exec)
            _check(libc.posix_spawn_file_actions_adddup2(actions, stdout_fd, 1))
            _check(libc.posix_spawn_file_actions_adddup2(actions, stderr_fd, 2))
            _check(libc.posix_spawn_file_actions_addclosefrom_np(actions, 3))
            _check(libc.posix_spawn_file_actions_addchdir_np(actions, cwd))
            _check(libc.posix_spawnattr_setsigdefault(attr, _sigdefault()))
            _check(libc.posix_spawnattr_setflags(attr, _SETSIGDEF | _SETSID))
            c_argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
            c_envp = (ctypes.c_char_p * (len(envp) + 1))(*envp, None)
            pid = ctypes.c_int(0)
            # the GIL is released for the call: other threads run while the child starts
            code = libc.posix_spawn(ctypes.byref(pid), exe, actions, attr, c_argv, c_envp)
            if code != 0:
                raise OSError(code, os.strerror(code), os.fsdecode(exe))
            return Spawned(pid.value, argv)
        finally:
            libc.posix_spawnattr_destroy(attr)
    finally:
        libc.posix_spawn_file_actions_destroy(actions)


@functools.cache
def _sigdefault() -> ctypes.Array[ctypes.c_ulong]:
    """The ``sigset_t`` of :data:`_DEFAULTS`, built once (posix_spawnattr_setsigdefault copies
    it). Linux: bit sig-1 of an array of longs; not with ``sigaddset``: glibc's refuses its
    internal signals 32 and 33, which must be in it."""
    sigset = (ctypes.c_ulong * (_OPAQUE // ctypes.sizeof(ctypes.c_ulong)))()
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    for sig in _DEFAULTS:
        sigset[(sig - 1) // bits] |= 1 << ((sig - 1) % bits)
    return sigset


def _check(code: int) -> None:
    if code != 0:
        raise OSError(code, os.strerror(code))

"""The site's settings, read from the environment once (Balsam's ``SiteConfig``).

The composition roots (the ``scalebox`` group, ``scalebox launcher``, stage jobs, an MPI stage,
:class:`scalebox_hpc.client.Client`) call :meth:`Settings.from_environ` when they start and pass
the values down; library code takes them as arguments and reads no ``SCALEBOX_*`` variable
itself, and nothing is read at import time. An invalid value is one :class:`SettingsError`
naming the variable, before anything else runs.

Not settings, and so not here: the variables a launcher sets for a task's scripts and that the
``scalebox`` commands run inside a task read back (``SCALEBOX_EMIT_FILE``, ``SCALEBOX_SERVICES``,
``TASK_ID`` ...: the task API), and those passed on to children unread (``SCALEBOX_PYTHON``).

Imports nothing of scalebox_hpc but its errors, and nothing heavy: ``scalebox task add`` builds
settings too, once per emitted message.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from scalebox_hpc.errors import ScaleboxError

DEFAULT_AUTOSCALE_SECONDS = 10.0
DEFAULT_RPC_PER_MINUTE = 30
DEFAULT_MPI_INIT_TIMEOUT = 120.0

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")


class SettingsError(ScaleboxError):
    """A SCALEBOX_* variable has a value scalebox cannot use."""

    def __init__(self, variable: str, value: str, expected: str) -> None:
        self.variable, self.value, self.expected = variable, value, expected
        super().__init__(f"{variable}={value!r} is not {expected}",
                         hint=f"set {variable} to {expected}, or unset it for the default")


@dataclass(frozen=True)
class Settings:
    """Everything scalebox reads from its environment, parsed and checked once. Every field is
    one variable (named in its docstring); None, or the default, when it is unset or empty."""

    dsn: str | None = field(default=None, repr=False)
    """SCALEBOX_DSN: the PostgreSQL connection string (unset: the PG* variables, else the
    embedded database)."""
    dsn_password_ok: bool = False
    """SCALEBOX_DSN_PASSWORD_OK: any value silences the warning about a password in the DSN."""
    db_pooler: bool = False
    """SCALEBOX_DB_POOLER: ``transaction`` when the DSN leads to PgBouncer in transaction mode
    (``none`` or unset: a PostgreSQL server)."""
    listen_dsn: str | None = field(default=None, repr=False)
    """SCALEBOX_LISTEN_DSN: where to LISTEN for new-task hints (``off``: nowhere, the slots poll)."""
    app_id: int | None = None
    """SCALEBOX_APP_ID: the app commands act on without ``--app`` (a launcher sets it for its tasks)."""
    work_root: Path | None = None
    """SCALEBOX_WORK_ROOT: the root of the slots' work dirs (unset: ``$TMPDIR/scalebox-<euid>/work``)."""
    local_scratch: str | None = None
    """SCALEBOX_LOCAL_SCRATCH: this node's local scratch root, ``${HOST}`` allowed."""
    local_dir: Path | None = None
    """SCALEBOX_LOCAL_DIR: what containers get at /local when the launcher has no local scratch."""
    data_root: Path | None = None
    """SCALEBOX_DATA_ROOT: the cluster's data root, mounted at /data in containers."""
    sif_cache: Path | None = None
    """SCALEBOX_SIF_CACHE: where converted Apptainer images are kept (unset: ~/.cache/scalebox_hpc/sif)."""
    containers: tuple[Path, ...] = ()
    """SCALEBOX_CONTAINERS: directories (``:``-separated) searched first for image definitions."""
    runtime: str = "auto"
    """SCALEBOX_RUNTIME: the engine of modules with a base_image and no ``runtime:`` (``auto``:
    Apptainer, else Podman, else Docker; ``local``: no container)."""
    host: str | None = None
    """SCALEBOX_HOST: this host's name for slot placement (unset: SLURMD_NODENAME, else the hostname)."""
    home: Path | None = None
    """SCALEBOX_HOME: per-user state, the embedded database's too (unset: $XDG_DATA_HOME/scalebox_hpc)."""
    autoscale_seconds: float = DEFAULT_AUTOSCALE_SECONDS
    """SCALEBOX_AUTOSCALE_SECONDS: how often a stage job asks for its app's autoscale pass, and how
    often an app gets one whoever asks (seconds, 0 or more)."""
    slurm_rpc_per_minute: int = DEFAULT_RPC_PER_MINUTE
    """SCALEBOX_SLURM_RPC_PER_MINUTE: the Slurm commands per minute and cluster autoscale passes may run."""
    mpi_ranks: int | None = None
    """SCALEBOX_MPI_RANKS: the communicator size an MPI stage expects (unset: Slurm's task count)."""
    mpi_init_timeout: float = DEFAULT_MPI_INIT_TIMEOUT
    """SCALEBOX_MPI_INIT_TIMEOUT: seconds MPI_Init may take before the rank ends itself (0: no limit)."""
    pass_env: frozenset[str] = frozenset()
    """SCALEBOX_PASS_ENV: more of the launcher's variables (``,``-separated names) a task's scripts get."""
    traceback: bool = False
    """SCALEBOX_TRACEBACK: errors show their traceback (as ``--traceback``; 1, true, yes, on)."""
    log_format: str | None = None
    """SCALEBOX_LOG_FORMAT: ``text`` or ``json`` log lines (as ``--log-format``; unset: text). Not
    checked here: an unknown format stays the usage error (exit 2) of ``--log-format``."""
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    """The environment these settings were read from, for what is passed on to children as it is."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings in ``environ`` (default: a copy of this process's environment); raises
        :class:`SettingsError` on the first invalid value."""
        env = dict(os.environ if environ is None else environ)
        return cls(
            dsn=_text(env, "SCALEBOX_DSN"),
            dsn_password_ok=bool(_text(env, "SCALEBOX_DSN_PASSWORD_OK")),
            db_pooler=_choice(env, "SCALEBOX_DB_POOLER", {"": False, "none": False, "transaction": True}),
            listen_dsn=_text(env, "SCALEBOX_LISTEN_DSN"),
            app_id=_count(env, "SCALEBOX_APP_ID", minimum=1),
            work_root=_path(env, "SCALEBOX_WORK_ROOT"),
            local_scratch=_text(env, "SCALEBOX_LOCAL_SCRATCH"),
            local_dir=_path(env, "SCALEBOX_LOCAL_DIR"),
            data_root=_path(env, "SCALEBOX_DATA_ROOT"),
            sif_cache=_path(env, "SCALEBOX_SIF_CACHE"),
            containers=path_list(env.get("SCALEBOX_CONTAINERS", "")),
            runtime=_text(env, "SCALEBOX_RUNTIME") or "auto",
            host=_text(env, "SCALEBOX_HOST"),
            home=_path(env, "SCALEBOX_HOME"),
            autoscale_seconds=_seconds(env, "SCALEBOX_AUTOSCALE_SECONDS", DEFAULT_AUTOSCALE_SECONDS),
            slurm_rpc_per_minute=_or(_count(env, "SCALEBOX_SLURM_RPC_PER_MINUTE"), DEFAULT_RPC_PER_MINUTE),
            mpi_ranks=_count(env, "SCALEBOX_MPI_RANKS", minimum=1),
            mpi_init_timeout=_seconds(env, "SCALEBOX_MPI_INIT_TIMEOUT", DEFAULT_MPI_INIT_TIMEOUT),
            pass_env=frozenset(n.strip() for n in env.get("SCALEBOX_PASS_ENV", "").split(",") if n.strip()),
            # as before: only a yes counts; the group's --traceback option reads it as click does
            traceback=env.get("SCALEBOX_TRACEBACK", "").strip().lower() in _TRUE,
            # checked where it is used (click's choice, logs.formatter): a usage error, exit 2, as always
            log_format=env.get("SCALEBOX_LOG_FORMAT", "").strip().lower() or None,
            environ=env,
        )

    @classmethod
    def of(cls, given: Settings | Mapping[str, str] | None = None) -> Settings:
        """``given`` when it is settings already; else the settings read from the mapping ``given``
        (default: this process's environment). For the public functions that take the roots'
        settings but keep their older calls working (a mapping, or nothing: tests, benchmarks,
        library users); scalebox's own code passes the settings its root built."""
        return given if isinstance(given, Settings) else cls.from_environ(given)


def path_list(text: str) -> tuple[Path, ...]:
    """The directories of a ``:``-separated list (``os.pathsep``), empty entries left out."""
    return tuple(Path(d) for d in text.split(os.pathsep) if d)


def environ_containers(environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """SCALEBOX_CONTAINERS alone (default: this process's environment), for the public
    constructors built without settings (:class:`~scalebox_hpc.runtime.images.SifCache`,
    ``EngineCli``, ``RuntimeChooser``: tests, benchmarks, library users); the roots pass
    :attr:`Settings.containers`."""
    return path_list((os.environ if environ is None else environ).get("SCALEBOX_CONTAINERS", ""))


def environ_sif_cache(environ: Mapping[str, str] | None = None) -> Path | None:
    """SCALEBOX_SIF_CACHE alone, for the same public constructors (the roots pass :attr:`Settings.sif_cache`)."""
    return _path(os.environ if environ is None else environ, "SCALEBOX_SIF_CACHE")


def parse_seconds(variable: str, text: str) -> float | None:
    """A duration in seconds (a finite number, 0 or more); None for an empty ``text``."""
    value = text.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise SettingsError(variable, text, "a number of seconds, 0 or more")
    return seconds


def parse_count(variable: str, text: str, *, minimum: int = 0) -> int | None:
    """A whole number of at least ``minimum``; None for an empty ``text``."""
    value = text.strip()
    if not value:
        return None
    # int() also takes "1_000" and non-ASCII digits: a setting is plain decimal digits
    if not (value.isascii() and value.isdigit()) or int(value) < minimum:
        raise SettingsError(variable, text, f"a whole number, {minimum} or more")
    return int(value)


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _seconds(env: Mapping[str, str], variable: str, default: float) -> float:
    return _or(parse_seconds(variable, env.get(variable, "")), default)


def _count(env: Mapping[str, str], variable: str, *, minimum: int = 0) -> int | None:
    return parse_count(variable, env.get(variable, ""), minimum=minimum)


def _text(env: Mapping[str, str], variable: str) -> str | None:
    return env.get(variable) or None


def _path(env: Mapping[str, str], variable: str) -> Path | None:
    value = env.get(variable)
    return Path(value) if value else None


def _choice(env: Mapping[str, str], variable: str, choices: Mapping[str, T]) -> T:
    value = env.get(variable, "").strip().lower()
    if value not in choices:
        raise SettingsError(variable, env[variable], "one of " + ", ".join(c for c in choices if c))
    return choices[value]

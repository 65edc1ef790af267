"""How the entry points print log records: the usual text line, or one JSON object per line.

The library only logs (``getLogger(__name__)``, facts in the message, and the same facts as
``extra={...}`` where a program reading the log wants them as fields); the composition roots
(the ``scalebox`` group, the launcher) call :func:`configure`. ``--log-format json`` or
``SCALEBOX_LOG_FORMAT=json`` prints each record as ``{"ts", "level", "logger", "msg", ...}`` with
the record's extra fields, for sites that ship logs; the text line ends with them as
``key=value`` pairs (:class:`TextFormatter`), so a stage job's log shows them too. Imports
nothing of scalebox_hpc but its errors.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from scalebox_hpc.errors import InvalidValueError

LOG_FORMAT_ENV = "SCALEBOX_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"

# what every LogRecord has; anything else on a record came from ``extra=``
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_chosen: str | None = None


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed with ``extra={...}``."""
    return {key: value for key, value in vars(record).items() if key not in _RECORD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``,
    ``thread``, the extra fields, and ``exc`` (the traceback) when there is one. Values JSON
    cannot hold are printed with ``str``; an extra never replaces one of the fixed keys."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        fixed: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "thread": record.threadName,
        }
        line = {**fixed, **{key: value for key, value in record_extras(record).items() if key not in fixed}}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


_BARE = re.compile(r"[\w.:/@+,-]+")


def _text_value(value: Any) -> str:
    """A value of a ``key=value`` pair, never misread: text as it is when it is one plain word,
    else JSON-quoted (white space, ``=``, quotes, control characters, empty); other values as
    compact JSON (``[\"sacct\",\"-X\"]`` becomes ``["sacct","-X"]``), quoted if that has white space."""
    if not isinstance(value, (int, float, list, tuple, dict)) and value is not None:
        text = str(value)  # a str, a Path, anything else JSON has no type for
        return text if _BARE.fullmatch(text) else json.dumps(text, ensure_ascii=False)
    compact = json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(compact, ensure_ascii=False) if any(c.isspace() for c in compact) else compact


class TextFormatter(logging.Formatter):
    """The usual text line (:data:`TEXT_FORMAT`), then the record's extra fields as
    `` key=value`` pairs in the order given (``action=slurm_sacct_failed job_id=12``); the
    traceback, if any, on the lines after, as ``logging.Formatter`` puts it."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line of :data:`TEXT_FORMAT` with the record's extras appended (a traceback, if
        any, follows on the next lines, as ``logging.Formatter.format`` adds it)."""
        line = super().formatMessage(record)
        extras = record_extras(record)
        if not extras:
            return line
        return line + " " + " ".join(f"{key}={_text_value(value)}" for key, value in extras.items())


def use_format(name: str | None) -> None:
    """The format later :func:`configure` calls use when not given one (the ``scalebox`` group
    sets it from ``--log-format``: commands configure logging after the group ran)."""
    global _chosen
    _chosen = None if name is None else _checked(name)


def chosen_format(setting: str | None = None) -> str:
    """:func:`use_format`'s choice, else ``setting`` (a root's ``Settings.log_format``: the
    ``SCALEBOX_LOG_FORMAT`` it read) when given, else ``text``. Reads no environment itself: the
    roots choose (the ``scalebox`` group calls :func:`use_format` with ``--log-format``, else the
    settings' ``log_format``)."""
    if _chosen is not None:
        return _chosen
    value = (setting or "").strip().lower()
    return _checked(value) if value else "text"


def formatter(name: str) -> logging.Formatter:
    """The formatter called ``name`` (``text`` or ``json``)."""
    return JsonFormatter() if _checked(name) == "json" else TextFormatter(TEXT_FORMAT)


def configure(verbose: int = 0, fmt: str | None = None) -> None:
    """Entry points only: one stderr handler, INFO with -v, DEBUG with -vv, in ``fmt`` (default
    :func:`chosen_format`). A no-op when logging is configured already (``logging.basicConfig``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt or chosen_format()))
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), handlers=[handler])


def _checked(name: str) -> str:
    value = name.strip().lower()
    if value not in FORMATS:
        raise InvalidValueError(f"log format {name!r} is not one of {', '.join(FORMATS)}",
                                hint=f"use --log-format text|json or {LOG_FORMAT_ENV}=text|json")
    return value

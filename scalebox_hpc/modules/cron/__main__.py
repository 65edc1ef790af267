"""``python -m scalebox_hpc.modules.cron``: the cron task (started by the module's run.sh).

Settings (the module's ``environments:``):

- ``CRON_FILE``: the path of cron.txt, or ``CRON_TABLE``: its lines themselves (one of the two);
- ``CRON_DURATION``: optional, a duration (``30s``, ``2h``): the task ends with status 0 after it,
  so ``scalebox run`` ends once the ticks are worked off; without it the task runs until the app
  is FINISHED (e.g. a module calls ``scalebox app set-finished``) or cancelled, or the run drains.

Exit codes, as for the other standard modules: 0 done, 10 CRON_FILE missing or unreadable,
14 bad configuration (a bad cron.txt line, a module that is not a sink of this one, no
CRON_FILE / CRON_TABLE, no database), 1 anything else; 143 / 130 on TERM / INT.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from datetime import timedelta
from types import FrameType

from scalebox_hpc import taskapi
from scalebox_hpc.errors import DatabaseError, ScaleboxError
from scalebox_hpc.models import ModuleRef
from scalebox_hpc.modules.cron.database import LauncherSink, TaskIdentity
from scalebox_hpc.modules.cron.loop import CronLoop, SystemClock, backoff
from scalebox_hpc.modules.cron.schedule import CronFileError, Entry, parse_cron_file, parse_duration
from scalebox_hpc.pipeline import did_you_mean

logger = logging.getLogger("scalebox_hpc.modules.cron")

SOURCE_MISSING = 10
BAD_CONFIG = 14


class ConfigError(ScaleboxError):
    """The cron module is not configured right."""

    hint = "see the cron module in the README: CRON_FILE or CRON_TABLE, sink_modules, CRON_DURATION"

    def __init__(self, message: str, *, code: int = BAD_CONFIG, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


def read_table(environ: dict[str, str]) -> tuple[str, str]:
    """(the cron.txt text, its name for messages) from CRON_FILE or CRON_TABLE."""
    path, table = environ.get("CRON_FILE", ""), environ.get("CRON_TABLE", "")
    if path and table:
        raise ConfigError("set CRON_FILE or CRON_TABLE, not both")
    if table:
        return table, "CRON_TABLE"
    if not path:
        raise ConfigError("neither CRON_FILE (the path of cron.txt) nor CRON_TABLE (its lines) is set")
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(1 << 20), path
    except OSError as exc:
        raise ConfigError(f"cannot read CRON_FILE {path!r}: {exc.strerror}", code=SOURCE_MISSING) from exc


def check_targets(entries: list[Entry], refs: dict[str, ModuleRef], me: str, file: str) -> None:
    """Every entry's module exists and is a sink of this module (the cron task's RUNNING state is
    what keeps an idle sink's slots from exiting between two ticks)."""
    sinks = refs[me].sink_modules if me in refs else tuple(refs)
    for entry in entries:
        if entry.module not in refs:
            raise CronFileError(f"no module {entry.module!r} in this app{did_you_mean(entry.module, list(refs))}"
                                f" (modules: {', '.join(refs)})", file=file, line=entry.line)
        if entry.module not in sinks:
            raise CronFileError(
                f"module {entry.module!r} is not in sink_modules of {me!r}: add it there, or its slots "
                "idle out between two ticks", file=file, line=entry.line)


def _run_for(environ: dict[str, str]) -> timedelta | None:
    text = environ.get("CRON_DURATION", "").strip()
    if not text:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"CRON_DURATION: {exc}") from None
    if seconds <= 0 or seconds > 10**9:
        raise ConfigError(f"CRON_DURATION: {text!r} must be more than 0s (and at most 10^9 s)")
    return timedelta(seconds=float(seconds))


def _modules(sink: LauncherSink, clock: SystemClock) -> dict[str, ModuleRef]:
    """The app's modules, waiting out an outage (logged once)."""
    failures = 0
    while True:
        try:
            return sink.modules()
        except DatabaseError as exc:
            failures += 1
            if failures == 1:
                logger.warning("database unreachable at start (%s); retrying", exc)
            clock.sleep(backoff(failures))


def main(environ: dict[str, str]) -> int:
    """Parse, check, then run the loop; the task's exit code."""
    text, name = read_table(environ)
    entries = parse_cron_file(text, file=os.path.basename(name) if name != "CRON_TABLE" else name)
    if not entries:
        raise ConfigError(f"{name} has no schedule line (only blank lines and # comments)")
    run_for = _run_for(environ)
    path = environ.get(taskapi.SERVICES_ENV, "")
    task_id = environ.get("TASK_ID", "")
    if not path or not task_id.isdigit():
        raise ConfigError(f"no {taskapi.SERVICES_ENV} or TASK_ID: the cron module runs as a task of a launcher")
    clock = SystemClock()
    sink = LauncherSink(path, TaskIdentity(int(task_id)))
    try:
        check_targets(entries, _modules(sink, clock), environ.get("MODULE_NAME", ""), os.path.basename(name))
        logger.info("%d schedule(s) from %s, times in UTC%s", len(entries), name,
                    f", for {run_for}" if run_for else "")
        why = CronLoop(entries, sink, clock, run_for=run_for).run()
    finally:
        sink.close()
    logger.info("%s", why)
    return 0


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _configure_logging() -> None:
    """Ticks (INFO) on stdout, warnings and errors on stderr, one line each."""
    fmt = logging.Formatter("cron: %(message)s")
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(fmt)
    logging.basicConfig(level=logging.INFO, handlers=[out, err], force=True)


def entry_point() -> int:
    """The program: exit code, errors as one line plus a hint."""
    signal.signal(signal.SIGTERM, _on_signal)  # a drain, cancel or timeout: end at once, cleanly
    signal.signal(signal.SIGINT, _on_signal)
    _configure_logging()
    try:
        return main(dict(os.environ))
    except ConfigError as exc:
        print(f"cron: {exc}\n  hint: {exc.hint}", file=sys.stderr)
        return exc.code
    except CronFileError as exc:
        print(f"cron: {exc}\n  hint: {exc.hint}", file=sys.stderr)
        return BAD_CONFIG
    except ScaleboxError as exc:
        print(f"cron: {exc}" + (f"\n  hint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(entry_point())

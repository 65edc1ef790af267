"""The one exception tree of scalebox_hpc: every error the library raises is a ScaleboxError.

::

    class                       hint  defined in             raised when
    ScaleboxError               -     errors                 base; ``hint`` says what to do next
    ├── PipelineError           yes   errors                 a pipeline or env file is invalid (file, line, key)
    │   └── CronFileError       yes   modules.cron.schedule  a line of the cron module's cron.txt is invalid
    ├── InvalidMessageError     yes   errors                 a task body/headers cannot be stored or passed on
    ├── NotFoundError           yes   errors                 an app, module or task does not exist (kind, ident)
    ├── DatabaseError           yes   errors                 PostgreSQL refused or is unreachable (dsn)
    │   ├── SchemaError         yes   errors                 the schema is missing or from another version
    │   └── PrivilegeError      yes   errors                 the connected role may not do this (a launcher role)
    ├── InvalidValueError       yes   errors                 PostgreSQL refused a value (out of range, malformed)
    ├── EmbeddedDatabaseError   yes   errors                 the embedded or served PostgreSQL cannot start or stop
    ├── ServiceFileError        yes   servicefile            a served database's service file is unreadable or malformed
    ├── ScriptError             yes   errors                 a module script is missing or not runnable
    ├── CommandError            -     errors                 an external command failed (argv, returncode, stderr)
    │   └── SlurmCommandError   yes   slurm.commands         a Slurm command failed, timed out or did not start
    ├── SlotError               -     errors                 a slot cannot run (setup.sh failed, ...)
    ├── MpiError                yes   errors                 an MPI stage cannot run (no mpi4py, bad launch, lost rank)
    ├── ContainerError          yes   errors                 a container engine or image is missing or unusable
    ├── LeaseLostError          -     models                 the slot lost the task (task_id): queue to slot only
    ├── SlurmParseError         yes   slurm.parse            Slurm output the parsers do not understand (what, text)
    ├── NotInSlurmJobError      yes   slurm.environment      not inside a Slurm job (SLURM_JOB_ID unset)
    ├── SlurmEnvironmentError   -     slurm.environment      a SLURM_* variable cannot be parsed
    ├── StageScriptError        yes   slurm.script           a stage job script cannot be rendered
    ├── StageSubmitError        yes   cli.stage              some stage jobs could not be submitted
    ├── ProtocolError           -     launcher.pyworker      a Python worker's reply breaks the pipe protocol
    ├── ServiceError            yes   taskapi                the launcher refused a running task's call (kind)
    ├── ProbeParseError         yes   doctor.report          a doctor probe job's output is not its report
    ├── AppTimeoutError         yes   errors                 an app did not end within the time waited (Python client)
    ├── UnsafePathError         -     runtime.paths          a private dir is someone else's or others can write it
    ├── InvalidJobIdError       yes   slurm.client           a Slurm job id read back from the database is malformed
    ├── ConfigError             yes   modules.cron.__main__  the cron module is misconfigured (code: its exit)
    └── SettingsError           -     settings               a SCALEBOX_* variable is invalid (variable, value)

"hint": the class has a default ``hint`` (any error may also be given one when raised). "defined
in": the module under ``scalebox_hpc``; the classes outside this file live next to the only code
that raises them. Errors carry their data as attributes (in parentheses above); ``str(err)`` is
one line. Lower-layer errors (psycopg, subprocess, OSError) are translated where they happen, with
``raise ... from exc``.

Exit codes: the ``scalebox`` CLI prints every ScaleboxError as ``scalebox: error: MESSAGE (hint:
HINT)`` (a traceback with ``--traceback`` / SCALEBOX_TRACEBACK=1) and exits 1, whatever the class;
click's usage errors exit 2 and Ctrl-C 130. The cron standard module (``python -m
scalebox_hpc.modules.cron``) exits with ``ConfigError.code`` (14 bad configuration,
10 CRON_FILE unreadable), 14 for CronFileError and 1 for any other ScaleboxError.
``tests/unit/test_error_tree.py`` fails when a subclass is missing here or drawn under the wrong parent.
"""

from __future__ import annotations

from collections.abc import Sequence


class ScaleboxError(Exception):
    """Something went wrong in scalebox_hpc."""

    hint: str = ""

    def __init__(self, message: str | None = None, *, hint: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "error").strip())
        if hint is not None:
            self.hint = hint


class PipelineError(ScaleboxError):
    """The pipeline file is invalid."""

    hint = "fix the pipeline file; `scalebox app create --check FILE` validates without creating"

    def __init__(self, message: str, *, file: str = "", line: int | None = None, key: str = "") -> None:
        self.file = file
        self.line = line
        self.key = key
        where = file + (f":{line}" if line else "")
        prefix = ": ".join(p for p in (where, key) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class InvalidMessageError(ScaleboxError):
    """The message cannot be stored or delivered."""

    hint = "task bodies are UTF-8 text without NUL bytes; pass large payloads as file paths"


class NotFoundError(ScaleboxError):
    """Not found."""

    hint = "`scalebox app list` and `scalebox task list` show what exists"

    def __init__(self, kind: str, ident: object) -> None:
        self.kind = kind
        self.ident = ident
        super().__init__(f"{kind} {ident!r} not found")


class DatabaseError(ScaleboxError):
    """The database operation failed."""

    hint = "check SCALEBOX_DSN / PG* variables and that the server is running (`scalebox db status`)"

    def __init__(self, message: str, *, dsn: str = "", hint: str | None = None) -> None:
        self.dsn = dsn
        super().__init__(f"{message} (database {dsn})" if dsn else message, hint=hint)


class PrivilegeError(DatabaseError):
    """The connected database role may not do this (42501): another owner's app, or a launcher
    role asked for more than the queue functions. No retry cures it."""

    hint = ("a launcher role acts only on its owner's apps through the queue functions; run the "
            "command as the app's owner (`scalebox db grant OWNER --launcher` binds a launcher role)")


class InvalidValueError(ScaleboxError):
    """PostgreSQL refused a value (out of range, malformed)."""

    hint = "check the numbers and text given on the command line"


class SchemaError(DatabaseError):
    """The database schema is missing or outdated."""

    hint = "run `scalebox db init` (new database) or `scalebox db upgrade`"


class EmbeddedDatabaseError(ScaleboxError):
    """The embedded PostgreSQL could not be managed."""

    hint = "set SCALEBOX_DSN to use an existing PostgreSQL server instead"


class ScriptError(ScaleboxError):
    """A module script is missing or cannot run."""

    hint = "each module needs a run.sh in its code_path (or <app dir>/<module>/)"


class CommandError(ScaleboxError):
    """An external command failed."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        rc = "timed out" if returncode is None else f"exit {returncode}"
        super().__init__(f"{' '.join(self.argv[:3])}: {rc}" + (f": {tail}" if tail else ""))


class SlotError(ScaleboxError):
    """A slot cannot run."""


class MpiError(ScaleboxError):
    """An MPI stage cannot run (mpi4py missing, wrong launch, a rank lost)."""

    hint = "start MPI stages with `srun --mpi=pmi2 ...` (MPICH); see README, MPI stages"


class ContainerError(ScaleboxError):
    """A container engine or image is missing or unusable."""

    hint = ("check the module's runtime:/base_image (README: Containers); "
            "set SCALEBOX_RUNTIME=local to run without containers")


class AppTimeoutError(ScaleboxError):
    """An app did not end within the time waited for it."""

    hint = "wait longer (timeout=None waits until it ends), or look at it with `scalebox status`"

    def __init__(self, app_id: int, timeout: float, pending: int) -> None:
        self.app_id = app_id
        self.timeout = timeout
        self.pending = pending
        super().__init__(f"app {app_id} did not end within {timeout:g} s ({pending} task(s) READY or RUNNING)")

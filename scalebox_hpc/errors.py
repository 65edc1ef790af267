"""The one exception tree of scalebox_hpc.

::

    ScaleboxError                 base; ``hint`` tells the user what to do next
    ├── PipelineError             a pipeline file or env file is invalid (file, line, key)
    ├── InvalidMessageError       a task body/headers cannot be stored or passed to run.sh
    ├── NotFoundError             an app, module or task does not exist
    ├── DatabaseError             PostgreSQL refused or is unreachable (DSN without password)
    │   └── SchemaError           the schema is missing or from another version
    ├── EmbeddedDatabaseError     the embedded PostgreSQL could not be started or stopped
    ├── ScriptError               a module script is missing or not runnable
    ├── CommandError              an external command failed (argv, returncode, stderr)
    ├── ContainerError            a container engine or image is missing or unusable
    ├── SlotError                 a slot cannot run (setup.sh failed, ...)
    └── AppTimeoutError           an app did not end within the time waited for it (Python client)

Errors carry data as attributes; ``str(err)`` is one line for the CLI.
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

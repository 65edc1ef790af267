"""Apptainer's image operations through spython: inspect, pull (``docker://`` … → a SIF) and build.

spython (the Singularity/Apptainer Python client) composes these command lines and parses
``inspect --json``. Read in its source (0.3.x) before use, three things decide how it is used here:

- it runs ``singularity``, a fixed name: the client's ``_init_command`` is replaced per call so the
  command line starts with *our* executable (``apptainer``, a module's full path) and ``-s``;
- its ``build`` and ``pull`` run through the client's ``_run_command``, which has no timeout and no
  working directory, and ``build`` leaves the child's stdout on ours (a probe's JSON report, say):
  that method is replaced per call by :meth:`SpythonApptainer._execute`, an argv run with the
  build's directory (a ``.def``'s ``From: rootfs`` is relative to it), captured output and a hard
  timeout; a failed run raises there, with its last stderr lines;
- it never uses a shell (``subprocess.Popen`` on a list), but it ends the process (``sys.exit``)
  on some refusals and asks for ``sudo`` by default on builds: SystemExit is caught here and
  ``sudo`` is always False (a request for it is refused, not run).

``version`` is an argv run of ``EXE --version`` with the same runner: spython's ``version()``
runs ``singularity --version`` whatever the executable and believes ``$SPYTHON_SINGULARITY_VERSION``
over the binary, so it adds nothing but a wrong answer. ``inspect`` runs through spython's module
function (no per-client hook there): it is captured and quiet, but has no timeout.
The warm-slot agent and per-task runs keep their own ``apptainer exec`` argv
(:mod:`scalebox_hpc.runtime.apptainer`): spython's ``execute`` would add only its printing.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from scalebox_hpc.errors import ContainerError

logger = logging.getLogger(__name__)

PULL_TRANSPORTS = ("docker://", "library://", "oras://", "shub://", "https://")
"""References ``apptainer pull`` fetches (what spython's ``pull`` accepts); archives are built."""
BUILD_TIMEOUT = 1800.0
VERSION_TIMEOUT = 30.0
HINT_EXE = "check that apptainer runs here (`apptainer --version`; `module load apptainer`)"
HINT_BUILD = "run the same `apptainer build` by hand to see the whole log; --fakeroot needs subuid/subgid entries"
HINT_PULL = "pulls need the registry: pull once where it is reachable (SIF cache: SCALEBOX_SIF_CACHE) or use a .sif"
HINT_SPYTHON = "spython >=0.3.14,<0.4 is what scalebox_hpc was tested with (pip show spython)"


class Runner(Protocol):
    """Runs one argv (no shell) and returns what it printed: the seam for tests and the doctor."""

    def __call__(self, argv: Sequence[str], *, cwd: Path | None, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``cwd``; raise OSError or TimeoutExpired as subprocess does."""
        ...


def subprocess_runner(argv: Sequence[str], *, cwd: Path | None, timeout: float) -> subprocess.CompletedProcess[str]:
    """The default :class:`Runner`: ``subprocess.run`` with output captured, stdin closed."""
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def spython_client() -> Any:
    """A new spython client (quiet). Imported here: ``import spython.main`` costs ~30 ms and
    most CLI commands never touch an image."""
    from spython.main import get_client

    return get_client(quiet=True)


@dataclass(frozen=True)
class ImageInfo:
    """What ``apptainer inspect`` tells of an image."""

    labels: dict[str, str] = field(default_factory=dict)
    deffile: str = ""
    runscript: str = ""


@dataclass
class _Call:
    """The per-call state the replaced ``_run_command`` needs: what runs, where, how long."""

    what: str
    cwd: Path | None
    timeout: float
    hint: str
    argv: list[str] = field(default_factory=list)


class SpythonApptainer:
    """The one way scalebox_hpc asks Apptainer for versions, image metadata, pulls and builds.

    ``client_factory`` makes a spython client (a fake in tests), one per call: the hooks set on
    it are that call's, so threads building different images do not share them. ``runner``
    runs every command line."""

    def __init__(self, exe: str, *, runner: Runner = subprocess_runner,
                 client_factory: Callable[[], Any] = spython_client) -> None:
        self.exe = exe
        self.runner = runner
        self.client_factory = client_factory

    # -- operations -------------------------------------------------------------------------------
    def version(self) -> str:
        """The first line ``EXE --version`` prints (``apptainer version 1.4.5``)."""
        proc = self._run([self.exe, "--version"], _Call("apptainer --version", None, VERSION_TIMEOUT, HINT_EXE))
        lines = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
        if not lines:
            raise ContainerError(f"`{self.exe} --version` printed nothing", hint=HINT_EXE)
        return lines[0].strip()

    def inspect(self, image: Path) -> ImageInfo:
        """Labels, definition and runscript of a SIF or sandbox."""
        call = _Call(f"apptainer inspect of {image}", None, VERSION_TIMEOUT, HINT_EXE)
        result = self._spython(call, lambda c: c.inspect(image=str(image), json=True, quiet=True))
        if not isinstance(result, dict) or "attributes" not in result:
            raise ContainerError(f"{call.what} failed: {_failure_text(result)}",
                                 hint=f"is {image} an Apptainer image? (`{self.exe} inspect {image}`)")
        attributes = result["attributes"]
        labels = attributes.get("labels") or {}
        return ImageInfo(
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
            deffile=str(attributes.get("deffile") or ""), runscript=str(attributes.get("runscript") or ""),
        )

    def pull(self, uri: str, out: Path, *, timeout: float = BUILD_TIMEOUT) -> None:
        """``apptainer pull --name OUT --force URI``: a registry image as the SIF ``out``."""
        if not uri.startswith(PULL_TRANSPORTS):
            raise ContainerError(f"cannot pull {uri!r}: apptainer pulls only {', '.join(PULL_TRANSPORTS)} references",
                                 hint="archives (docker-archive:, oci-archive:) are built, not pulled")
        call = _Call(f"apptainer pull of {uri}", None, timeout, HINT_PULL)
        self._spython(call, lambda c: c.pull(image=uri, name=str(out), force=True, quiet=True, stream=False,
                                             capture=True))
        self._produced(out, call)

    def build(self, out: Path, source: str, *, cwd: Path | None = None, fakeroot: bool = False,
              timeout: float = BUILD_TIMEOUT) -> None:
        """``apptainer build [--fakeroot] --force OUT SOURCE`` in ``cwd`` (a ``.def`` or any source)."""
        call = _Call(f"apptainer build of {source}", cwd, timeout, HINT_BUILD)
        options = ["--fakeroot"] if fakeroot else []
        self._spython(call, lambda c: c.build(recipe=source, image=str(out), sudo=False, force=True,
                                              options=options, quiet=True, stream=False))
        self._produced(out, call)

    # -- the spython seam -------------------------------------------------------------------------
    def _spython(self, call: _Call, operation: Callable[[Any], Any]) -> Any:
        """Run ``operation`` on a fresh client whose command lines are ours, translating what
        spython raises (or its ``sys.exit``) into ContainerError."""
        try:
            client = self.client_factory()
            client._init_command = self._init_command
            client._run_command = lambda cmd, **kw: self._execute(call, cmd, **kw)
            return operation(client)
        except ContainerError:
            raise
        except ImportError as exc:
            raise ContainerError(f"{call.what}: spython is not installed ({exc})",
                                 hint="pip install 'spython>=0.3.14,<0.4' (a dependency of scalebox_hpc)") from exc
        except SystemExit as exc:  # spython's bot.exit: it has printed its reason on stderr
            raise ContainerError(f"{call.what}: spython gave up (exit {exc.code}); its message is on stderr",
                                 hint=HINT_SPYTHON) from exc
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            # spython parses apptainer's output (json.loads, result["attributes"]) without checks
            raise ContainerError(f"{call.what}: unexpected answer ({type(exc).__name__}: {exc})",
                                 hint=HINT_SPYTHON) from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise ContainerError(f"{call.what}: {self.exe} did not run: {exc}", hint=call.hint) from exc

    def _init_command(self, action: str | list[str], flags: Sequence[str] | None = None) -> list[str]:
        """spython's ``_init_command`` with our executable and ``-s`` (errors only) instead of
        ``singularity`` and ``--quiet``."""
        return [self.exe, "-s", *(flags or []), *([action] if isinstance(action, str) else action)]

    def _execute(self, call: _Call, cmd: Sequence[str], *, sudo: bool = False, background: bool = False,
                 **_: Any) -> str:
        """spython's ``_run_command``, as an argv run with the call's directory and timeout. A
        failure raises (spython would return it and carry on)."""
        if sudo or background:
            raise ContainerError(f"{call.what}: refusing spython's request for {'sudo' if sudo else 'background'}",
                                 hint=HINT_SPYTHON)
        proc = self._run([str(a) for a in cmd], call)
        return proc.stdout

    def _run(self, argv: list[str], call: _Call) -> subprocess.CompletedProcess[str]:
        call.argv = argv
        logger.info("%s: %s", call.what, " ".join(argv))
        try:
            proc = self.runner(argv, cwd=call.cwd, timeout=call.timeout)
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"{call.what}: no answer within {call.timeout:.0f} s", hint=call.hint) from exc
        except OSError as exc:
            raise ContainerError(f"{call.what}: {argv[0]} did not run: {exc.strerror or exc}", hint=call.hint) from exc
        if proc.returncode != 0:
            tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
            raise ContainerError(f"{call.what} failed (exit {proc.returncode}): {' | '.join(tail)}", hint=call.hint)
        return proc

    @staticmethod
    def _produced(out: Path, call: _Call) -> None:
        if not out.exists():
            raise ContainerError(f"{call.what} exited 0 but wrote no {out.name}", hint=call.hint)


def _failure_text(result: Any) -> str:
    """spython's failure value (``{"message": [lines], "return_code": N}``) as one line."""
    if isinstance(result, dict) and "return_code" in result:
        message = result.get("message")
        lines = message if isinstance(message, list) else [str(message or "")]
        text = " | ".join(str(line).strip() for line in lines if str(line).strip())
        return f"exit {result['return_code']}: {text[-300:]}"
    return f"unexpected answer {type(result).__name__}"

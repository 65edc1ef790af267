"""No library module reads a SCALEBOX_* variable on its own: settings.py reads them once, for the
composition roots, which pass the values down (issue 19).

An AST pass over every module of the package: a *read* is ``X.get(NAME ...)``, ``X[NAME]`` (not
assigned to), ``os.getenv(NAME)`` or ``NAME in X``, where NAME is a ``"SCALEBOX_..."`` literal or
a module constant holding one (``POOLER_ENV``, ``LOG_FORMAT_ENV``...). Building a child's
environment (``env["SCALEBOX_DSN"] = dsn``) is a write and fine. The allow-list names each module
that may still read one, and why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import scalebox_hpc

PACKAGE = Path(scalebox_hpc.__file__).parent

TASK_API = frozenset({"SCALEBOX_EMIT_FILE", "EMIT_BUFFER_ENV", "SCALEBOX_SERVICES", "SERVICES_ENV",
                      "SCALEBOX_SERVICES_DIR", "SERVICES_DIR_ENV"})
"""The task API: variables a launcher sets for a task's scripts, read back by the ``scalebox``
commands run inside that task (settings.py says why they are not settings)."""

ALLOWED: dict[str, frozenset[str] | None] = {
    "settings.py": None,  # any: the one place that reads the SCALEBOX_* settings
    "cli/__init__.py": TASK_API,
    "cli/common.py": TASK_API,
    "cli/apps.py": TASK_API,
    "cli/tasks.py": TASK_API,
    "cli/state.py": TASK_API,
    "modules/cron/__main__.py": TASK_API,  # the cron module's program, a task of a launcher
    # a container run's environment (the one built for the task's script, not this process's):
    # the socket's path is swapped for the task's request directory, which the container can reach
    "runtime/container.py": TASK_API,
    "taskapi.py": TASK_API,  # taskapi.service(): a collective handler's call, inside the task
    # a fault-injection point of the outbox's crash tests, never a site setting
    "db/outbox.py": frozenset({"SCALEBOX_OUTBOX_FAULT"}),
    # the doctor inspects the environment it is given (a probe job's, on another node) and
    # reports a bad value as a finding instead of raising as Settings does: raw values on purpose
    "doctor/gather.py": frozenset({"SCALEBOX_DSN"}),
    "doctor/probe.py": frozenset({"SCALEBOX_LOCAL_SCRATCH", "SCALEBOX_LOCAL_DIR"}),
}
"""Who may still read which variable (None: any)."""


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "SCALEBOX_..."`` (also annotated) constants."""
    found: dict[str, str] = {}
    for node in tree.body:
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value.startswith("SCALEBOX_"):
            found.update({t.id: value.value for t in targets if isinstance(t, ast.Name)})
    return found


def _variable(node: ast.expr, constants: dict[str, str], imported: set[str]) -> str | None:
    """The SCALEBOX_* name ``node`` stands for, if it does."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("SCALEBOX_"):
        return node.value
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    if isinstance(node, ast.Attribute) and node.attr.endswith("_ENV") and node.attr in imported:
        return node.attr  # another module's constant (taskapi.SERVICES_ENV ...)
    if isinstance(node, ast.Name) and node.id.endswith("_ENV") and node.id in imported:
        return node.id
    return None


def reads(source: str) -> list[tuple[int, str]]:
    """(line, variable) of every read of a SCALEBOX_* variable in ``source``."""
    tree = ast.parse(source)
    constants = _constants(tree)
    # names of *_ENV constants this project defines for SCALEBOX_* variables, wherever they live
    imported = set(_ENV_CONSTANTS)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if node.func.attr in ("get", "getenv"):
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            key = node.slice
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops):
            key = node.left
        if key is not None and (name := _variable(key, constants, imported)) is not None:
            found.append((node.lineno, name))
    return found


def _env_constants() -> set[str]:
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        names |= set(_constants(ast.parse(path.read_text(encoding="utf-8"))))
    return names


_ENV_CONSTANTS = _env_constants()


def _modules() -> list[str]:
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("module", _modules())
def test_no_library_module_reads_a_setting_itself(module: str) -> None:
    allowed = ALLOWED.get(module, frozenset())
    if allowed is None:
        return
    found = [(n, v) for n, v in reads((PACKAGE / module).read_text(encoding="utf-8")) if v not in allowed]
    assert not found, (f"{module} reads {', '.join(f'{v} (line {n})' for n, v in found)}: take the value "
                       "from the root's Settings (scalebox_hpc.settings) instead")


def test_the_allow_list_names_modules_that_exist() -> None:
    assert set(ALLOWED) <= set(_modules())


@pytest.mark.parametrize(("source", "expected"), [
    ('import os\nos.environ.get("SCALEBOX_HOME")\n', [(2, "SCALEBOX_HOME")]),
    ('env = {}\nx = env["SCALEBOX_DSN"]\n', [(2, "SCALEBOX_DSN")]),
    ('import os\nos.getenv("SCALEBOX_HOST", "")\n', [(2, "SCALEBOX_HOST")]),
    ('POOLER_ENV = "SCALEBOX_DB_POOLER"\ndef f(env): return env.get(POOLER_ENV, "")\n', [(2, "SCALEBOX_DB_POOLER")]),
    ('def f(env): return "SCALEBOX_DSN" in env\n', [(1, "SCALEBOX_DSN")]),
    ('env = {}\nenv["SCALEBOX_DSN"] = "x"\n', []),  # building a child's environment
    ('x = "set SCALEBOX_DSN to a server"\n', []),  # a message naming it
])
def test_the_check_sees_reads_and_only_reads(source: str, expected: list[tuple[int, str]]) -> None:
    assert reads(source) == expected

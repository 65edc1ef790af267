"""Every shell script in the repository is linted by shellcheck in CI (launchers/testbed/shellcheck.sh,
the test-bed's lint phase): the scripts are listed here independently (tracked files named *.sh or
*.bash, or whose #! line runs a POSIX shell), so a new one cannot dodge the lint."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = ROOT / "launchers" / "testbed" / "shellcheck.sh"
SHELLS = {"sh", "bash", "dash", "ksh"}
TEMPLATES = {"launchers/slurm/stage.sbatch"}
"""Not shell until rendered ({placeholders}); shellcheck.sh lints the rendering (the golden file)."""


def tracked() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def interpreter(path: Path) -> str | None:
    """The program a ``#!`` line runs (``env``'s argument for ``#!/usr/bin/env bash``)."""
    with path.open("rb") as f:
        first = f.readline(200).decode("utf-8", "replace")
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if not words:
        return None
    program = words[0].rsplit("/", 1)[-1]
    if program == "env":
        rest = [w for w in words[1:] if not w.startswith("-")]
        program = rest[0] if rest else ""
    return program


def is_shell_script(name: str) -> bool:
    path = ROOT / name
    if not path.is_file() or path.is_symlink():
        return False
    return path.suffix in (".sh", ".bash") or interpreter(path) in SHELLS


def linted() -> set[str]:
    proc = subprocess.run(["bash", str(LINT), "--list"], capture_output=True, text=True, timeout=60, check=True)
    return set(proc.stdout.splitlines())


def test_the_interpreter_is_read_from_the_shebang(tmp_path: Path) -> None:
    cases = {"#!/usr/bin/env bash\n": "bash", "#!/bin/sh -e\n": "sh", "#!/usr/bin/env -S bash -eu\n": "bash",
             "#!/usr/bin/env python3\n": "python3", "echo hi\n": None}
    for text, expected in cases.items():
        script = tmp_path / "s"
        script.write_text(text)
        assert interpreter(script) == expected, text


def test_every_shell_script_is_linted() -> None:
    scripts = {name for name in tracked() if is_shell_script(name)}
    assert len(scripts) > 20  # the lister itself works (launchers/, modules, container_bin, examples ...)
    missing = sorted(scripts - TEMPLATES - linted())
    assert not missing, f"shell scripts that launchers/testbed/shellcheck.sh does not lint: {missing}"


def test_only_shell_scripts_are_linted() -> None:
    extra = sorted(name for name in linted() if not is_shell_script(name))
    assert not extra, f"not shell scripts, yet linted: {extra}"


def test_the_skipped_templates_are_documented_and_their_rendering_is_linted() -> None:
    text = LINT.read_text()
    for name in TEMPLATES:
        assert name in text
    assert "tests/unit/slurm_fixtures/stage.sbatch.golden" in linted()


"""Every command's --help, as a user reads it, and one way to name the app everywhere (issue 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from scalebox_hpc.cli import cli
from tests.helpers import write_app


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, cmd in sorted(group.commands.items()):
        out += _commands(cmd, (*path, name)) if isinstance(cmd, click.Group) else [(*path, name)]
    return out


def sbx(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"scalebox {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.mark.parametrize("command", _commands(cli), ids=" ".join)
def test_every_command_has_examples_and_no_noise(command: tuple[str, ...]) -> None:
    proc = sbx(dict(os.environ), *command, "--help")
    text = proc.stdout
    assert "Examples:" in text and f"scalebox {' '.join(command)}" in text.split("Examples:", 1)[1], text
    assert "9223372036854775807" not in text and "``" not in text, text  # no id bounds, no RST backticks


@pytest.mark.pg
def test_the_app_is_named_with_app_everywhere(cli_env: dict[str, str], tmp_path: Path) -> None:
    path = write_app(tmp_path / "one", "name: one\nmodules:\n  a: {}\n", {"a/run.sh": "true\n"})
    first = sbx(cli_env, "app", "create", str(path)).stdout.strip()
    second = sbx(cli_env, "app", "create", str(path)).stdout.strip()
    assert json.loads(sbx(cli_env, "status", "--app", first, "--json").stdout)["app"]["id"] == int(first)
    assert json.loads(sbx(cli_env, "status", first, "--json").stdout)["app"]["id"] == int(first)  # the older form
    assert json.loads(sbx(cli_env, "app", "show", "--app", first, "--json").stdout)["id"] == int(first)
    sbx(cli_env, "app", "pause", "--app", first)
    assert json.loads(sbx(cli_env, "app", "show", "--app", first, "--json").stdout)["status"] == "PAUSED"
    assert json.loads(sbx(cli_env, "app", "show", "--json").stdout)["id"] == int(second)  # the newest
    clash = sbx(cli_env, "status", "--app", first, second, check=False)
    assert clash.returncode == 2 and "name different apps" in clash.stderr, clash.stderr

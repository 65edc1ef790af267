"""Settings: read from the environment once, every SCALEBOX_* variable a checked field."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.settings import (
    DEFAULT_AUTOSCALE_SECONDS,
    DEFAULT_MPI_INIT_TIMEOUT,
    DEFAULT_RPC_PER_MINUTE,
    Settings,
    SettingsError,
    parse_count,
    parse_seconds,
)


def test_defaults_when_nothing_is_set() -> None:
    s = Settings.from_environ({})
    assert dataclasses.replace(s, environ={}) == Settings()
    assert (s.dsn, s.app_id, s.work_root, s.local_scratch, s.host, s.mpi_ranks) == (None,) * 6
    assert (s.runtime, s.containers, s.pass_env, s.db_pooler, s.traceback) == ("auto", (), frozenset(), False, False)
    assert s.autoscale_seconds == DEFAULT_AUTOSCALE_SECONDS == 10.0
    assert s.slurm_rpc_per_minute == DEFAULT_RPC_PER_MINUTE == 30
    assert s.mpi_init_timeout == DEFAULT_MPI_INIT_TIMEOUT == 120.0


def test_empty_values_are_unset() -> None:
    names = ["SCALEBOX_DSN", "SCALEBOX_APP_ID", "SCALEBOX_WORK_ROOT", "SCALEBOX_AUTOSCALE_SECONDS",
             "SCALEBOX_SLURM_RPC_PER_MINUTE", "SCALEBOX_MPI_RANKS", "SCALEBOX_RUNTIME", "SCALEBOX_DB_POOLER"]
    assert dataclasses.replace(Settings.from_environ(dict.fromkeys(names, "")), environ={}) == Settings()


OVERRIDES: list[tuple[str, str, str, object]] = [
    ("SCALEBOX_DSN", "postgresql://u@h/db", "dsn", "postgresql://u@h/db"),
    ("SCALEBOX_DSN_PASSWORD_OK", "1", "dsn_password_ok", True),
    ("SCALEBOX_DB_POOLER", " Transaction ", "db_pooler", True),
    ("SCALEBOX_DB_POOLER", "none", "db_pooler", False),
    ("SCALEBOX_LISTEN_DSN", "off", "listen_dsn", "off"),
    ("SCALEBOX_APP_ID", "42", "app_id", 42),
    ("SCALEBOX_WORK_ROOT", "/w", "work_root", Path("/w")),
    ("SCALEBOX_LOCAL_SCRATCH", "/l/${HOST}", "local_scratch", "/l/${HOST}"),
    ("SCALEBOX_LOCAL_DIR", "/ld", "local_dir", Path("/ld")),
    ("SCALEBOX_DATA_ROOT", "/data", "data_root", Path("/data")),
    ("SCALEBOX_SIF_CACHE", "/sif", "sif_cache", Path("/sif")),
    ("SCALEBOX_CONTAINERS", f"/a{os.pathsep}{os.pathsep}/b", "containers", (Path("/a"), Path("/b"))),
    ("SCALEBOX_RUNTIME", "podman", "runtime", "podman"),
    ("SCALEBOX_HOST", "n1", "host", "n1"),
    ("SCALEBOX_HOME", "/home/x", "home", Path("/home/x")),
    ("SCALEBOX_AUTOSCALE_SECONDS", "0", "autoscale_seconds", 0.0),
    ("SCALEBOX_AUTOSCALE_SECONDS", "2.5", "autoscale_seconds", 2.5),
    ("SCALEBOX_SLURM_RPC_PER_MINUTE", " 7 ", "slurm_rpc_per_minute", 7),
    ("SCALEBOX_MPI_RANKS", "4", "mpi_ranks", 4),
    ("SCALEBOX_MPI_INIT_TIMEOUT", "0", "mpi_init_timeout", 0.0),
    ("SCALEBOX_PASS_ENV", "A, B,,", "pass_env", frozenset({"A", "B"})),
    ("SCALEBOX_TRACEBACK", "Yes", "traceback", True),
    ("SCALEBOX_TRACEBACK", "0", "traceback", False),
    ("SCALEBOX_LOG_FORMAT", " JSON ", "log_format", "json"),
]


@pytest.mark.parametrize(("variable", "value", "name", "expected"), OVERRIDES)
def test_each_variable_sets_its_field(variable: str, value: str, name: str, expected: object) -> None:
    settings = Settings.from_environ({variable: value})
    assert getattr(settings, name) == expected
    assert settings.environ == {variable: value}  # what children are given, as it was


def test_every_field_is_a_documented_variable() -> None:
    source = Path(sys.modules[Settings.__module__].__file__ or "").read_text()
    for f in dataclasses.fields(Settings):
        if f.name != "environ":
            variable = "SCALEBOX_" + f.name.upper()
            assert f'"""{variable}:' in source, f"{f.name}: no docstring naming {variable}"
            assert any(row[0] == variable for row in OVERRIDES), f"{variable}: no override test"


@pytest.mark.parametrize(("variable", "value"), [
    ("SCALEBOX_AUTOSCALE_SECONDS", "ten"), ("SCALEBOX_AUTOSCALE_SECONDS", "-1"),
    ("SCALEBOX_AUTOSCALE_SECONDS", "nan"), ("SCALEBOX_AUTOSCALE_SECONDS", "inf"),
    ("SCALEBOX_SLURM_RPC_PER_MINUTE", "1.5"), ("SCALEBOX_SLURM_RPC_PER_MINUTE", "-3"),
    ("SCALEBOX_APP_ID", "0"), ("SCALEBOX_APP_ID", "app"), ("SCALEBOX_MPI_RANKS", "four"),
    ("SCALEBOX_MPI_INIT_TIMEOUT", "soon"), ("SCALEBOX_DB_POOLER", "session"),
])
def test_an_invalid_value_is_one_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as exc:
        Settings.from_environ({variable: value})
    assert isinstance(exc.value, ScaleboxError)
    assert (exc.value.variable, exc.value.value) == (variable, value)
    assert str(exc.value).startswith(f"{variable}={value!r} is not ") and variable in exc.value.hint


def test_a_dsn_is_not_shown_in_the_repr() -> None:
    shown = repr(Settings.from_environ({"SCALEBOX_DSN": "postgresql://u:secret@h/db",
                                        "SCALEBOX_LISTEN_DSN": "postgresql://u:other@h/db"}))
    assert "secret" not in shown and "other" not in shown


@given(st.text())
def test_parse_seconds_returns_a_non_negative_finite_number_or_says_which_variable(text: str) -> None:
    try:
        value = parse_seconds("SCALEBOX_X", text)
    except SettingsError as exc:
        assert exc.variable == "SCALEBOX_X" and exc.value == text
        return
    assert value is None if not text.strip() else (value is not None and math.isfinite(value) and value >= 0)


@given(st.floats(min_value=0, allow_infinity=False, allow_nan=False))
def test_parse_seconds_reads_back_what_python_prints(seconds: float) -> None:
    assert parse_seconds("SCALEBOX_X", repr(seconds)) == seconds


@given(st.text(), st.integers(min_value=0, max_value=3))
def test_parse_count_returns_a_whole_number_at_least_the_minimum(text: str, minimum: int) -> None:
    try:
        value = parse_count("SCALEBOX_X", text, minimum=minimum)
    except SettingsError as exc:
        assert exc.variable == "SCALEBOX_X"
        return
    if not text.strip():
        assert value is None
    else:
        assert value is not None and value >= minimum and str(value) == text.strip().lstrip("0").rjust(1, "0")


@given(st.integers(min_value=1, max_value=10**12))
def test_parse_count_reads_every_positive_number(n: int) -> None:
    assert parse_count("SCALEBOX_X", f" {n} ", minimum=1) == n


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, check=False)


def test_nothing_is_read_at_import_time() -> None:
    # an invalid value breaks only whoever builds settings, not an import (it used to: a
    # ValueError from `import scalebox_hpc.node`)
    proc = _python("import scalebox_hpc.node, scalebox_hpc.cli, scalebox_hpc.client",
                   SCALEBOX_AUTOSCALE_SECONDS="soon", SCALEBOX_SLURM_RPC_PER_MINUTE="many")
    assert proc.returncode == 0, proc.stderr


def test_the_cli_says_which_variable_is_wrong_in_one_line() -> None:
    proc = _python("from scalebox_hpc.cli import main; main(['app', 'list'])", SCALEBOX_MPI_RANKS="four")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "scalebox: error: SCALEBOX_MPI_RANKS='four' is not a whole number, 1 or more "
        "(hint: set SCALEBOX_MPI_RANKS to a whole number, 1 or more, or unset it for the default)"]

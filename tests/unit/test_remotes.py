"""Remote sinks (one database per cluster): the REMOTE_SERVER / APP_ID parsers and the pipeline checks."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalebox_hpc.errors import PipelineError
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.pipeline.remotes import Remote, module_remote, parse_app_id, remote_dsn
from tests.helpers import write_app


@pytest.mark.parametrize(("server", "dsn"), [
    ("db2", "host=db2"),
    ("db2.cluster2.example:5433", "host=db2.cluster2.example port=5433"),
    ("10.0.6.100", "host=10.0.6.100"),
    ("[fd00::2]:5433", "host=fd00::2 port=5433"),
    ("[fd00::2]", "host=fd00::2"),
    ("fd00::2", "host=fd00::2"),
    ("  db2  ", "host=db2"),
    ("postgresql://u@db2:5433/sbx", "postgresql://u@db2:5433/sbx"),
    ("postgres://db2/sbx", "postgres://db2/sbx"),
    ("host=db2 port=5433 dbname=sbx", "host=db2 port=5433 dbname=sbx"),
])
def test_remote_server_forms(server: str, dsn: str) -> None:
    assert remote_dsn(server) == dsn


@pytest.mark.parametrize("server", ["", "   ", "db2:", "db2:0", "db2:65536", "db2:http", "db 2", "[fd00::2",
                                    "[fd00::2]x", "-db2", "db2;rm", "a'b", "zz::qq"])
def test_bad_remote_servers_are_refused(server: str) -> None:
    with pytest.raises(ValueError, match="REMOTE_SERVER"):
        remote_dsn(server)


@given(st.text(max_size=80))
def test_remote_dsn_is_a_valid_conninfo_or_refused(text: str) -> None:
    """Whatever REMOTE_SERVER holds: a ValueError, or a connection string libpq parses (the host
    form never lets a value add a key of its own)."""
    try:
        dsn = remote_dsn(text)
    except ValueError:
        return
    if dsn.startswith(("postgresql://", "postgres://")) or "=" in text:
        return  # given as a DSN: libpq's to judge when it connects
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    assert set(params) <= {"host", "port"} and params["host"]


@given(st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True), st.integers(1, 65535))
def test_host_and_port_round_trip(host: str, port: int) -> None:
    params = psycopg.conninfo.conninfo_to_dict(remote_dsn(f"{host}:{port}"))
    assert params == {"host": host, "port": str(port)}


@given(st.text(max_size=20))
def test_app_id_is_a_positive_integer_or_refused(text: str) -> None:
    try:
        value = parse_app_id(text)
    except ValueError:
        return
    assert value >= 1 and str(value) == text.strip().lstrip("0")


def test_module_remote_needs_both() -> None:
    assert module_remote({}) is None
    assert module_remote({"APP_ID": "3"}) is None  # APP_ID alone is just a variable
    assert module_remote({"REMOTE_SERVER": "db2", "APP_ID": " 7 "}) == Remote("db2", 7)
    with pytest.raises(ValueError, match="APP_ID"):
        module_remote({"REMOTE_SERVER": "db2"})
    with pytest.raises(ValueError, match="APP_ID"):
        module_remote({"REMOTE_SERVER": "db2", "APP_ID": "x"})


PART1 = """\
name: part1
modules:
  scatter:
    sink_modules: [calc]
    environments:
{env}
  gather: {{}}
"""


def _load(tmp_path: Path, env: str) -> object:
    text = PART1.format(env=env)
    return load_pipeline(write_app(tmp_path / "a", text, {"scatter/run.sh": "true\n", "gather/run.sh": "true\n"}))


def test_a_sink_not_in_the_file_is_remote_with_remote_server(tmp_path: Path) -> None:
    spec = _load(tmp_path, "      - REMOTE_SERVER=db2:5433\n      - APP_ID=4")
    assert spec.remote_sinks() == {"calc": Remote("db2:5433", 4)}  # type: ignore[attr-defined]


def test_a_sink_typo_is_still_an_error_without_a_remote(tmp_path: Path) -> None:
    text = PART1.format(env="      - X=1").replace("[calc]", "[gathr]")
    app = write_app(tmp_path / "a", text, {"scatter/run.sh": "true\n", "gather/run.sh": "true\n"})
    with pytest.raises(PipelineError) as err:
        load_pipeline(app)
    assert "unknown module 'gathr' (did you mean 'gather'?)" in str(err.value)


@pytest.mark.parametrize(("env", "message"), [
    ("      - REMOTE_SERVER=db2", "APP_ID (the app id in the remote database) is not"),
    ("      - REMOTE_SERVER=db2\n      - APP_ID=two", "APP_ID 'two' is not a positive integer"),
    ("      - REMOTE_SERVER=db 2\n      - APP_ID=2", "REMOTE_SERVER 'db 2'"),
])
def test_a_bad_remote_is_an_error_naming_the_module(tmp_path: Path, env: str, message: str) -> None:
    with pytest.raises(PipelineError) as err:
        _load(tmp_path, env)
    assert "modules.scatter.environments" in str(err.value) and message in str(err.value)


def test_the_cross_cluster_example_loads_in_the_2023_form() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "cross-cluster-primes"
    one = load_pipeline(example / "cluster1/app.yaml", environ={"CLUSTER2_SERVER": "db2:5433", "APP2_ID": "2"})
    two = load_pipeline(example / "cluster2/app.yaml", environ={"CLUSTER1_SERVER": "db1", "APP1_ID": "1"})
    assert [m.name for m in one.modules] == ["scatter", "gather"]
    assert one.remote_sinks() == {"calc": Remote("db2:5433", 2)}
    assert [m.name for m in two.modules] == ["calc"] and two.remote_sinks() == {"gather": Remote("db1", 1)}
    with pytest.raises(PipelineError, match="APP_ID '' is not a positive integer"):  # APP2_ID empty
        load_pipeline(example / "cluster1/app.yaml", environ={"CLUSTER2_SERVER": "db2", "APP2_ID": ""})


NATIVE = """\
name: part1
remotes:
  cluster2: {dsn: "postgresql://db2.example/scalebox", app_id: 5}
modules:
  scatter:
    sink_modules: [calc, gather]
    remote: cluster2
  gather: {}
"""


def test_the_native_form_names_a_remote_of_remotes(tmp_path: Path) -> None:
    spec = load_pipeline(write_app(tmp_path / "a", NATIVE, {"scatter/run.sh": "true\n", "gather/run.sh": "true\n"}))
    assert spec.remote_sinks() == {"calc": Remote("postgresql://db2.example/scalebox", 5)}


@pytest.mark.parametrize(("old", "new", "message"), [
    ("remote: cluster2", "remote: clustr2", "modules.scatter.remote: unknown remote 'clustr2' (did you mean "),
    ("app_id: 5", "app_id: 0", "remotes.cluster2.app_id"),
    ('dsn: "postgresql://db2.example/scalebox"', 'dsn: "db 2"', "remotes.cluster2.dsn"),
    ("app_id: 5", "app_id: 5, user: x", "unknown key 'user'"),
])
def test_a_bad_native_remote_is_an_error(tmp_path: Path, old: str, new: str, message: str) -> None:
    app = write_app(tmp_path / "a", NATIVE.replace(old, new), {"scatter/run.sh": "true\n", "gather/run.sh": "true\n"})
    with pytest.raises(PipelineError) as err:
        load_pipeline(app)
    assert message in str(err.value)

"""The pure parts of ``scalebox db serve``: the service file (untrusted input), the DSN built
from it and its refresh, the sbatch argv and job script, the hand-over timing (injected clock),
the TLS front's protocol bytes and the openssl argv."""

from __future__ import annotations

import json
import shlex
import struct
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from scalebox_hpc import embedded, servicefile
from scalebox_hpc.db.connection import configured_dsn
from scalebox_hpc.dbserve import front, job, server, tls
from scalebox_hpc.errors import EmbeddedDatabaseError
from scalebox_hpc.servicefile import ServiceFileError, ServiceInfo
from scalebox_hpc.settings import Settings
from scalebox_hpc.slurm import SlurmCommandError


def info(tmp: Path, **changes: Any) -> ServiceInfo:
    base = ServiceInfo(host="node3", port=40123, database="scalebox", user="sbx_alice",
                       passfile=str(tmp / "service" / "pgpass"), ca=str(tmp / "service" / "ca.crt"),
                       generation=2, job_id="77", node="node3", data=str(tmp / "served"), pid=1234)
    return base.with_changes(**changes)


def raw(tmp: Path, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(servicefile.render(info(tmp)))
    data.update(changes)
    return data


# ------------------------------------------------------------------ service file


def test_render_parse_round_trip(tmp_path: Path) -> None:
    original = info(tmp_path, state="handover", handover_started="2026-12-01T10:00:00.000+00:00")
    assert servicefile.parse(servicefile.render(original)) == original


@pytest.mark.parametrize("changes, word", [
    ({"format": 2}, "format"),
    ({"host": "node3;rm -rf"}, "host"),
    ({"host": ""}, "host"),
    ({"port": 0}, "port"),
    ({"port": "5432"}, "port"),
    ({"port": True}, "port"),
    ({"generation": -1}, "generation"),
    ({"user": "Robert'); DROP"}, "user"),
    ({"database": ""}, "database"),
    ({"passfile": "relative/pgpass"}, "absolute"),
    ({"ca": 7}, "ca"),
    ({"state": "exploded"}, "state"),
    ({"job_id": "12; scancel -u root"}, "job_id"),
    ({"job_id": 12}, "job_id"),
    ({"pid": -5}, "pid"),
])
def test_parse_refuses_each_bad_field(tmp_path: Path, changes: dict[str, Any], word: str) -> None:
    with pytest.raises(ServiceFileError, match=word):
        servicefile.parse(json.dumps(raw(tmp_path, **changes)))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_parse_any_text_is_a_service_info_or_a_service_file_error(text: str) -> None:
    try:
        parsed = servicefile.parse(text)
    except ServiceFileError:
        return
    assert isinstance(parsed, ServiceInfo)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = json_scalars | st.lists(json_scalars, max_size=3) | st.dictionaries(st.text(max_size=10), json_scalars,
                                                                                  max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(raw(Path("/x")))), json_values, max_size=16))
def test_parse_mutated_fields_never_escape_as_another_error(changes: dict[str, Any]) -> None:
    """Any field replaced by any JSON value: a valid ServiceInfo (whose DSN is a plain conninfo with
    exactly these keys) or ServiceFileError, never a KeyError/TypeError or a DSN with more in it."""
    text = json.dumps(raw(Path("/x"), **changes))
    try:
        parsed = servicefile.parse(text)
    except ServiceFileError:
        return
    params = conninfo_to_dict(servicefile.dsn(parsed))
    assert set(params) == {"host", "port", "dbname", "user", "sslmode", "sslrootcert", "passfile"}
    assert params["host"] == parsed.host and params["sslmode"] == "verify-full"


def test_dsn_has_no_password_and_verifies_the_host(tmp_path: Path) -> None:
    params = conninfo_to_dict(servicefile.dsn(info(tmp_path)))
    assert "password" not in params
    assert params == {"host": "node3", "port": "40123", "dbname": "scalebox", "user": "sbx_alice",
                      "sslmode": "verify-full", "sslrootcert": str(tmp_path / "service" / "ca.crt"),
                      "passfile": str(tmp_path / "service" / "pgpass")}


def test_write_is_0600_and_load_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "service.json"
    servicefile.write(path, info(tmp_path))
    assert path.stat().st_mode & 0o777 == 0o600
    assert servicefile.load(path) == info(tmp_path)
    assert servicefile.load(tmp_path / "absent.json") is None


def test_load_refuses_a_file_others_could_change_or_a_symlink(tmp_path: Path) -> None:
    path = tmp_path / "service.json"
    servicefile.write(path, info(tmp_path))
    path.chmod(0o644)
    with pytest.raises(ServiceFileError, match="private"):
        servicefile.load(path)
    path.chmod(0o600)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    with pytest.raises(ServiceFileError):
        servicefile.load(link)


def test_refreshed_ignores_a_service_file_others_could_plant(tmp_path: Path) -> None:
    _home(tmp_path)
    old = servicefile.dsn(info(tmp_path))
    servicefile.write(tmp_path / "service" / "service.json", info(tmp_path, host="evil", port=40999))
    (tmp_path / "service" / "service.json").chmod(0o666)
    assert servicefile.refreshed(old) == old


def _home(tmp_path: Path, **changes: Any) -> dict[str, str]:
    (tmp_path / "service").mkdir(exist_ok=True)
    servicefile.write(tmp_path / "service" / "service.json", info(tmp_path, **changes))
    return {"SCALEBOX_HOME": str(tmp_path)}


def test_configured_dsn_uses_the_service_file_after_the_environment(tmp_path: Path) -> None:
    env = _home(tmp_path)
    assert configured_dsn(env) == servicefile.dsn(info(tmp_path))
    assert configured_dsn({**env, "SCALEBOX_DSN": "postgresql://me@db/x"}) == "postgresql://me@db/x"
    assert configured_dsn({**env, "PGHOST": "db"}) == ""
    assert configured_dsn({"SCALEBOX_HOME": str(tmp_path / "nothing")}) is None


def test_the_service_file_is_under_the_settings_home_not_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _home(tmp_path)
    monkeypatch.setenv("SCALEBOX_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("SCALEBOX_DSN", "postgresql://me@db/from-the-process")
    site = Settings(home=tmp_path)
    assert servicefile.data_home(site) == embedded.data_home(site) == tmp_path
    assert servicefile.service_dir(site) == tmp_path / "service"
    assert configured_dsn(site) == servicefile.dsn(info(tmp_path))
    assert configured_dsn(Settings(home=tmp_path, dsn="postgresql://me@db/x")) == "postgresql://me@db/x"
    assert configured_dsn(Settings(home=tmp_path, environ={"PGHOST": "db"})) == ""
    assert servicefile.data_home(Settings(environ={"XDG_DATA_HOME": "/xdg"})) == Path("/xdg/scalebox_hpc")


def test_a_stopped_service_is_not_used(tmp_path: Path) -> None:
    assert configured_dsn(_home(tmp_path, state="stopped")) is None


def test_refreshed_follows_a_hand_over(tmp_path: Path) -> None:
    _home(tmp_path)
    old = servicefile.dsn(info(tmp_path))
    assert servicefile.refreshed(old) == old
    servicefile.write(tmp_path / "service" / "service.json", info(tmp_path, host="node1", port=40999, generation=3))
    new = conninfo_to_dict(servicefile.refreshed(old))
    assert (new["host"], new["port"]) == ("node1", "40999")


def test_refreshed_leaves_other_dsns_alone(tmp_path: Path) -> None:
    _home(tmp_path)
    assert servicefile.refreshed("postgresql://me@db/x") == "postgresql://me@db/x"
    other = f"host=db dbname=x passfile={tmp_path / 'elsewhere' / 'pgpass'}"
    assert servicefile.refreshed(other) == other
    (tmp_path / "service" / "service.json").write_text("{not json")
    stale = servicefile.dsn(info(tmp_path))
    assert servicefile.refreshed(stale) == stale  # a broken file: keep what we had


# ------------------------------------------------------------------ the Slurm job


def test_sbatch_args() -> None:
    args = job.sbatch_args(log=Path("/h/service/db-%j.log"), partition="p1", time_limit="1-00:00:00",
                           account="acc", extra=["--qos=long"])
    assert args == ["--job-name=sbx-db", "--nodes=1", "--ntasks=1", "--output=/h/service/db-%j.log",
                    "--open-mode=append", "--partition=p1", "--time=1-00:00:00", "--account=acc", "--qos=long"]
    assert job.sbatch_args(log=Path("/l")) == ["--job-name=sbx-db", "--nodes=1", "--ntasks=1", "--output=/l",
                                               "--open-mode=append"]


def test_job_script_quotes_every_value() -> None:
    script = job.job_script("/opt/py thon/bin/python", Path("/data/it's here"), 0, timedelta(minutes=10))
    assert script.startswith("#!/bin/bash\n")
    [line] = [ln for ln in script.splitlines() if ln.startswith("exec ")]
    assert shlex.split(line)[1:] == ["/opt/py thon/bin/python", "-m", "scalebox_hpc", "-v", "db", "serve", "--here",
                                     "--in-job", "--data", "/data/it's here", "--port", "0",
                                     "--handover-before", "600s"]


@pytest.mark.parametrize("text, seconds", [("600", 600), ("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400)])
def test_parse_duration(text: str, seconds: int) -> None:
    assert job.parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10 minutes", "-5m", "1.5h", "m"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(EmbeddedDatabaseError):
        job.parse_duration(text)


T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_handover_timing() -> None:
    end = T0 + timedelta(hours=1)
    before = timedelta(minutes=10)
    assert job.handover_at(end, before) == T0 + timedelta(minutes=50)
    assert not job.handover_due(T0 + timedelta(minutes=49, seconds=59), end, before)
    assert job.handover_due(T0 + timedelta(minutes=50), end, before)
    assert job.handover_at(None, before) is None and not job.handover_due(T0, None, before)
    assert job.ready_deadline(T0, end) == end - job.MARGIN
    assert job.ready_deadline(end, end) == end  # past the margin: no waiting
    assert job.ready_deadline(T0, None) == T0 + timedelta(minutes=10)


class FakeProc:
    returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class FakeFront:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_supervise_hands_over_when_the_injected_clock_reaches_the_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    lay = server.Layout(tmp_path / "service", tmp_path / "served")
    lay.service.mkdir()
    now = [T0]
    calls: list[str] = []
    monkeypatch.setattr(job, "hand_over", lambda *a, **k: calls.append("hand_over"))
    monkeypatch.setattr(job, "resubmit", lambda *a: "78")
    served = server.Served(FakeProc(), FakeFront(), info(tmp_path), tmp_path)  # type: ignore[arg-type]

    def sleep(_: float) -> None:
        now[0] += timedelta(minutes=1)
        calls.append(now[0].strftime("%H:%M"))

    code = job.supervise(lay, served, client=object(), end=T0 + timedelta(minutes=5),  # type: ignore[arg-type]
                         before=timedelta(minutes=2), clock=lambda: now[0], sleep=sleep)
    assert code == 0
    assert calls == ["12:01", "12:02", "12:03", "hand_over"]


def test_supervise_hands_over_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lay = server.Layout(tmp_path / "service", tmp_path / "served")
    lay.service.mkdir()
    calls: list[str] = []
    monkeypatch.setattr(job, "hand_over", lambda *a, **k: calls.append("hand_over"))
    monkeypatch.setattr(job, "resubmit", lambda *a: "78")
    served = server.Served(FakeProc(), FakeFront(), info(tmp_path), tmp_path)  # type: ignore[arg-type]
    job.request_handover(lay, "76")  # another job's request is not ours

    def sleep(_: float) -> None:
        calls.append("tick")
        if len(calls) == 2:
            job.request_handover(lay, "77")

    assert job.supervise(lay, served, client=object(), end=None, before=timedelta(0),  # type: ignore[arg-type]
                         clock=lambda: T0, sleep=sleep) == 0
    assert calls == ["tick", "tick", "hand_over"]


def test_supervise_keeps_serving_when_the_successor_cannot_be_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    lay = server.Layout(tmp_path / "service", tmp_path / "served")
    lay.service.mkdir()
    now = [T0]
    calls: list[str] = []
    tries = iter([SlurmCommandError(["sbatch"], 1, "sbatch: error: QOS limit"), None])

    def resubmit(*_: Any) -> str:
        calls.append("sbatch")
        failure = next(tries)
        if failure is not None:
            raise failure
        return "78"

    monkeypatch.setattr(job, "resubmit", resubmit)
    monkeypatch.setattr(job, "hand_over", lambda *a, **k: calls.append("hand_over"))
    served = server.Served(FakeProc(), FakeFront(), info(tmp_path), tmp_path)  # type: ignore[arg-type]

    def sleep(_: float) -> None:
        now[0] += timedelta(seconds=10)

    assert job.supervise(lay, served, client=object(), end=T0, before=timedelta(0),  # type: ignore[arg-type]
                         clock=lambda: now[0], sleep=sleep) == 0
    assert calls == ["sbatch", "sbatch", "hand_over"]
    assert now[0] == T0 + timedelta(seconds=30)  # the second try after RETRY, not in a tight loop


def test_supervise_stops_on_the_stop_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lay = server.Layout(tmp_path / "service", tmp_path / "served")
    lay.service.mkdir()
    servicefile.write(lay.service_file, info(tmp_path))
    stopped: list[bool] = []
    monkeypatch.setattr(server, "stop_served", lambda *_: stopped.append(True))
    stop = threading.Event()
    stop.set()
    served = server.Served(FakeProc(), FakeFront(), info(tmp_path), tmp_path)  # type: ignore[arg-type]
    assert job.supervise(lay, served, client=None, end=None, before=timedelta(0), stop=stop) == 0
    assert stopped == [True]
    loaded = servicefile.load(lay.service_file)
    assert loaded is not None and loaded.state == "stopped"


# ------------------------------------------------------------------ server, TLS


def test_role_name() -> None:
    assert server.role_name("alice") == "sbx_alice"
    assert server.role_name("Jean-Luc.Picard") == "sbx_jean_luc_picard"
    assert server.role_name("") == "sbx_user"


def test_hba_admits_only_the_role_with_scram() -> None:
    lines = [ln for ln in server.hba_text("sbx_alice").splitlines() if ln and not ln.startswith("#")]
    assert lines == ["local all sbx_alice scram-sha-256"]
    conf = server.config_text(Path("/tmp/sbx-db-x"))
    assert "listen_addresses = ''" in conf and "unix_socket_permissions = 0700" in conf


def test_front_protocol_bytes() -> None:
    assert struct.pack("!ii", 8, 80877103) == front.SSL_REQUEST
    message = front.error_response("TLS only")
    assert message[:1] == b"E" and struct.unpack("!i", message[1:5])[0] == len(message) - 1
    assert b"MTLS only\0" in message and message.endswith(b"\0\0")


def test_openssl_argv() -> None:
    ca = tls.ca_argv(Path("/s/ca.key"), Path("/s/ca.crt"))
    assert ca[:3] == ["openssl", "req", "-x509"] and "basicConstraints=critical,CA:TRUE" in ca
    assert tls.extensions(["vm", "node1"]).startswith("subjectAltName=DNS:vm,DNS:node1\n")
    sign = tls.sign_argv(Path("/c.csr"), Path("/ca.key"), Path("/ca.crt"), Path("/s.crt"), Path("/e.cnf"))
    assert sign[:3] == ["openssl", "x509", "-req"] and sign[sign.index("-CAkey") + 1] == "/ca.key"


def test_doctor_names_the_service_file_as_the_source() -> None:
    from scalebox_hpc.doctor import checks

    check = checks.dsn_check("served", "postgresql://sbx_alice@node3:40123/scalebox")
    assert check.status == "pass" and check.summary.startswith("served (service file): "), check

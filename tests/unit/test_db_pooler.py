"""SCALEBOX_DB_POOLER and SCALEBOX_LISTEN_DSN: which connections and which listener a node uses."""

from __future__ import annotations

import pytest

from scalebox_hpc.db.connection import behind_pooler
from scalebox_hpc.db.notify import Listener, listen_dsn
from scalebox_hpc.settings import Settings, SettingsError

DSN = "postgresql://app@pgbouncer:6432/scalebox"
DIRECT = "postgresql://app@db:5432/scalebox"


@pytest.mark.parametrize(("value", "pooled"), [
    ("", False), ("none", False), ("NONE", False), ("transaction", True), (" Transaction ", True),
])
def test_behind_pooler(value: str, pooled: bool) -> None:
    assert behind_pooler({"SCALEBOX_DB_POOLER": value}) is pooled
    assert behind_pooler({}) is False


@pytest.mark.parametrize("value", ["session", "yes", "1", "statement"])
def test_an_unknown_pooler_mode_is_an_error_with_a_hint(value: str) -> None:
    # the settings' error (the roots meet it first, before any connection): it names the variable
    with pytest.raises(SettingsError, match="is not one of none, transaction") as info:
        behind_pooler({"SCALEBOX_DB_POOLER": value})
    assert info.value.variable == "SCALEBOX_DB_POOLER"
    assert "SCALEBOX_DB_POOLER" in (info.value.hint or "")


def test_given_settings_are_used_and_the_process_environment_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEBOX_DB_POOLER", "transaction")
    monkeypatch.setenv("SCALEBOX_LISTEN_DSN", "off")
    assert behind_pooler(Settings()) is False
    assert behind_pooler(Settings(db_pooler=True)) is True
    assert listen_dsn(DSN, Settings()) == DSN
    assert listen_dsn(DSN, Settings(db_pooler=True)) is None
    assert listen_dsn(DSN, Settings(db_pooler=True, listen_dsn=DIRECT)) == DIRECT
    assert behind_pooler() is True  # nothing given: this process's settings, for library users


@pytest.mark.parametrize(("env", "expected"), [
    ({}, DSN),                                                              # a server: LISTEN on it
    ({"SCALEBOX_DB_POOLER": "transaction"}, None),                          # a LISTEN there hears nothing
    ({"SCALEBOX_DB_POOLER": "transaction", "SCALEBOX_LISTEN_DSN": DIRECT}, DIRECT),
    ({"SCALEBOX_LISTEN_DSN": DIRECT}, DIRECT),
    ({"SCALEBOX_LISTEN_DSN": "off"}, None),
    ({"SCALEBOX_LISTEN_DSN": "None"}, None),
    ({"SCALEBOX_LISTEN_DSN": "  "}, DSN),
])
def test_listen_dsn(env: dict[str, str], expected: str | None) -> None:
    assert listen_dsn(DSN, env) == expected


def test_a_listener_without_a_dsn_is_ready_at_once_and_starts_no_thread() -> None:
    listener = Listener(None, lambda _m: None).start()
    assert listener.ready.is_set() and not listener._thread.is_alive()
    listener.stop()

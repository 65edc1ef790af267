"""SCALEBOX_DB_POOLER and SCALEBOX_LISTEN_DSN: which connections and which listener a node uses."""

from __future__ import annotations

import pytest

from scalebox_hpc.db.connection import behind_pooler
from scalebox_hpc.db.notify import Listener, listen_dsn
from scalebox_hpc.errors import ScaleboxError

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
    with pytest.raises(ScaleboxError, match="is not a pooler mode") as info:
        behind_pooler({"SCALEBOX_DB_POOLER": value})
    assert "SCALEBOX_DB_POOLER=transaction" in info.value.hint


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

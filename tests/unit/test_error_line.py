"""text.error_line: the one helper behind the database layer's and the outbox's one-line errors."""

from __future__ import annotations

from types import SimpleNamespace

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalebox_hpc.db import connection, outbox
from scalebox_hpc.errors import DatabaseError
from scalebox_hpc.text import error_line


class ServerError(Exception):
    """Shaped as a psycopg error: ``diag.message_primary`` is what the server sent."""

    def __init__(self, text: str, primary: str | None) -> None:
        super().__init__(text)
        self.diag = SimpleNamespace(message_primary=primary)


CONTEXT = "deadlock detected\nDETAIL:  Process 1 waits\nCONTEXT:  PL/pgSQL function sbx_claim_v1() at RETURN QUERY"


def test_the_servers_primary_message_wins_over_its_context_lines() -> None:
    assert error_line(ServerError(CONTEXT, "deadlock  detected\n")) == "deadlock detected"


def test_without_a_primary_message_the_last_line_of_the_text() -> None:
    assert error_line(ServerError("connection failed\n  server closed the connection  \n", None)) == \
        "server closed the connection"
    assert error_line(ServerError("one\n", "  ")) == "one"
    assert error_line(OSError("a\nb")) == "b"


def test_whole_joins_every_line_and_cuts_at_the_limit() -> None:
    assert error_line(ServerError(CONTEXT, "deadlock detected"), whole=True) == " ".join(CONTEXT.split())
    assert error_line(OSError("x" * 600), whole=True, limit=500) == "x" * 500


@pytest.mark.parametrize("whole", [False, True])
def test_an_error_without_text_is_its_class_name(whole: bool) -> None:
    assert error_line(KeyboardInterrupt(), whole=whole) == "KeyboardInterrupt"
    assert error_line(ValueError("  \n "), whole=whole, limit=5) == "ValueError"


@given(st.text())
def test_always_one_line(text: str) -> None:
    for line in (error_line(OSError(text)), error_line(OSError(text), whole=True, limit=500)):
        assert line
        assert "\n" not in line
    assert len(error_line(OSError(text), whole=True, limit=500)) <= 500


def test_the_outbox_records_the_whole_text_cut_at_500() -> None:
    assert outbox._one_line(OSError("first\nsecond " + "y" * 600)) == ("first second " + "y" * 600)[:500]


def test_translated_database_errors_say_the_servers_line() -> None:
    exc = psycopg.OperationalError("connection to server failed\nis the server running?")
    with pytest.raises(DatabaseError, match=r"cannot reach PostgreSQL: is the server running\? \(database"), \
            connection.translate_errors("postgresql://u@h/db"):
        raise exc

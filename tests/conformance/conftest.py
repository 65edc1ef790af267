"""``queue_backend``: every conformance scenario runs once on InMemoryQueue and once on PgQueue."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conformance.backends import Backend, MemoryBackend, PgBackend


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.pg)])
def queue_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The backend under test: ("memory", InMemoryQueue on a fake clock) or ("postgres",
    PgQueue on a fresh test database; skipped without one, failed under CI=true)."""
    backend: Backend = MemoryBackend() if request.param == "memory" else PgBackend(request.getfixturevalue("pg_dsn"))
    try:
        yield backend
    finally:
        backend.close()

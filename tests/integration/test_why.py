"""Why READY tasks wait, as the module_why query finds it on a real PostgreSQL (issue 14): a task
preferring the host that holds its inputs waits, within its locality wait, for that host; when
that host runs no live slot of the module, that is said, and the claim of another host agrees."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.models import Message
from tests.integration.test_locality import claim, live_host, make_app

pytestmark = pytest.mark.pg


@pytest.fixture
def queue(pg_dsn: str) -> Iterator[PgQueue]:
    q = PgQueue(pg_dsn)
    yield q
    q.close()


def reasons(pg_dsn: str, app_id: int) -> list[apps.Why]:
    with connect(pg_dsn) as conn, conn.transaction():
        counts = apps.module_counts(conn, app_id)
        return apps.module_why(conn, app_id, counts, apps.list_slots(conn, app_id))["use"]


def test_tasks_held_for_the_host_with_their_inputs_say_so(pg_dsn: str, tmp_path: Path, queue: PgQueue) -> None:
    app_id = make_app(pg_dsn, tmp_path, wait=600)
    module_id = queue.modules(app_id)["use"].id
    holder = live_host(queue, module_id, "B")
    queue.index_scratch("B", [("f", 5)], [])
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "use", [Message("t", headers={"inputs": ["f"]})])
    assert reasons(pg_dsn, app_id) == []  # B is up: it will take it
    queue.set_slot_status(holder, "EXITED")
    live_host(queue, module_id, "A")
    [why] = reasons(pg_dsn, app_id)
    assert why.kind == "host", why
    assert why.text.startswith("1 task(s) wait for host B, which holds their inputs but runs no live slot"), why
    assert "for up to 600s more" in why.text or "for up to 599s more" in why.text, why
    assert claim(queue, app_id, module_id, "A") == []  # as the claim has it

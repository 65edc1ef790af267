"""An in-memory task queue for tests: the second implementation of the launcher's queue ports.

:class:`InMemoryQueue` implements ``TaskQueue`` and ``BatchQueue`` of
:mod:`scalebox_hpc.launcher.ports` with the semantics of :class:`scalebox_hpc.db.queue.PgQueue`
(and of the SQL behind it, ``sql/queries.sql``): claims by module, host and slot, oldest first,
HOST-BOUND (``to_host``) and SLOT-BOUND (``to_slot``) tasks, locality tiers, back-pressure,
semaphores, leases on an injectable clock, hand-offs with lease checks and CONFLICT_ACTION,
recovery, heartbeats with stray release, the scratch index. It is shipped in the package (as
procrastinate ships its ``InMemoryConnector``) so that launcher code and users' tests can run
without PostgreSQL; ``tests/conformance/test_queue_port.py`` holds the two to the same scenarios.

Test-facing helpers sit next to the port methods: :meth:`InMemoryQueue.create_app`,
:meth:`~InMemoryQueue.add_tasks`, :meth:`~InMemoryQueue.tasks`, :meth:`~InMemoryQueue.executions`,
:meth:`~InMemoryQueue.fail_next` (inject :class:`DatabaseError` outages) and ``calls`` (how often
each port method was called).

Documented limits (what PostgreSQL does that this fake does not):

- no concurrency beyond one lock: every call is one atomic step (PostgreSQL's ``SKIP LOCKED``
  never shows here, nor do statement timeouts);
- no database restart: recovery ignores ``pg_postmaster_start_time`` (a lease never gets the
  extra grace PostgreSQL gives it after a restart);
- ``input_regex`` is a Python regex, not a POSIX one (they agree on simple patterns);
- the order of several tasks claimed for one slot is the claim order (PostgreSQL's ``RETURNING``
  promises no order);
- a hand-off copies the whole state to roll back on a rejected message: fine for tests, not for
  millions of tasks.
"""

from __future__ import annotations

from scalebox_hpc.testing.clock import FakeClock, QueueClock, SystemClock
from scalebox_hpc.testing.core import _PORT_METHODS as _PORT_METHODS  # tests/conformance/test_in_memory_extras.py
from scalebox_hpc.testing.queue import InMemoryQueue
from scalebox_hpc.testing.spec import app_spec

__all__ = ["FakeClock", "InMemoryQueue", "QueueClock", "SystemClock", "app_spec"]

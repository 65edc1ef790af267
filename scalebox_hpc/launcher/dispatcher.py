"""The node's one database session: every slot's claims, hand-offs and heartbeats go through it.

A launcher runs many slots (threads that run tasks); none of them talks to PostgreSQL. Each
holds a :class:`SlotPort` (a :class:`~scalebox_hpc.launcher.ports.TaskQueue`) whose calls are
served by one dispatcher thread owning one queue object (one connection, reopened after an
outage). The thread takes every call waiting when it wakes and serves them together:

- **claims** of the same module become one statement for all asking slots
  (``claim_for_slots``), with a small **prefetch** per slot: a slot finishing a short task
  finds its next one already claimed, and its refill joins the next batch;
- **hand-offs** that finished close together are recorded in one statement
  (``complete_many``: each task still atomic, only while its lease is held); a batch the
  database refuses is recorded task by task, so only the culprit gets the error;
- everything else (heartbeats — one statement for the node —, status, scratch index ...) is
  passed through in order.

Prefetched tasks are RUNNING in the database, held by their slot with a lease like the task it
runs; the dispatcher adds them to the slot's heartbeat, and gives them back (READY, the attempt
not counted) when the slot drains, ends or is told to release.

A hand-off that wrote messages wakes the local slots of the modules they went to at once (they
need not wait for the NOTIFY to come back), and, in the same batch, claims one task for each
of those slots that is idle (its last claim found nothing): the slot then finds its task in its
prefetch when it wakes, without another round trip — the node's own pipeline hands over in one
batch. After a claim of a module came back short, nothing more is claimed for it for
DRY_SECONDS unless the module is woken (see ``Dispatcher._dry``).
"""

from __future__ import annotations

import contextlib
import logging
import queue as stdqueue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from scalebox_hpc.errors import DatabaseError, ScaleboxError, SlotError
from scalebox_hpc.launcher.ports import BatchQueue
from scalebox_hpc.launcher.runner import outage_backoff
from scalebox_hpc.launcher.slotport import SlotPort
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import (
    BUSY_GIVE_UP_SECONDS,
    HAND_OFF_BUSY,
    Beat,
    Completion,
    LeaseLostError,
    ModuleRef,
    Released,
    SlotWant,
    Task,
    TaskResult,
    TaskStatus,
    busy_delay,
    unrecordable,
)

logger = logging.getLogger(__name__)

PREFETCH = 16
"""At most this many tasks a slot holds claimed beyond the one it runs."""
BATCH_PREFETCH = 256
"""The same for a slot that runs its tasks in batches (a Python handler's, see
:meth:`Dispatcher.take_prefetched_many`): still about PREFETCH_SECONDS of work, but tasks of
microseconds need more of them for a batch to be worth its round trips."""
PREFETCH_SECONDS = 0.1
"""A slot's prefetch holds about this much work (tasks of 5 ms: 16; of 50 ms: 2; of 1 s: 1):
enough that a claim serves many tasks, little enough that no other node waits for them."""
REFILL_BATCHES = 4
"""A prefetch buffer holds at least this many served batches' time of work (see _depth)..."""
PREFETCH_MAX_SECONDS = 1.0
"""... but at most this much: a task held is work no other node can run, and a bigger claim holds
its module's claim turn longer. (Until migration 0033 every task held was also renewed with every
beat, so on a saturated database deeper buffers made slower batches, which made deeper buffers:
50 emulated nodes on 2 cores held up to ~7,000-10,000 tasks a node. A beat now writes no task row.)"""
PREFETCH_TASK_SECONDS = 2.0
"""Prefetch only while a module's tasks take less than this on average (a task prefetched
behind a long one would wait, held, while other nodes idle)."""
DRY_SECONDS = 0.5
"""After a claim of a module came back short, claims of it wait this long (see _dry)."""
FINAL_SLOT_STATES = frozenset({"EXITED", "ERROR", "LOST"})
LEASE_SLACK_BATCHES = 2.0
"""A lease the dispatcher grants or renews lasts this many of its slowest recent batches longer
than asked: a slot's next beat waits for the batch being served before it is sent (see
Dispatcher._stretched)."""
LEASE_SLACK_FROM = 0.2
"""Only a batch slower than this fraction of the lease stretches it (a beat comes every third
of a lease: a wait of a fifth leaves it more than a third)."""
LEASE_SLACK_WINDOW = 300.0
"""Seconds a slow batch counts as recent."""
LEASE_SLACK_CAP = 3.0
"""The stretch is at most this many times the lease asked for (a dead node's tasks are
recovered at the latest after 4 leases, however slow the database was)."""


@dataclass(eq=False)
class _Call:
    """One slot's request, answered by the dispatcher thread. Compared by identity (eq=False):
    ``None in held`` ran the generated ``__eq__`` once per held call (a tenth of a 32-slot
    node's Python time)."""

    kind: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    wait: bool = True
    settle: Callable[[_Call, Any, BaseException | None], None] | None = None
    """For a call nobody waits for (an asynchronous hand-off): what to do with its outcome."""
    tries: int = 0
    requeue_for: Callable[[int], bool] | None = None
    fallback: bool = False
    busy_since: float | None = None
    """A hand-off answered HAND_OFF_BUSY: when it first was (it is being tried again)."""
    busy_tries: int = 0

    answered: bool = False

    def answer(self, result: Any = None, error: BaseException | None = None) -> None:
        self.answered = True
        self.result, self.error = result, error
        if self.settle is not None:
            self.settle(self, result, error)
            return
        self.done.set()


def _flatten(batch: list[_Call]) -> list[_Call]:
    """The calls of a batch, a group (one slot's hand-offs sent together) as its calls."""
    return [c for call in batch for c in (call.args[0] if call.kind == "group" else (call,))]


_TICK = _Call("tick")
"""Returned by the inbox wait when a retry is due and no call came."""


@dataclass
class DispatcherStats:
    """Counters for benchmarks and tests: statements by kind and tasks they carried."""

    batches: int = 0
    claim_statements: int = 0
    empty_claims: int = 0
    """Claim statements that found nothing."""
    claims_skipped: int = 0
    """Prefetch top-ups not sent: the module's last claim came back short and nothing woke it since."""
    tasks_claimed: int = 0
    prefetch_hits: int = 0
    complete_statements: int = 0
    tasks_completed: int = 0
    other_statements: int = 0
    largest_batch: int = 0
    eager_claims: int = 0
    """Claims for idle slots made right after a local hand-off wrote messages to their module."""
    tasks_shared: int = 0
    """Prefetched tasks given back so that an idle slot of the same module takes them."""
    hand_offs_busy: int = 0
    """Hand-offs tried again because another transaction held their task row (HAND_OFF_BUSY)."""


@dataclass
class _SlotState:
    """What the dispatcher keeps per slot: its prefetched tasks and whether it may prefetch."""

    buffer: deque[Task] = field(default_factory=deque)
    prefetch: int = 0
    closed: bool = False
    """The slot ended or released its tasks: nothing more is prefetched for it."""
    recording: set[int] = field(default_factory=set)
    """Tasks whose result the slot handed over and the dispatcher has not recorded yet."""
    taken: set[int] = field(default_factory=set)
    """Prefetched tasks the slot took for its batch (a Python handler's) and has not handed
    over yet: renewed with its heartbeat, given back with its prefetch when it ends."""
    running: set[int] = field(default_factory=set)
    """Tasks the slot got from the dispatcher (its own claim's answer, or taken from its
    prefetch) and has not handed over: renewed with its heartbeat, since a beat the slot built
    before it had them is served after (seen: a beat built while the slots' claims waited 9 s
    was served right after them without their 32 tasks, whose leases then expired)."""
    releasing: set[int] = field(default_factory=set)
    """Tasks a release found held by another transaction, to be released again shortly:
    renewed with the slot's heartbeat meanwhile."""
    claimed_at: dict[int, float] = field(default_factory=dict)
    idle: _ClaimKey | None = None
    """The claim the slot last made and that found nothing (it waits for a wake-up); None while
    it has work. A hand-off writing to that module claims for it at once."""
    seq: int = 0
    key: _ClaimKey | None = None
    """The claim the slot last made (its module's): the slots that share one may share work."""


_ClaimKey = tuple[int, int, str, float, str | None]
"""(app id, module id, host, lease seconds, semaphore): the claims that one statement serves."""

_LEASE_KINDS = ("heartbeat", "heartbeat_slots")
"""The calls that renew leases: served first in a batch."""


class Dispatcher:
    """Serves every slot of a launcher through one queue object (one database session).

    ``queue_factory`` is called once, in the dispatcher thread (a connection is used by the
    thread that opened it). Calls after :meth:`close` raise DatabaseError."""

    def __init__(self, queue_factory: Callable[[], BatchQueue], *, prefetch: int = PREFETCH,
                 clock: Callable[[], float] = time.monotonic, wakeups: Wakeups | None = None) -> None:
        self._factory = queue_factory
        self._queue: BatchQueue | None = None
        self._prefetch = prefetch
        self._clock = clock
        self._wakeups = wakeups
        """The launcher's wake-ups: a local hand-off that wrote messages wakes the module's slots."""
        self._woken: Counter[int] = Counter()
        """Module ids the hand-offs of the current batch wrote messages to, with how many of
        their transactions did (one NOTIFY echo each)."""
        self._dry: dict[_ClaimKey, tuple[float, int | None]] = {}
        """Claims whose last statement found fewer tasks than asked: when, and the module's
        wake-up generation before it. For DRY_SECONDS after, unless the module was woken since
        (a NOTIFY from anyone, or a local hand-off writing to it — its own echo is swallowed),
        nothing more is claimed for it: prefetch top-ups are not sent, and a slot's own claim
        is answered "nothing" (only with wake-ups to rely on; never with a semaphore). Work that
        comes without a NOTIFY (a locality wait running out, a sink draining) is then found at
        the slot's next poll, as when it arrives just after a claim."""
        self._inbox: stdqueue.SimpleQueue[_Call | None] = stdqueue.SimpleQueue()
        self._lock = threading.Lock()
        self._slots: dict[int, _SlotState] = {}
        self._task_seconds: dict[int, float] = {}
        """Per module id: a moving average of claim-to-hand-off seconds (decides prefetch)."""
        self._batch_seconds: float | None = None
        """A moving average of how long serving one batch takes (the database's round trips)."""
        self._slowest: tuple[float, float] | None = None
        """The slowest batch of the last LEASE_SLACK_WINDOW seconds: (its seconds, when it ended);
        None until a batch was measured (one that neither connected nor met an outage)."""
        self._thread: threading.Thread | None = None
        self._closed = False
        self._retry: list[tuple[float, _Call]] = []
        """Hand-offs to try again (after an outage, or as -103 after a refusal), with when."""
        self._held_back: list[_Call | None] = []
        """Calls (and the stop mark) that came while a batch was served, taken out of the inbox
        to serve the beats among them at once (:meth:`_beats_meanwhile`): the next batch's."""
        self.stats = DispatcherStats()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the dispatcher thread (idempotent)."""
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._serve_forever, name="dispatcher", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Serve what is queued, close the queue, stop the thread; later calls fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._inbox.put(None)
        if thread is not None:
            thread.join(timeout)

    def port(self, *, prefetch: bool = True) -> SlotPort:
        """A TaskQueue for one slot (or the launcher's own calls); ``prefetch`` False: this
        slot never holds a task it does not run (check.sh, disk gates, semaphores)."""
        return SlotPort(self, prefetch=prefetch)

    @property
    def connects(self) -> int:
        """How often the dispatcher's connection was (re)opened (0 before the first call)."""
        return int(getattr(self._queue, "connects", 0))

    def call(self, kind: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``kind`` on the queue in the dispatcher thread and return its result (or raise)."""
        call = _Call(kind, args, kwargs)
        self._submit(call)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _submit(self, call: _Call) -> None:
        if self._closed:
            raise DatabaseError("the launcher's database session is closed (it is shutting down)")
        self.start()
        self._inbox.put(call)

    # -- the fast path: a slot's next task from its prefetch, without a round trip ----------------
    def take_prefetched(self, slot_id: int) -> Task | None:
        """The slot's next prefetched task, if any; a refill is queued without waiting."""
        with self._lock:
            state = self._slots.get(slot_id)
            if state is None or not state.buffer:
                return None
            [task] = self._take_buffered(state, 1)
        return task

    def take_prefetched_many(self, slot_id: int, limit: int) -> list[Task]:
        """Up to ``limit`` of the slot's prefetched tasks at once, for one batch (see
        :meth:`SlotPort.take_more`); the slot holds them until it hands them over. A slot that
        takes batches may prefetch up to BATCH_PREFETCH; it takes half of its buffer at most
        (rounded up), so that the next batch is there while the refill is claimed."""
        with self._lock:
            state = self._slots.get(slot_id)
            if state is None or not state.buffer or limit <= 0:
                return []
            if state.prefetch:
                state.prefetch = max(state.prefetch, BATCH_PREFETCH)
            tasks = self._take_buffered(state, min(limit, (len(state.buffer) + 1) // 2))
            state.taken.update(t.id for t in tasks)
        return tasks

    def _take_buffered(self, state: _SlotState, limit: int) -> list[Task]:
        """Up to ``limit`` of the slot's prefetched tasks, oldest first, as prefetch hits (their
        claim-to-hand-off time counts from now). The caller holds the lock."""
        now = self._clock()
        tasks = [state.buffer.popleft() for _ in range(min(limit, len(state.buffer)))]
        for task in tasks:
            state.claimed_at[task.id] = now
            state.running.add(task.id)
        self.stats.prefetch_hits += len(tasks)
        return tasks

    def register_slot(self, slot_id: int, *, prefetch: bool) -> None:
        """Start keeping state for a slot (its prefetch buffer)."""
        with self._lock:
            self._slots.setdefault(slot_id, _SlotState()).prefetch = self._prefetch if prefetch else 0

    def held(self, slot_id: int) -> tuple[int, ...]:
        """The tasks the slot holds besides the one it runs: prefetched ones, and those whose
        hand-off is still to be recorded (their leases are renewed with its heartbeat)."""
        with self._lock:
            state = self._slots.get(slot_id)
            if state is None:
                return ()
            return (*(t.id for t in state.buffer), *sorted(state.taken), *sorted(state.recording),
                    *sorted(state.releasing))

    def _beat_ids(self, slot_id: int, named: Sequence[int]) -> tuple[int, ...]:
        """What a beat of the slot renews: the tasks it names, what it holds, and what it got
        from the dispatcher and runs (the beat may have been built before it got them); each once."""
        with self._lock:
            state = self._slots.get(slot_id)
            running = sorted(state.running) if state else ()
        return tuple(dict.fromkeys((*named, *self.held(slot_id), *running)))

    def hand_off(self, task: Task, result: TaskResult, *, requeue_for: Callable[[int], bool],
                 **kwargs: Any) -> None:
        """Record ``task``'s result in the background (see :meth:`SlotPort.hand_off`)."""
        self._submit(self._hand_off_call(task, result, requeue_for, kwargs))

    def hand_off_many(self, items: Sequence[tuple[Task, TaskResult, Callable[[int], bool], dict[str, Any]]],
                      batch_seconds: float | None = None) -> None:
        """Record several results in the background, in one batch of the dispatcher (one
        statement): (task, result, requeue_for, the keywords of :meth:`hand_off`) each.
        ``batch_seconds``: how long the slot took for them all, which each task counts as
        its share of (for the prefetch depth, instead of its claim-to-hand-off time)."""
        if not items:
            return
        calls = [self._hand_off_call(task, result, requeue_for, kwargs) for task, result, requeue_for, kwargs in items]
        if batch_seconds is not None:
            # learnt now, each task its share: not when the dispatcher gets to the batch (its
            # wait in the inbox is no task's time, and would shrink the prefetch)
            share = batch_seconds / len(items)
            with self._lock:
                for task, _result, _requeue_for, kwargs in items:
                    state = self._slots.get(kwargs["slot_id"])
                    if state is not None:
                        state.claimed_at.pop(task.id, None)
                    old = self._task_seconds.get(task.module_id)
                    self._task_seconds[task.module_id] = share if old is None else 0.8 * old + 0.2 * share
        self._submit(calls[0] if len(calls) == 1 else _Call("group", (calls,)))

    def _hand_off_call(self, task: Task, result: TaskResult, requeue_for: Callable[[int], bool],
                       kwargs: dict[str, Any]) -> _Call:
        with self._lock:
            state = self._slots.setdefault(kwargs["slot_id"], _SlotState())
            state.recording.add(task.id)
            state.taken.discard(task.id)
            state.running.discard(task.id)
        return _Call("complete", (task, result), kwargs, wait=False, settle=self._settled, requeue_for=requeue_for)

    def _settled(self, call: _Call, result: Any, error: BaseException | None) -> None:
        """The outcome of an asynchronous hand-off, in the dispatcher thread: done, or retried
        after an outage (the result is kept, its lease renewed), or recorded as -103 when the
        database refused it for good — as the slot itself did before."""
        task, res = call.args[0], call.args[1]
        if isinstance(error, DatabaseError) and not self._closed:
            call.tries += 1
            delay = outage_backoff(call.tries)
            logger.warning("task %s: result kept, the database is unavailable; retrying in %.1fs: %s",
                           task.id, delay, error)
            self._retry.append((self._clock() + delay, call))
            return
        if error is not None and not isinstance(error, LeaseLostError | DatabaseError) and not call.fallback:
            logger.warning("task %s: the database refused its result (%s); recorded as %d",
                           task.id, error, TaskStatus.OUTPUT_INVALID)
            failed = unrecordable(res, f"{type(error).__name__}: {error}")
            call.args = (task, failed)
            call.kwargs = {**call.kwargs, "requeue": bool(call.requeue_for and call.requeue_for(failed.status))}
            call.fallback = True
            self._retry.append((self._clock(), call))
            return
        if isinstance(error, LeaseLostError):
            logger.warning("task %s: lease lost, result discarded (the task was recovered, or its result was "
                           "already recorded)", task.id)
        elif isinstance(error, DatabaseError):
            logger.error("task %s: result not recorded before shutdown: %s", task.id, error)
        elif error is not None:
            logger.error("task %s: not even its failure could be recorded (%s); left to lease expiry", task.id, error)
        else:
            logger.debug("task %s: status %s, %s messages", task.id, res.status, result)
        with self._lock:
            state = self._slots.get(call.kwargs["slot_id"])
            if state is not None:
                state.recording.discard(task.id)

    # -- the thread -----------------------------------------------------------------------------
    def _serve_forever(self) -> None:
        try:
            stop = False
            while True:
                held, self._held_back = self._held_back, []
                first = self._next(0.0 if held or stop else self._retry_timeout())
                stop = stop or first is None or None in held
                batch: list[_Call] = self._due_retries(final=stop)
                batch += [c for c in held if c is not None]  # taken out while the last batch was served
                if first is not None and first is not _TICK:
                    batch.append(first)
                while True:  # everything else already waiting joins this batch
                    try:
                        more = self._inbox.get_nowait()
                    except stdqueue.Empty:
                        break
                    if more is None:
                        stop = True
                    else:
                        batch.append(more)
                if batch:
                    self._serve(batch)
                if stop and not self._held_back:  # what came during the last batch is served first
                    return
        finally:
            if self._retry:  # a refused result turned -103 during the last batch: its one try
                self._serve(self._due_retries(final=True))
            self._release_all_prefetched()
            if self._queue is not None:
                try:
                    self._queue.close()
                except Exception as exc:  # closing a broken connection must not hide the real end
                    logger.warning("dispatcher: closing its database connection failed: %s", exc)
            while True:  # whoever still waits learns the session is gone
                try:
                    left = self._inbox.get_nowait()
                except stdqueue.Empty:
                    break
                if left is not None:
                    left.answer(error=DatabaseError("the launcher's database session is closed"))

    def _next(self, timeout: float | None) -> _Call | None:
        try:
            return self._inbox.get(timeout=timeout)
        except stdqueue.Empty:
            return _TICK

    def _retry_timeout(self) -> float | None:
        if not self._retry:
            return None
        return max(0.0, min(when for when, _ in self._retry) - self._clock())

    def _due_retries(self, *, final: bool) -> list[_Call]:
        """The hand-offs whose retry is due (all of them when shutting down: one last try)."""
        now = self._clock()
        due = [c for when, c in self._retry if final or when <= now]
        self._retry = [(when, c) for when, c in self._retry if not (final or when <= now)]
        return due

    def _q(self) -> BatchQueue:
        if self._queue is None:
            self._queue = self._factory()
        return self._queue

    def _serve(self, batch: list[_Call]) -> None:
        started, connects = self._clock(), self.connects
        try:
            self._serve_batch(batch)
        except Exception as exc:  # a bug: the batch fails, not the node (every slot waits on this thread)
            self._fail_unanswered(batch, exc)
        finally:  # how long a refill queued now waits at most: this batch, then its own
            now = self._clock()
            took = now - started
            self._batch_seconds = took if self._batch_seconds is None else 0.8 * self._batch_seconds + 0.2 * took
            # a slow database stretches leases, an unreachable one does not: connecting and
            # outages are waited out by every node alike (see HeartbeatLoop's quiet lease)
            outage = self.connects != connects or any(isinstance(c.error, DatabaseError) for c in _flatten(batch))
            slowest = self._slowest
            if not outage and (slowest is None or took >= slowest[0] or now - slowest[1] > LEASE_SLACK_WINDOW):
                self._slowest = (took, now)

    def _stretched(self, lease: float) -> float:
        """The lease to grant for ``lease`` asked: longer by LEASE_SLACK_BATCHES of the slowest
        recent batch. A slot beats every half heartbeat and its lease lasts 1.5 heartbeats, but
        on a saturated database one batch of claims and hand-offs took 10-25 s (50 emulated
        nodes; 30 s leases): a beat sent behind it arrived after the lease, and recovery gave a
        live node's tasks to another node, which ran them again. The lease grows with what this
        node's session measures, back to what was asked once its batches are fast again.

        Until a batch was measured the stretch is its cap: a fleet starting at once met the
        slowest batches of its life before any had ended (50 nodes, 15 s leases: ~3,900 tasks
        recovered from live nodes in the first 35 s)."""
        if self._slowest is None:
            return lease * (1 + LEASE_SLACK_CAP)
        slowest, when = self._slowest
        if self._clock() - when > LEASE_SLACK_WINDOW or slowest <= LEASE_SLACK_FROM * lease:
            return lease
        return lease + min(LEASE_SLACK_CAP * lease, LEASE_SLACK_BATCHES * slowest)

    def _fail_unanswered(self, batch: list[_Call], exc: Exception) -> None:
        """A batch broke on something that is not the database's answer (a bug of ours): answer
        each of its calls not answered yet with a SlotError naming it, so their slots end with
        the reason in ``status`` instead of waiting forever on a thread that died, and go on
        serving the other slots."""
        calls = _flatten(batch)
        left = [c for c in calls if not c.answered]
        logger.exception("dispatcher: a batch of %d calls failed (%s: %s); %d of them answered with the error",
                         len(calls), type(exc).__name__, exc, len(left))
        error = SlotError(f"the node's dispatcher failed ({type(exc).__name__}: {exc}); see the launcher's log")
        for call in left:
            call.answer(error=error)

    def _serve_batch(self, batch: list[_Call]) -> None:
        batch = _flatten(batch)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        beats = [c for c in batch if c.kind in _LEASE_KINDS]
        completes = [c for c in batch if c.kind == "complete"]
        claims = [c for c in batch if c.kind == "claim"]
        others = [c for c in batch if c.kind not in ("complete", "claim", *_LEASE_KINDS)]
        # leases first: one small statement, and on a saturated database the batch's hand-offs and
        # claims can take longer than a lease (measured: 10-25 s p99 at 50 emulated nodes), after
        # which recovery takes a live node's tasks and another node runs them again
        for call in beats:
            self._pass_through(call)
        if completes:  # first: they free capacity downstream and upstream's back-pressure
            self._complete_all(completes)
            claims.extend(self._eager_claims())
            self._beats_meanwhile()
        if claims:
            self._claim_all(claims)
        for call in others:
            self._beats_meanwhile()
            self._pass_through(call)

    def _beats_meanwhile(self) -> None:
        """Serve the beats that came while this batch was being served, now, between two of its
        statements; the other calls that came wait for the next batch. A beat waited for the
        whole batch: at 50 emulated nodes one batch held a 7.5 s claim and then the lease
        recovery, 14 s between two renewals of a node with 15 s leases, and 789 of its tasks
        were recovered and run again elsewhere."""
        while True:
            try:
                more = self._inbox.get_nowait()
            except stdqueue.Empty:
                return
            if more is not None and more.kind in _LEASE_KINDS:
                self._pass_through(more)
            else:
                self._held_back.append(more)

    def _pass_through(self, call: _Call) -> None:
        try:
            handler = getattr(self, f"_do_{call.kind}", None)
            if handler is not None:
                call.answer(handler(*call.args, **call.kwargs))
            else:
                call.answer(getattr(self._q(), call.kind)(*call.args, **call.kwargs))
            self.stats.other_statements += 1
        except Exception as exc:
            call.answer(error=exc)

    # -- claims ---------------------------------------------------------------------------------
    def _claim_all(self, calls: list[_Call]) -> None:
        groups: dict[_ClaimKey, list[_Call]] = {}
        for call in calls:
            kw = call.kwargs
            key: _ClaimKey = (call.args[0], call.args[1], kw["host"], kw.get("lease_seconds", 30.0),
                              kw.get("semaphore"))
            groups.setdefault(key, []).append(call)
        for key, group in groups.items():
            self._beats_meanwhile()
            self._claim_group(key, group)

    def _claim_group(self, key: _ClaimKey, group: list[_Call]) -> None:
        app_id, module_id, host, lease, semaphore = key
        wants: dict[int, SlotWant] = {}
        asking: dict[int, _Call] = {}
        generation = self._wakeups.generation(module_id) if self._wakeups is not None else None
        mark = self._dry.get(key)
        dry = mark is not None and self._clock() - mark[0] < DRY_SECONDS and mark[1] == generation
        # a slot's own claim is skipped only when a wake-up would have told us of new work
        own_dry = dry and generation is not None and semaphore is None
        with self._lock:
            for call in group:
                kw = call.kwargs
                slot_id, limit = kw["slot_id"], kw.get("limit", 1)
                state = self._slots.setdefault(slot_id, _SlotState())
                state.seq, state.key = kw["slot_seq"], key
                waiting = call.wait and not self._answer_from_buffer(call, state, limit)
                if not waiting and (state.closed or (dry and not kw.get("eager"))):
                    self.stats.claims_skipped += int(not state.closed and not call.answered)
                    if not call.answered:
                        call.answer([])
                    continue
                if waiting and own_dry and not self._donor_for(key, slot_id):
                    self.stats.claims_skipped += 1
                    state.idle = key
                    call.answer([])
                    continue
                depth = min(state.prefetch, self._depth(module_id, state.prefetch)) if semaphore is None else 0
                # top up only once half is used: one claim then serves several tasks
                refill = depth - len(state.buffer) if len(state.buffer) <= depth // 2 else 0
                missing = (limit if waiting else 0) + refill
                if kw.get("eager") and not state.buffer:
                    missing = max(missing, 1)
                # a slot's waiting claim and its refill in one batch: one want, the larger
                missing = max(missing, wants[slot_id].want if slot_id in wants else 0)
                if missing > 0:
                    wants[slot_id] = SlotWant(slot_id, kw["slot_seq"], missing)
                if waiting:
                    asking[slot_id] = call
                elif not call.answered:
                    call.answer([])
        if not wants:
            return
        try:
            got = self._q().claim_for_slots(app_id, module_id, host=host, slots=list(wants.values()),
                                            lease_seconds=self._stretched(lease), semaphore=semaphore)
        except Exception as exc:
            for call in asking.values():
                call.answer(error=exc)
            return
        self.stats.claim_statements += 1
        if not got:
            self.stats.empty_claims += 1
        if sum(len(t) for t in got.values()) < sum(w.want for w in wants.values()):
            self._dry[key] = (self._clock(), generation)
        else:
            self._dry.pop(key, None)
        starving = [wants[s] for s in asking if s in wants and not got.get(s)]
        if starving and self._share(key, {s.slot_id for s in starving}):
            try:  # what the other slots gave back, for those that would idle
                shared = self._q().claim_for_slots(app_id, module_id, host=host, slots=starving,
                                                   lease_seconds=self._stretched(lease), semaphore=semaphore)
                self.stats.claim_statements += 1
            except Exception as exc:  # as if nothing was shared: the released tasks are READY
                logger.warning("dispatcher: claiming the tasks other slots gave back failed: %s", exc)
                shared = {}
            for slot_id, tasks in shared.items():
                got.setdefault(slot_id, []).extend(tasks)
        self._mark_idle(key, got, asking)
        for slot_id in self._deal(got, asking):
            self._give_back(slot_id, [t.id for t in got[slot_id]])

    def _answer_from_buffer(self, call: _Call, state: _SlotState, limit: int) -> bool:
        """A slot's own claim finds the tasks claimed for it since it looked at its buffer (an
        eager claim, a refill, served while its claim was on its way): answered with them, as
        a prefetch hit. Else the claim could come back empty with its next task in the buffer,
        and the slot sleep its poll interval (or until the next wake-up) with it. The caller
        holds the lock; the call then only tops up the buffer, like the refill of a hit."""
        if not state.buffer or state.closed:
            return False
        state.idle = None
        call.answer(self._take_buffered(state, limit))
        return True

    def _donor_for(self, key: _ClaimKey, taker: int) -> bool:
        """Whether another slot of the same claim holds prefetched tasks it could share (the
        caller holds the lock)."""
        return any(slot_id != taker and state.key == key and not state.closed and len(state.buffer) >= 2
                   for slot_id, state in self._slots.items())

    def _share(self, key: _ClaimKey, takers: set[int]) -> int:
        """The queue ran dry while other slots of the same claim hold prefetched tasks: they
        give the newer half of their buffers back (READY again, the attempt not counted), so
        that a slot with nothing to do takes them instead of idling through its poll interval
        while one slot holds the module's last tasks (a batching slot may hold hundreds).
        Returns how many were given back."""
        given: list[tuple[int, list[int]]] = []
        with self._lock:
            for slot_id, state in self._slots.items():
                if slot_id in takers or state.key != key or state.closed or len(state.buffer) < 2:
                    continue
                ids = [state.buffer.pop().id for _ in range(len(state.buffer) // 2)]
                given.append((slot_id, ids))
        for slot_id, ids in given:
            self._give_back(slot_id, ids)
        self.stats.tasks_shared += sum(len(ids) for _, ids in given)
        return sum(len(ids) for _, ids in given)

    def _mark_idle(self, key: _ClaimKey, got: dict[int, list[Task]], asking: dict[int, _Call]) -> None:
        """Remember which waiting slots found nothing (idle until woken), and which have work.
        A refill that brings tasks to a slot whose own claim found nothing wakes it: it would
        otherwise sleep its poll interval with its next tasks in its buffer."""
        wake = False
        with self._lock:
            for slot_id in asking:
                state = self._slots.setdefault(slot_id, _SlotState())
                state.idle = None if got.get(slot_id) else key
            for slot_id, tasks in got.items():
                state = self._slots.setdefault(slot_id, _SlotState())
                wake = wake or (bool(tasks) and state.idle is not None and slot_id not in asking)
                state.idle = None
        if wake and self._wakeups is not None:
            self._wakeups.notify_local(key[1], 0)

    def _eager_claims(self) -> list[_Call]:
        """After this batch's hand-offs: wake the local slots of the modules they wrote to, and
        claim one task for each of those slots that is idle, with the batch's claims (the slot
        finds it in its prefetch when it wakes). Not for slots that never prefetch (a check.sh,
        a disk gate, a semaphore decides before each of their claims)."""
        woken, self._woken = self._woken, Counter()
        if not woken:
            return []
        for key in [k for k in self._dry if k[1] in woken]:
            del self._dry[key]
        calls = []
        with self._lock:
            for slot_id, state in self._slots.items():
                idle = state.idle
                if idle is None or idle[1] not in woken or state.closed or state.prefetch == 0 or idle[4] is not None:
                    continue
                state.idle = None  # one eager claim per wake-up: if it finds nothing, the slot's own claim will
                app_id, module_id, host, lease, _sem = idle
                calls.append(_Call("claim", (app_id, module_id), {
                    "host": host, "lease_seconds": lease, "semaphore": None, "slot_id": slot_id,
                    "slot_seq": state.seq, "eager": True}, wait=False))
        self.stats.eager_claims += len(calls)
        if self._wakeups is not None:
            for module_id, transactions in woken.items():
                self._wakeups.notify_local(module_id, transactions)
        return calls

    def _wrote(self, calls: Sequence[_Call], written: Sequence[int | None]) -> None:
        """The hand-offs of one transaction wrote messages: note the modules they went to."""
        ids: set[int] = set()
        for call, n in zip(calls, written, strict=True):
            if not n:
                continue
            sender: ModuleRef = call.kwargs["sender"]
            modules: dict[str, ModuleRef] = call.kwargs["modules"]
            names = {m.module or (sender.sink_modules[0] if sender.sink_modules else "")
                     for m in call.args[1].messages}
            ids.update(modules[n].id for n in names if n in modules)
        self._woken.update(ids)

    def _deal(self, got: dict[int, list[Task]], asking: dict[int, _Call]) -> list[int]:
        """Answer each asking slot with its first task(s), buffer the rest; returns the slots
        that ended while their refill was queued (their tasks must go back)."""
        now = self._clock()
        ended: list[int] = []
        with self._lock:
            for slot_id, tasks in got.items():
                self.stats.tasks_claimed += len(tasks)
                state = self._slots.setdefault(slot_id, _SlotState())
                waiting = asking.pop(slot_id, None)
                if state.closed:
                    ended.append(slot_id)
                    tasks = []
                limit = waiting.kwargs.get("limit", 1) if waiting is not None else 0
                mine, rest = tasks[:limit], tasks[limit:]
                for t in mine:
                    state.claimed_at[t.id] = now
                    state.running.add(t.id)
                state.buffer.extend(rest)
                if waiting is not None:
                    waiting.answer(mine)
        for waiting in asking.values():  # nothing for them
            waiting.answer([])
        return ended

    def _give_back(self, slot_id: int, ids: list[int]) -> None:
        try:
            self._release_now(slot_id, ids)
        except Exception as exc:  # the leases expire and recovery hands them out again
            logger.warning("dispatcher: could not give back tasks %s of ended slot %s: %s", ids, slot_id, exc)

    def _depth(self, module_id: int, cap: int = PREFETCH) -> int:
        """How many tasks a slot of the module may hold beyond the one it runs: none until
        its tasks' time is known, none for long tasks, else about PREFETCH_SECONDS of work —
        or more when the database is slow: a refill (sent once half the buffer is used) waits
        for the batch being served and then its own, so the buffer holds REFILL_BATCHES
        batches' time of work, else the slot would wait for its next task (at most PREFETCH)."""
        seconds = self._task_seconds.get(module_id)
        if seconds is None or seconds >= PREFETCH_TASK_SECONDS:
            return 0
        budget = max(PREFETCH_SECONDS, min(PREFETCH_MAX_SECONDS, REFILL_BATCHES * (self._batch_seconds or 0.0)))
        return max(1, min(cap, int(budget / max(seconds, 1e-5))))

    def _learn(self, task: Task, slot_id: int) -> None:
        """Fold one task's claim-to-hand-off time into its module's average."""
        with self._lock:
            state = self._slots.get(slot_id)
            started = state.claimed_at.pop(task.id, None) if state else None
        if started is None:
            return
        took = self._clock() - started
        old = self._task_seconds.get(task.module_id)
        self._task_seconds[task.module_id] = took if old is None else 0.8 * old + 0.2 * took

    # -- hand-offs ------------------------------------------------------------------------------
    def _complete_all(self, calls: list[_Call]) -> None:
        by_modules: dict[int, list[_Call]] = {}
        for call in calls:
            by_modules.setdefault(id(call.kwargs["modules"]), []).append(call)
        for group in by_modules.values():
            self._complete_group(group)

    def _complete_group(self, group: list[_Call]) -> None:
        for call in group:
            self._learn(call.args[0], call.kwargs["slot_id"])
            self._handed_over(call)
        if len(group) == 1 and group[0].busy_since is None:  # (a busy one again: the batch's path never waits)
            self._complete_one(group[0])
            return
        items = [Completion(task=c.args[0], result=c.args[1], host=c.kwargs["host"],
                            requeue=c.kwargs.get("requeue", False), slot_id=c.kwargs["slot_id"],
                            sender=c.kwargs["sender"]) for c in group]
        first = group[0].kwargs
        try:
            written = self._q().complete_many(items, slot_id=first["slot_id"], sender=first["sender"],
                                              modules=first["modules"])
        except DatabaseError as exc:  # an outage: every slot keeps its result and retries
            for call in group:
                call.answer(error=exc)
            return
        except Exception as exc:  # refused (a value PostgreSQL will not store): find the culprit
            logger.warning("dispatcher: a batch of %d hand-offs was refused (%s); recording them one by one",
                           len(group), exc)
            for call in group:
                self._complete_one(call)
            return
        self.stats.complete_statements += 1
        recorded = [n if n != HAND_OFF_BUSY else None for n in written]
        self._wrote(group, recorded)
        for call, n in zip(group, written, strict=True):
            if n == HAND_OFF_BUSY:
                self._busy(call)
            elif n is None:
                call.answer(error=LeaseLostError(call.args[0].id))
            else:
                self.stats.tasks_completed += 1
                call.answer(n)

    def _busy(self, call: _Call) -> None:
        """A hand-off whose task row another transaction held: nothing was recorded, and the
        task is still the slot's (its lease renewed with the slot's beat: it stays in
        ``recording``). Tried again shortly, in a later batch; given up as a lost lease after
        BUSY_GIVE_UP_SECONDS, or at shutdown."""
        now = self._clock()
        task = call.args[0]
        call.busy_since = now if call.busy_since is None else call.busy_since
        call.busy_tries += 1
        self.stats.hand_offs_busy += 1
        if self._closed or now - call.busy_since >= BUSY_GIVE_UP_SECONDS:
            logger.warning("task %s: its row was held by another transaction for %.1fs; result given up",
                           task.id, now - call.busy_since)
            call.answer(error=LeaseLostError(task.id))
            return
        delay = busy_delay(call.busy_tries - 1)
        logger.debug("task %s: row held by another transaction; hand-off tried again in %.2fs", task.id, delay)
        self._retry.append((now + delay, call))

    def _complete_one(self, call: _Call) -> None:
        try:
            written = self._q().complete(*call.args, **call.kwargs)
        except Exception as exc:
            call.answer(error=exc)
            return
        self.stats.complete_statements += 1
        self.stats.tasks_completed += 1
        self._wrote([call], [written])
        call.answer(written)

    # -- calls that must know the prefetch buffers ------------------------------------------------
    def _do_heartbeat(
        self, slot_id: int, *, status: str, lease_seconds: float, task_ids: Sequence[int] | None = None,
    ) -> list[int]:
        ids = None if task_ids is None else list(self._beat_ids(slot_id, task_ids))
        return self._q().heartbeat(slot_id, status=status, lease_seconds=self._stretched(lease_seconds), task_ids=ids)

    def _do_heartbeat_slots(self, beats: Sequence[Beat]) -> list[int]:
        full = [replace(b, lease_seconds=self._stretched(b.lease_seconds),
                        task_ids=None if b.task_ids is None else self._beat_ids(b.slot_id, b.task_ids))
                for b in beats]
        return self._q().heartbeat_slots(full)

    def _do_release(self, slot_id: int) -> int:
        self._forget(slot_id, close=True)
        return self._release_now(slot_id, None)  # every RUNNING task of the slot: prefetched ones too

    def _do_release_ids(self, slot_id: int, task_ids: Sequence[int], *, since: float | None = None,
                        tries: int = 0) -> int:
        return self._release_now(slot_id, task_ids, since=since, tries=tries)

    def _release_now(self, slot_id: int, task_ids: Sequence[int] | None, *, since: float | None = None,
                     tries: int = 0) -> int:
        """Release the slot's RUNNING tasks (``task_ids`` None: all). Those another transaction
        held (0030: perhaps a claim statement that only looked at the row) are tried again
        after BUSY_RETRY_SECONDS, doubling, their leases renewed meanwhile with the slot's
        beat; else they stayed RUNNING until their lease expired and were recovered as stalled
        (an attempt spent on no run). Returns how many were released now."""
        q = self._q()
        got = q.release(slot_id) if task_ids is None else q.release_ids(slot_id, task_ids)
        busy = got.busy if isinstance(got, Released) else ()
        now = self._clock()
        since = now if since is None else since
        again = bool(busy) and not self._closed and now - since < BUSY_GIVE_UP_SECONDS
        with self._lock:
            state = self._slots.setdefault(slot_id, _SlotState())
            state.releasing.difference_update(task_ids or ())
            if task_ids is None:
                state.running.clear()
            else:
                state.running.difference_update(task_ids)
            if again:
                state.releasing.update(busy)
        if again:
            delay = busy_delay(tries)
            self._retry.append((now + delay, _Call("release_ids", (slot_id, list(busy)),
                                                   {"since": since, "tries": tries + 1}, wait=False)))
        elif busy:
            logger.warning("dispatcher: tasks %s of slot %s stay RUNNING, their rows held by another transaction "
                           "for %.1fs; their leases will expire", list(busy), slot_id, now - since)
        return int(got)

    def _do_set_slot_status(
        self, slot_id: int, status: str, *, message: str | None = None, tasks_done: int = 0,
    ) -> None:
        if status in FINAL_SLOT_STATES:
            self._release_prefetched(slot_id, close=True)
        self._q().set_slot_status(slot_id, status, message=message, tasks_done=tasks_done)

    def _release_prefetched(self, slot_id: int, *, close: bool = False) -> int:
        ids = list(self._forget(slot_id, close=close))
        if not ids:
            return 0
        return self._release_now(slot_id, ids)

    def _forget(self, slot_id: int, *, close: bool = False) -> tuple[int, ...]:
        with self._lock:
            state = self._slots.get(slot_id)
            if state is None:
                return ()
            state.closed = state.closed or close
            ids = (*(t.id for t in state.buffer), *sorted(state.taken))
            state.buffer.clear()
            state.taken.clear()
            if close:  # the slot runs nothing more (what it ran it handed over or released)
                state.running.clear()
            return ids

    def _handed_over(self, call: _Call) -> None:
        """A slot's hand-off (waited for or not) reached the dispatcher: its task is no longer
        one the slot runs (it is ``recording`` until written, when asynchronous)."""
        with self._lock:
            state = self._slots.get(call.kwargs["slot_id"])
            if state is not None:
                state.running.discard(call.args[0].id)

    def _release_all_prefetched(self) -> None:
        """At the end: hand back what was prefetched and never run (best effort: else the
        leases expire and the tasks are recovered)."""
        if self._queue is None:
            return
        for slot_id in list(self._slots):
            try:
                n = self._release_prefetched(slot_id, close=True)
            except Exception as exc:
                logger.warning("dispatcher: could not release the prefetched tasks of slot %s: %s", slot_id, exc)
                continue
            if n:
                logger.info("dispatcher: released %d prefetched task(s) of slot %s", n, slot_id)

    def refill(self, slot_id: int, slot_seq: int, app_id: int, module_id: int, **kwargs: Any) -> None:
        """Queue a claim that only tops up the slot's prefetch (nobody waits for it)."""
        call = _Call("claim", (app_id, module_id), {**kwargs, "slot_id": slot_id, "slot_seq": slot_seq},
                     wait=False)
        with contextlib.suppress(ScaleboxError):  # shutting down: nothing to top up
            self._submit(call)


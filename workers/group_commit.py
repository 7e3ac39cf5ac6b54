"""Group commit: many worker threads' small write units share transactions.

A worker runs dozens of provider calls at once and each ends in a few small writes. Run
one by one, every unit pays for a connection checkout, BEGIN and COMMIT; here a few writer
threads take whatever units are waiting and run them in one transaction. Nothing waits to
fill a batch: at low load each unit commits alone, under load batches grow by themselves.
The calling thread blocks until its unit is committed, so a job's message is acknowledged
only after its writes are durable. A caller that gives up waiting (``timeout_s``) does not
withdraw its unit: it may still commit later, and the job's lease and the claim's conditions
make that harmless.

A unit is either a function of the session (:meth:`GroupCommitter.run`) or one item for a
*step* (:meth:`GroupCommitter.run_step`): a function that takes the session and every waiting
item of that step at once, so that a batch of jobs costs a few set-based statements instead
of a few statements per job.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from broker.db import transaction

log = logging.getLogger(__name__)
T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - an item of a step

#: Runs a batch of items in the caller's transaction; one result per item, in order.
Step = Callable[[Session, list[I]], list[T]]


@dataclass
class _Unit(Generic[T]):
    fn: Callable[[Session], T] | None = None
    step: Step[Any, T] | None = None
    item: Any = None
    future: Future[T] = field(default_factory=Future)
    # Committed in a later transaction of the same leader, once this unit's has committed.
    then: _Unit[Any] | None = None


class GroupCommitter:
    """Leader/follower group commit, on the callers' own threads.

    A caller that finds fewer than ``writers`` transactions running leads: it takes every
    waiting unit (its own among them), commits them together, and goes on with whatever
    arrived meanwhile before it returns. Otherwise it queues its unit and waits for a leader
    to commit it. At low load every caller commits its own unit with no thread handoff;
    under load the waiting units form the next batch.
    """

    def __init__(self, sessions: sessionmaker[Session], *, writers: int = 4,
                 max_batch: int = 64):
        if writers < 1:
            raise ValueError(f"writers must be at least 1, not {writers}")
        self._sessions = sessions
        self._writers = writers
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._waiting: deque[_Unit[Any]] = deque()
        self._leading = 0

    def run(self, fn: Callable[[Session], T], *, timeout_s: float = 120) -> T:
        """Run ``fn(session)`` inside a committed transaction and return its result."""
        return self._submit(_Unit(fn=fn), timeout_s)

    def run_step(self, step: Step[I, T], item: I, *, timeout_s: float = 120) -> T:
        """Run ``step`` for ``item``, batched with other waiting items of the same step, in
        a committed transaction; returns this item's result."""
        return self._submit(_Unit(step=step, item=item), timeout_s)

    def run_steps(self, first: tuple[Step[Any, Any], Any], then: tuple[Step[I, T], I], *,
                  timeout_s: float = 120) -> T:
        """Commit ``first``'s item, then ``then``'s in a later transaction, with no return
        to the caller in between; returns the second result. The second never starts
        unless the first committed; an error of either reaches the caller."""
        second: _Unit[T] = _Unit(step=then[0], item=then[1])
        return self._submit(_Unit(step=first[0], item=first[1], then=second), timeout_s,
                            wait_for=second)

    def close(self) -> None:
        """Nothing to stop: commits run on the callers' threads."""

    def _submit(self, unit: _Unit[Any], timeout_s: float,
                wait_for: _Unit[T] | None = None) -> T:
        with self._lock:
            self._waiting.append(unit)
            lead = self._leading < self._writers
            if lead:
                self._leading += 1
        if lead:
            self._lead()
        return (wait_for or unit).future.result(timeout=timeout_s)

    def _lead(self) -> None:
        batch: list[_Unit[Any]] = []
        follow: list[_Unit[Any]] = []  # second units of chains whose first unit committed
        try:
            while True:
                with self._lock:
                    if not self._waiting and not follow:
                        self._leading -= 1
                        return
                    count = min(len(self._waiting), max(self._max_batch - len(follow), 0))
                    batch = follow + [self._waiting.popleft() for _ in range(count)]
                follow = []
                follow = self._commit(batch)
        except BaseException as exc:
            # Not an error of a unit (those are caught per unit) but the leading thread
            # itself being stopped: answer the units in hand and give the slot back.
            for unit in batch + follow:
                for pending in (unit, unit.then):
                    if pending is not None and not pending.future.done():
                        pending.future.set_exception(exc)
            with self._lock:
                self._leading -= 1
            raise

    def _commit(self, batch: list[_Unit[Any]]) -> list[_Unit[Any]]:
        """Commit the batch; returns the chained units now due."""
        try:
            with transaction(self._sessions) as session:
                results = _execute(session, batch)
        except Exception as exc:
            # Whatever broke the shared transaction, re-run each unit alone so that one bad
            # unit fails alone and the others still commit.
            if len(batch) == 1:
                unit = batch[0]
                unit.future.set_exception(exc)
                if unit.then is not None:
                    unit.then.future.set_exception(exc)
                return []
            log.warning("group commit of %d units failed (%s); retrying one by one",
                        len(batch), type(exc).__name__)
            return [due for unit in batch for due in self._commit([unit])]
        for unit, result in zip(batch, results, strict=True):
            unit.future.set_result(result)
        return [unit.then for unit in batch if unit.then is not None]


def _execute(session: Session, batch: list[_Unit[Any]]) -> list[Any]:
    """Each plain unit on its own, each step once for all of its items; results in order."""
    results: list[Any] = [None] * len(batch)
    by_step: dict[Step[Any, Any], list[int]] = {}
    for index, unit in enumerate(batch):
        if unit.step is None:
            assert unit.fn is not None
            results[index] = unit.fn(session)
        else:
            by_step.setdefault(unit.step, []).append(index)
    for step, indexes in by_step.items():
        outcomes = step(session, [batch[i].item for i in indexes])
        for index, outcome in zip(indexes, outcomes, strict=True):
            results[index] = outcome
    return results

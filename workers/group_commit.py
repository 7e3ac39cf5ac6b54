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

    def close(self) -> None:
        """Nothing to stop: commits run on the callers' threads."""

    def _submit(self, unit: _Unit[T], timeout_s: float) -> T:
        with self._lock:
            self._waiting.append(unit)
            lead = self._leading < self._writers
            if lead:
                self._leading += 1
        if lead:
            self._lead()
        return unit.future.result(timeout=timeout_s)

    def _lead(self) -> None:
        batch: list[_Unit[Any]] = []
        try:
            while True:
                with self._lock:
                    if not self._waiting:
                        self._leading -= 1
                        return
                    count = min(len(self._waiting), self._max_batch)
                    batch = [self._waiting.popleft() for _ in range(count)]
                self._commit(batch)
        except BaseException as exc:
            # Not an error of a unit (those are caught per unit) but the leading thread
            # itself being stopped: answer the batch in hand and give the slot back.
            for unit in batch:
                if not unit.future.done():
                    unit.future.set_exception(exc)
            with self._lock:
                self._leading -= 1
            raise

    def _commit(self, batch: list[_Unit[Any]]) -> None:
        try:
            with transaction(self._sessions) as session:
                results = _execute(session, batch)
        except Exception as exc:
            # Whatever broke the shared transaction, re-run each unit alone so that one bad
            # unit fails alone and the others still commit.
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.warning("group commit of %d units failed (%s); retrying one by one",
                        len(batch), type(exc).__name__)
            for unit in batch:
                self._commit([unit])
            return
        for unit, result in zip(batch, results, strict=True):
            unit.future.set_result(result)


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

"""Group commit: many worker threads' small write units share transactions.

A worker runs dozens of provider calls at once and each ends in a few small writes. Run
one by one, every unit pays for a connection checkout, BEGIN and COMMIT and the thread
handoffs of each round trip; here a writer thread takes whatever units are waiting and runs
them in one transaction. Nothing waits to fill a batch: at low load each unit commits alone,
under load batches grow by themselves.
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
import queue
import threading
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
    # Committed in a later transaction of the same writer, once this unit's has committed.
    then: _Unit[Any] | None = None


class GroupCommitter:
    """Writer threads that commit whatever units are waiting, together.

    One writer (the default) commits the largest batches; each writer is a transaction at a
    time. A chain's second unit joins the writer's next batch as soon as its first unit has
    committed, without a trip back to the calling thread.
    """

    def __init__(self, sessions: sessionmaker[Session], *, writers: int = 1,
                 max_batch: int = 64):
        if writers < 1:
            raise ValueError(f"writers must be at least 1, not {writers}")
        self._sessions = sessions
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Unit[Any] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"group-commit-{n}", daemon=True)
            for n in range(writers)
        ]
        for thread in self._threads:
            thread.start()

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
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    def _submit(self, unit: _Unit[Any], timeout_s: float,
                wait_for: _Unit[T] | None = None) -> T:
        self._queue.put(unit)
        return (wait_for or unit).future.result(timeout=timeout_s)

    def _loop(self) -> None:
        follow: list[_Unit[Any]] = []  # second units of chains whose first unit committed
        while True:
            batch = follow
            if not batch:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
            while len(batch) < self._max_batch:
                try:
                    unit = self._queue.get_nowait()
                except queue.Empty:
                    break
                if unit is None:
                    self._queue.put(None)  # leave the stop signal for this thread's next turn
                    break
                batch.append(unit)
            follow = self._commit(batch)

    def _commit(self, batch: list[_Unit[Any]]) -> list[_Unit[Any]]:
        """Commit the batch; returns the chained units now due."""
        try:
            with transaction(self._sessions) as session:
                results = _execute(session, batch)
        except BaseException as exc:
            # Whatever broke the shared transaction, re-run each unit alone so that one bad
            # unit fails alone and the others still commit. The writer itself goes on.
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

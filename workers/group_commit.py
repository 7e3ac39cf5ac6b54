"""Group commit: many worker threads' small write units share transactions.

A worker runs dozens of provider calls at once and each ends in a few small writes. Run
one by one, every unit pays for a connection checkout, BEGIN and COMMIT; here a few writer
threads take whatever units are waiting and run them in one transaction. Nothing waits to
fill a batch: at low load each unit commits alone, under load batches grow by themselves.
The calling thread blocks until its unit is committed, so a job's message is acknowledged
only after its writes are durable.
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


@dataclass
class _Unit(Generic[T]):
    fn: Callable[[Session], T]
    future: Future[T] = field(default_factory=Future)


class GroupCommitter:
    def __init__(self, sessions: sessionmaker[Session], *, writers: int = 4,
                 max_batch: int = 64):
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
        unit: _Unit[T] = _Unit(fn)
        self._queue.put(unit)
        return unit.future.result(timeout=timeout_s)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch: list[_Unit[Any]] = [first]
            while len(batch) < self._max_batch:
                try:
                    unit = self._queue.get_nowait()
                except queue.Empty:
                    break
                if unit is None:
                    self._queue.put(None)  # leave the stop signal for this thread's next turn
                    break
                batch.append(unit)
            self._commit(batch)

    def _commit(self, batch: list[_Unit[Any]]) -> None:
        try:
            with transaction(self._sessions) as session:
                results = [unit.fn(session) for unit in batch]
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

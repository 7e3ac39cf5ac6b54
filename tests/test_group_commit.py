"""The group committer against real databases (a SQLite file and PostgreSQL), with real threads.

Callers race for the committer at a barrier and write rows of a small table of this module's
own; the tests check what each caller got back and what the database holds afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from broker.db import make_engine, make_sessionmaker, transaction
from workers.group_commit import GroupCommitter

ITEMS = Table(
    "group_commit_items", MetaData(),
    Column("key", Integer, primary_key=True, autoincrement=False),
    Column("value", Integer, nullable=False),
)
CALLERS = 40


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('group_commit') / 'items.sqlite'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")()
    engine = make_engine(url, pool_size=4, max_overflow=8)
    ITEMS.metadata.create_all(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def sessions(database: sessionmaker[Session]) -> sessionmaker[Session]:
    with transaction(database) as session:
        session.execute(delete(ITEMS))
    return database


def stored(sessions: sessionmaker[Session]) -> dict[int, int]:
    with transaction(sessions) as session:
        return {row.key: row.value for row in session.execute(select(ITEMS))}


class InsertStep:
    """A step that stores each item as a row and answers ``item * 2``.

    It remembers every batch it was given and the most steps it saw running at once, and
    raises ValueError for any batch holding a ``poison`` item.
    """

    def __init__(self, *, poison: frozenset[int] = frozenset(), hold_s: float = 0.0):
        self.poison = poison
        self.hold_s = hold_s
        self.batches: list[list[int]] = []
        self.peak_running = 0
        self._running = 0
        self._lock = threading.Lock()

    def __call__(self, session: Session, items: list[int]) -> list[int]:
        with self._lock:
            self.batches.append(list(items))
            self._running += 1
            self.peak_running = max(self.peak_running, self._running)
        try:
            time.sleep(self.hold_s)
            poisoned = self.poison.intersection(items)
            if poisoned:
                raise ValueError(f"poisoned items {sorted(poisoned)}")
            session.execute(insert(ITEMS), [{"key": i, "value": i * 2} for i in items])
            return [i * 2 for i in items]
        finally:
            with self._lock:
                self._running -= 1


def call_together(committer: GroupCommitter, step: InsertStep, items: list[int], *,
                  once_started: Callable[[], None] = lambda: None) -> dict[int, Any]:
    """Call ``run_step`` for each item from a thread of its own, all released at once.

    Returns each item's result, or the exception its caller got. A short timeout turns a
    caller left waiting into a TimeoutError instead of a hung test.
    """
    barrier = threading.Barrier(len(items) + 1)
    outcomes: dict[int, Any] = {}

    def call(item: int) -> None:
        barrier.wait()
        try:
            outcomes[item] = committer.run_step(step, item, timeout_s=15)
        except Exception as exc:
            outcomes[item] = exc

    threads = [threading.Thread(target=call, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    barrier.wait()
    once_started()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


@contextmanager
def only_writer_busy(committer: GroupCommitter) -> Iterator[Callable[[], None]]:
    """Keep a one-writer committer inside a transaction until the yielded release is called,
    so that every unit submitted meanwhile queues up for the same next batch."""
    inside, release = threading.Event(), threading.Event()

    def hold(session: Session) -> None:
        inside.set()
        release.wait(timeout=15)

    holder = threading.Thread(target=committer.run, args=(hold,))
    holder.start()
    assert inside.wait(timeout=15)

    def release_after_queueing() -> None:
        time.sleep(0.3)  # the released callers need only microseconds to queue their units
        release.set()

    yield release_after_queueing
    release.set()
    holder.join(timeout=30)
    assert not holder.is_alive()


def test_run_commits_the_writes_and_returns_the_result(sessions: sessionmaker[Session]) -> None:
    committer = GroupCommitter(sessions, writers=1)

    def write(session: Session) -> int:
        session.execute(insert(ITEMS), {"key": 1, "value": 10})
        return session.scalar(select(func.count()).select_from(ITEMS)) or 0

    assert committer.run(write) == 1
    assert stored(sessions) == {1: 10}


def test_run_raises_the_callers_error_and_rolls_back_its_writes(
        sessions: sessionmaker[Session]) -> None:
    committer = GroupCommitter(sessions, writers=1)

    def write_then_fail(session: Session) -> None:
        session.execute(insert(ITEMS), {"key": 1, "value": 10})
        raise ValueError("the unit gives up")

    with pytest.raises(ValueError, match="the unit gives up"):
        committer.run(write_then_fail)
    assert stored(sessions) == {}
    # The failed unit gave its writer back: the only writer still commits.
    assert committer.run(lambda session: "still committing", timeout_s=5) == "still committing"


def test_concurrent_items_share_step_calls_and_each_caller_gets_its_own_result(
        sessions: sessionmaker[Session]) -> None:
    step = InsertStep(hold_s=0.02)
    items = list(range(CALLERS))

    outcomes = call_together(GroupCommitter(sessions, writers=4), step, items)

    assert outcomes == {item: item * 2 for item in items}
    assert len(step.batches) < len(items)
    assert sorted(item for batch in step.batches for item in batch) == items
    assert stored(sessions) == {item: item * 2 for item in items}


@pytest.mark.parametrize("poison", ["duplicate key", "step raises"])
def test_a_poisoned_item_fails_alone_and_the_rest_of_its_batch_commits(
        sessions: sessionmaker[Session], poison: str) -> None:
    bad = 7
    if poison == "duplicate key":
        with transaction(sessions) as session:
            session.execute(insert(ITEMS), {"key": bad, "value": -1})
        step, expected_error = InsertStep(), IntegrityError
    else:
        step, expected_error = InsertStep(poison=frozenset({bad})), ValueError
    committer = GroupCommitter(sessions, writers=1)
    items = list(range(CALLERS))

    with only_writer_busy(committer) as release:
        outcomes = call_together(committer, step, items, once_started=release)

    assert sorted(step.batches[0]) == items, "every item should wait for the same first batch"
    assert isinstance(outcomes.pop(bad), expected_error)
    assert outcomes == {item: item * 2 for item in items if item != bad}
    expected_rows = {item: item * 2 for item in items if item != bad}
    if poison == "duplicate key":
        expected_rows[bad] = -1
    assert stored(sessions) == expected_rows


@pytest.mark.parametrize("writers", [1, 3], ids=["one writer", "three writers"])
def test_no_more_transactions_run_at_once_than_writers_and_no_caller_is_left_waiting(
        sessions: sessionmaker[Session], writers: int) -> None:
    step = InsertStep(hold_s=0.05)
    items = list(range(CALLERS))

    outcomes = call_together(GroupCommitter(sessions, writers=writers), step, items)

    assert 1 <= step.peak_running <= writers
    assert outcomes == {item: item * 2 for item in items}
    assert stored(sessions) == {item: item * 2 for item in items}


def test_a_unit_raising_a_base_exception_fails_alone_and_the_writer_goes_on(
        sessions: sessionmaker[Session]) -> None:
    class Stop(BaseException):
        """Not an Exception, as KeyboardInterrupt and SystemExit are not."""

    def stop(session: Session) -> None:
        raise Stop

    committer = GroupCommitter(sessions, writers=1)
    with pytest.raises(Stop):
        committer.run(stop)
    assert committer.run(lambda session: "still committing", timeout_s=5) == "still committing"


def test_a_committer_without_writers_is_refused(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(ValueError, match="writers must be at least 1"):
        GroupCommitter(sessions, writers=0)


def test_a_chain_commits_its_second_step_only_after_its_first(
        sessions: sessionmaker[Session]) -> None:
    committer = GroupCommitter(sessions, writers=1)
    first = InsertStep()
    seen_by_second: list[dict[int, int]] = []

    def second(session: Session, items: list[int]) -> list[int]:
        # Another connection sees the first step's row: it is committed, not merely written.
        seen_by_second.append(stored(sessions))
        return [item + 1 for item in items]

    assert committer.run_steps((first, 7), (second, 100)) == 101
    assert seen_by_second == [{7: 14}]


def test_a_chain_whose_first_step_fails_never_runs_its_second(
        sessions: sessionmaker[Session]) -> None:
    committer = GroupCommitter(sessions, writers=1)
    second_ran: list[int] = []

    def second(session: Session, items: list[int]) -> list[int]:
        second_ran.extend(items)
        return items

    with pytest.raises(ValueError, match="poisoned"):
        committer.run_steps((InsertStep(poison=frozenset({3})), 3), (second, 1))
    assert second_ran == [] and stored(sessions) == {}
    assert committer.run_steps((InsertStep(), 4), (second, 2)) == 2  # the writer is free


def test_concurrent_chains_all_finish_and_share_transactions(
        sessions: sessionmaker[Session]) -> None:
    committer = GroupCommitter(sessions, writers=1)
    first = InsertStep()
    second_batches: list[list[int]] = []

    def second(session: Session, items: list[int]) -> list[int]:
        second_batches.append(list(items))
        return [-item for item in items]

    outcomes: dict[int, Any] = {}
    barrier = threading.Barrier(CALLERS)

    def call(item: int) -> None:
        barrier.wait()
        outcomes[item] = committer.run_steps((first, item), (second, item), timeout_s=15)

    threads = [threading.Thread(target=call, args=(item,)) for item in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert outcomes == {item: -item for item in range(CALLERS)}
    assert stored(sessions) == {item: item * 2 for item in range(CALLERS)}
    assert len(second_batches) < CALLERS  # second steps were batched too

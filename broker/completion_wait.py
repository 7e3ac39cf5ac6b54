"""Waiting for a job to finish without polling: how the OpenAI-compatible API answers in line.

Workers announce each finished job (:class:`CompletionNotifier`); the API process runs one
background listener (:class:`CompletionWaiter`) that wakes the requests waiting on that job id,
which then read the job from SQL, the record. On Redis the announcement is a pub/sub message on
one channel; on the embedded default (no Redis) the listener instead asks SQL every few
milliseconds, with one query for all waiting jobs, and only while someone waits. A waiter also
re-reads its job now and then, so a lost announcement delays an answer but never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, sessionmaker

from broker.models import Job
from broker.settings import Settings
from broker.sqlutil import checked_on_row
from broker.views import TERMINAL

log = logging.getLogger(__name__)

#: Pub/sub channel (after the deployment's Redis key prefix) that carries finished job ids.
JOB_DONE_CHANNEL = "llm.job_done"
#: How often the embedded fallback asks SQL which of the waited-on jobs are done.
SQL_POLL_INTERVAL_S = 0.005
#: How often a waiter re-reads its job even without an announcement.
RECHECK_INTERVAL_S = 2.0
RECONNECT_DELAY_S = 0.5
#: Finished job ids remembered by the listener, so a waiter that registers after the
#: announcement still wakes at once without asking SQL first.
RECENT_DONE_MAX = 20_000


def done_channel(settings: Settings) -> str | None:
    """The Redis channel for finished jobs, or None when the broker is not Redis."""
    if not settings.resolved_broker_url.startswith(("redis://", "rediss://")):
        return None
    return settings.redis_key_prefix + JOB_DONE_CHANNEL


class CompletionNotifier:
    """Worker side: announce that a job reached a final state (best effort)."""

    def __init__(self, settings: Settings):
        self._channel = done_channel(settings)
        self._redis = (
            redis.Redis.from_url(settings.resolved_broker_url) if self._channel else None
        )

    def __call__(self, job_id: str) -> None:
        if self._redis is None or self._channel is None:
            return
        try:
            self._redis.publish(self._channel, job_id)
        except redis.RedisError as exc:
            # Waiters re-read their job on their own; the announcement only makes it quick.
            log.warning("job %s finish not announced: %s", job_id, type(exc).__name__)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


@dataclass(frozen=True)
class JobOutcome:
    """What a waiting request needs of its job: not the stored request, which may be large."""

    id: str
    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None


class WaitTimedOut(Exception):
    """The job did not finish within the wait; it goes on and can be polled."""


class CompletionWaiter:
    """API side: one listener per process resolving the futures of waiting requests."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]):
        self._settings = settings
        self._sessions = sessions
        self._channel = done_channel(settings)
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}
        self._recent_done: OrderedDict[str, None] = OrderedDict()
        self._someone_waits = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        listen = self._listen_redis if self._channel else self._poll_sql
        self._task = asyncio.create_task(listen(), name="completion-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self, job_id: str, timeout_s: float) -> JobOutcome:
        """The job once it is final; raises :class:`WaitTimedOut` after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # Without announcements (SQL fallback) the first look is at SQL; with them, an
        # announcement seen before this registration is in the recent set.
        check_sql = self._channel is None
        while True:
            future = self._register(job_id)
            try:
                if check_sql or job_id in self._recent_done:
                    job = await asyncio.to_thread(self._load, job_id)
                    if job is not None and job.status in TERMINAL:
                        return job
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise WaitTimedOut(job_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(future, min(remaining, RECHECK_INTERVAL_S))
                # Woken or not, read the record: a wake-up may be spurious, an announcement lost.
                check_sql = True
            finally:
                self._unregister(job_id, future)

    def _register(self, job_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, set()).add(future)
        self._someone_waits.set()
        return future

    def _unregister(self, job_id: str, future: asyncio.Future[None]) -> None:
        futures = self._waiting.get(job_id)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._waiting[job_id]
        if not self._waiting:
            self._someone_waits.clear()

    def _wake(self, job_id: str) -> None:
        for future in self._waiting.get(job_id, ()):
            if not future.done():
                future.set_result(None)

    def _wake_all(self) -> None:
        for job_id in list(self._waiting):
            self._wake(job_id)

    def _load(self, job_id: str) -> JobOutcome | None:
        with self._sessions() as session:
            row = session.connection().execute(_READ_OUTCOME, {"b_id": job_id}).one_or_none()
        return None if row is None else JobOutcome(job_id, row.status, row.result, row.error)

    async def _listen_redis(self) -> None:
        assert self._channel is not None
        while True:
            client = aioredis.Redis.from_url(self._settings.resolved_broker_url)
            try:
                await self._consume(client, self._channel)
            except (redis.RedisError, OSError) as exc:
                log.warning("completion listener lost Redis (%s); reconnecting",
                            type(exc).__name__)
                self._wake_all()  # announcements may have been missed: everyone re-reads
                await asyncio.sleep(RECONNECT_DELAY_S)
            finally:
                await client.aclose()

    async def _consume(self, client: aioredis.Redis, channel: str) -> None:
        async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(channel)
            self._wake_all()
            async for message in pubsub.listen():
                data = message.get("data")
                if isinstance(data, bytes):
                    self._announced(data.decode())

    def _announced(self, job_id: str) -> None:
        self._recent_done[job_id] = None
        if len(self._recent_done) > RECENT_DONE_MAX:
            self._recent_done.popitem(last=False)
        self._wake(job_id)

    async def _poll_sql(self) -> None:
        while True:
            await self._someone_waits.wait()
            ids = list(self._waiting)
            try:
                done = await asyncio.to_thread(self._finished_among, ids)
            except Exception as exc:  # the database may blip; waiters re-read on their own
                log.warning("completion poll failed: %s", type(exc).__name__)
                done = []
            for job_id in done:
                self._wake(job_id)
            await asyncio.sleep(SQL_POLL_INTERVAL_S)

    def _finished_among(self, ids: list[str]) -> list[str]:
        if not ids:
            return []
        with self._sessions() as session:
            rows = session.scalars(
                select(Job.id).where(Job.id.in_(ids), checked_on_row(Job.status.in_(TERMINAL)))
            ).all()
        return list(rows)


Notify = Callable[[str], None]
_READ_OUTCOME = select(Job.status, Job.result, Job.error).where(Job.id == bindparam("b_id"))

"""Publishing job ids onto their capability queues, one at a time or thousands at once."""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

from broker.capabilities import queue_name
from tasks.app import task_name

#: Redis commands per pipeline round trip when publishing a batch.
PUBLISH_CHUNK = 2000


def publish_jobs(app: Celery, jobs: Iterable[tuple[str, str]]) -> int:
    """Publish ``(job_id, capability)`` pairs; on Redis they leave in pipelined chunks.

    kombu's producer batch turns thousands of publishes into a handful of round trips;
    transports without batch support (the embedded SQL broker) publish one by one.
    """
    count = 0
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_CHUNK):
        for job_id, capability in jobs:
            queue = queue_name(capability)
            app.send_task(
                task_name(capability), args=(job_id,), queue=queue, routing_key=queue,
                exchange="llm", producer=producer,
            )
            count += 1
    return count

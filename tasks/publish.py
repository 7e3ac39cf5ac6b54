"""Publishing job ids onto their capability queues, one at a time or thousands at once.

A batch of 10,000 jobs must leave in a handful of round trips, and Celery's ``send_task``
spends about a millisecond of CPU per message building generic task options we never use.
So the messages are built here in Celery's task protocol (version 2, the one workers
consume) with only what a job task needs — the task name and the job id — and handed to
kombu's producer inside a publish batch: on Redis that is one pipelined round trip per
``PUBLISH_CHUNK`` messages; transports without batch support publish one by one.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterable
from typing import Any

import orjson
from celery import Celery

from broker.capabilities import queue_name
from tasks.app import task_name

#: Messages per pipelined round trip when publishing a batch.
PUBLISH_CHUNK = 2000
_ORIGIN = f"molar-llm-api@{socket.gethostname()}"
# Protocol 2 body: [args, kwargs, embed]; only args vary.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_message(job_id: str, capability: str) -> tuple[bytes, dict[str, Any], str]:
    """Body, headers and task id of the message that runs ``job_id``."""
    task_id = str(uuid.uuid4())
    headers = {
        "lang": "py",
        "task": task_name(capability),
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr((job_id,)),
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": True,
    }
    return orjson.dumps([[job_id], {}, _EMBED]), headers, task_id


def publish_jobs(app: Celery, jobs: Iterable[tuple[str, str]]) -> int:
    """Publish ``(job_id, capability)`` pairs; returns how many were published."""
    count = 0
    queues = app.amqp.queues
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_CHUNK):
        declared: set[str] = set()
        for job_id, capability in jobs:
            name = queue_name(capability)
            body, headers, task_id = task_message(job_id, capability)
            producer.publish(
                body, exchange="", routing_key=name, headers=headers,
                content_type="application/json", content_encoding="utf-8",
                correlation_id=task_id, delivery_mode=2, retry=True,
                declare=[] if name in declared else [queues[name]],
            )
            declared.add(name)
            count += 1
    return count

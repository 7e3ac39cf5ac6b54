"""The Celery application and its queue topology.

One queue per capability (``llm.<capability>``), messages that carry only a job id, late
acknowledgement, prefetch of one per slot, and no result backend: SQL is the record.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from broker.capabilities import CAPABILITIES, queue_name
from broker.settings import Settings, get_settings

EXCHANGE = Exchange("llm", type="direct")  # type: ignore[no-untyped-call]


def task_name(capability: str) -> str:
    """Task names carry the capability so Flower shows what each task is for."""
    return f"llm.run.{capability}"


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    url = settings.resolved_broker_url
    if url.startswith("sqla+"):
        # kombu passes these straight to create_engine; keep them engine-safe.
        return {}
    options: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout_s,
        # Scan for messages of dead workers often enough to matter, rarely enough to be cheap.
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 2,
    }
    if settings.redis_key_prefix:
        options["global_keyprefix"] = settings.redis_key_prefix
    return options


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("molar_llm", broker=settings.resolved_broker_url, set_as_current=False)
    app.conf.update(
        task_queues=[
            Queue(queue_name(cap), EXCHANGE, routing_key=queue_name(cap))  # type: ignore[no-untyped-call]
            for cap in CAPABILITIES
        ],
        task_create_missing_queues=False,
        task_default_exchange=EXCHANGE.name,
        task_default_exchange_type="direct",
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(settings.task_time_limit_s - 10, 1),
        worker_send_task_events=True,
        # Task events go to Redis in batches (tasks/consumer.py), not one round trip each.
        worker_consumer="tasks.consumer:EventBatchingConsumer",
        task_send_sent_event=False,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_pool_limit=16,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Remote control feeds Flower's inspect views (which queues a worker serves). With it
        # on, Celery 5.7 + kombu 5.7 on Redis end the worker ("Unrecoverable error:
        # AttributeError ... 'hostname'") when the broker drops while jobs are in flight:
        # closing the pidbox queue fails on a transport already torn down. Deployments that
        # prefer riding out broker restarts to Flower's inspect views turn it off; it can stay
        # on by default once a kombu release fixes the reconnect.
        worker_enable_remote_control=settings.worker_remote_control,
    )
    return app


app = create_celery_app(get_settings())

"""``molar-llm flower``: Flower on the configured broker, behind basic auth, read-only.

Flower lists only the queues some worker consumes and reads lengths from Redis or RabbitMQ
alone. Here its broker tab and ``/api/queues/length`` list every ``llm.*`` queue, whether or
not a worker serves it yet, and read lengths through kombu, so the embedded SQL broker
shows them too. Task names (``llm.run.<capability>``) and worker names
(``llm-<capabilities>@host``) carry the capability.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from broker.capabilities import CAPABILITIES, queue_name
from tasks.depth import queue_lengths

log = logging.getLogger(__name__)
ALL_HOSTS = r".*$"


class FlowerConfigError(Exception):
    """Flower cannot start as asked; the message says what to set."""


@dataclass(frozen=True)
class FlowerOptions:
    address: str = "127.0.0.1"
    port: int = 5555
    basic_auth: tuple[str, ...] = ()
    no_auth: bool = False
    allow_control: bool = False
    url_prefix: str = ""
    inspect_timeout_ms: float = 3000.0


def parse_basic_auth(value: str) -> tuple[str, ...]:
    """``user:password[,user2:password2]`` into Flower's credential list, checked."""
    pairs = tuple(part.strip() for part in value.split(",") if part.strip())
    for pair in pairs:
        user, sep, password = pair.partition(":")
        if not sep or not user or len(password) < 8:
            raise FlowerConfigError(
                "MOLAR_LLM_FLOWER_BASIC_AUTH must be 'user:password' pairs separated by commas, "
                "each password at least 8 characters"
            )
    return pairs


def check_auth(options: FlowerOptions) -> None:
    if not options.basic_auth and not options.no_auth:
        raise FlowerConfigError(
            "Flower needs credentials: set MOLAR_LLM_FLOWER_BASIC_AUTH=user:password, or pass "
            "--no-auth for a local, loopback-only session"
        )
    if options.no_auth and options.address not in ("127.0.0.1", "localhost", "::1"):
        raise FlowerConfigError(
            f"--no-auth is for local use only; it refuses --address {options.address}"
        )


class KombuQueues:
    """Flower's broker interface (``async queues(names)``) answered through kombu."""

    def __init__(self, app: Celery):
        self._app = app

    async def queues(self, names: Iterable[str]) -> list[dict[str, Any]]:
        lengths = await asyncio.to_thread(queue_lengths, self._app, list(names))
        return [{"name": name, "messages": count} for name, count in lengths.items()]


def all_queue_names(active: Iterable[str]) -> list[str]:
    """Every capability queue, plus whatever else the workers consume."""
    return sorted({queue_name(cap) for cap in CAPABILITIES} | set(active))


def _handlers(url_prefix: str) -> list[tuple[str, type]]:
    from flower.api.tasks import GetQueueLengths
    from flower.views.broker import BrokerView

    class LlmQueueMixin:
        def get_broker(self) -> KombuQueues:
            return KombuQueues(self.capp)  # type: ignore[attr-defined]

        def get_active_queue_names(self) -> list[str]:
            return all_queue_names(super().get_active_queue_names())  # type: ignore[misc]

    class LlmBrokerView(LlmQueueMixin, BrokerView):  # type: ignore[misc]
        pass

    class LlmQueueLengths(LlmQueueMixin, GetQueueLengths):  # type: ignore[misc]
        pass

    prefix = f"/{url_prefix.strip('/')}" if url_prefix.strip("/") else ""
    return [(f"{prefix}/broker", LlmBrokerView),
            (f"{prefix}/api/queues/length", LlmQueueLengths)]


def _apply_options(options: FlowerOptions) -> Any:
    from flower.options import options as flower_options

    flower_options.address = options.address
    flower_options.port = options.port
    flower_options.basic_auth = list(options.basic_auth)
    flower_options.read_only = not options.allow_control
    flower_options.inspect_timeout = options.inspect_timeout_ms
    flower_options.url_prefix = options.url_prefix
    flower_options.purge_offline_workers = 300
    if options.no_auth:
        # Flower keeps its HTTP API closed without auth unless told otherwise.
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"
    return flower_options


def run_flower(app: Celery, options: FlowerOptions) -> None:
    """Serve Flower until interrupted."""
    check_auth(options)
    from flower.app import Flower
    from flower.urls import settings as web_settings

    flower_options = _apply_options(options)
    if options.url_prefix:
        from flower.utils import prepend_url

        for name in ("login_url", "static_url_prefix"):
            web_settings[name] = prepend_url(web_settings[name], options.url_prefix)
    flower = Flower(capp=app, options=flower_options, **web_settings)
    flower.add_handlers(ALL_HOSTS, _handlers(options.url_prefix))
    port = flower.start_http_server()
    log.info("flower listening on %s:%s auth=%s read_only=%s", options.address, port,
             "basic" if options.basic_auth else "none", not options.allow_control)
    try:
        flower.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        flower.stop()


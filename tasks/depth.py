"""How many messages wait on each capability queue, read from the broker itself.

kombu answers a queue declaration with the queue's message count on every transport
we run: on Redis it sums the list and its priority sub-lists (under the key prefix), on the
embedded SQL broker it counts the visible rows of kombu's message table. The metrics view,
the Prometheus scrape and Flower's broker tab all read depths through here.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from kombu.exceptions import ChannelError

from broker.capabilities import CAPABILITIES, queue_name

#: Seconds to wait for a broker connection from the app's pool.
ACQUIRE_TIMEOUT_S = 5.0


def queue_lengths(app: Celery, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting (not yet delivered to a worker) per queue name."""
    with app.pool.acquire(block=True, timeout=ACQUIRE_TIMEOUT_S) as conn:
        # Fail fast when the broker is down: callers report "unavailable" rather than hang.
        conn.ensure_connection(max_retries=1, timeout=ACQUIRE_TIMEOUT_S)
        channel = conn.default_channel
        return {queue: _length(channel, queue) for queue in queues}


def queue_depths(app: Celery, capabilities: Iterable[str] = CAPABILITIES) -> dict[str, int]:
    """Messages waiting per capability."""
    caps = list(capabilities)
    lengths = queue_lengths(app, [queue_name(cap) for cap in caps])
    return {cap: lengths[queue_name(cap)] for cap in caps}


def _length(channel: object, queue: str) -> int:
    # Not passive: kombu 5.7's existence check ignores the Redis key prefix and would call
    # every prefixed queue missing. Declaring is idempotent: a no-op on Redis, and on the
    # SQL broker it adds the queue's row, which the first publish would add anyway.
    try:
        declared = channel.queue_declare(queue=queue)  # type: ignore[attr-defined]
    except ChannelError:
        return 0
    return int(declared.message_count)

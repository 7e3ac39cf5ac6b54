"""The worker's consumer, with task events sent in batches.

Celery buffers task events when the worker runs its event loop, then flushes the buffer on
the loop's next turn. At a few hundred jobs per second that is one Redis round trip per
event, three per job, on the one thread that also fetches and acknowledges every message.
Here the loop flushes at most every :data:`EVENT_FLUSH_S`. A full buffer (Celery's limit,
24 events) still goes at once, and whatever is buffered goes out at shutdown. Flower sees
each event up to that much later.
"""

from __future__ import annotations

import time
from typing import Any

from celery.worker.consumer import Consumer

#: The longest a task event waits in the worker before it is sent.
EVENT_FLUSH_S = 0.1


class EventBatchingConsumer(Consumer):  # type: ignore[misc]
    _last_flush = 0.0
    _flush_timer: Any = None

    def _flush_events(self) -> None:
        # Runs on the event loop's thread only (scheduled with call_soon or call_later).
        # Without an event loop (the embedded SQLite transport) Celery does not buffer.
        if self.hub is None:
            super()._flush_events()
            return
        wait_s = self._last_flush + EVENT_FLUSH_S - time.monotonic()
        if wait_s > 0:
            if self._flush_timer is None:
                self._flush_timer = self.hub.call_later(wait_s, self._flush_when_due)
            return
        self._last_flush = time.monotonic()
        super()._flush_events()

    def _flush_when_due(self) -> None:
        self._flush_timer = None
        self._flush_events()

    def shutdown(self) -> None:
        super()._flush_events()  # what is still buffered goes out before the connection closes
        super().shutdown()

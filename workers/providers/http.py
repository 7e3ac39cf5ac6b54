"""The HTTP side every provider shares: one pooled client per worker process, and a JSON POST
whose whole exchange, body included, ends at the attempt's deadline.

httpx timeouts apply per read, so each read may wait at most the deadline and the body is
read in chunks against the deadline of the whole attempt: a silent upstream, or one that
stalls mid-body, ends the attempt on time instead of holding a worker slot.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson

from workers.errors import RetryableProviderError
from workers.redaction import redact

# Headers that describe the body's wire form, wrong once the body is decoded.
WIRE_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


class PooledHttp:
    """Shared by all threads of a worker process; thread-safe like the httpx client under it."""

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int):
        self._read_timeout_s = read_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._client = httpx.Client(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    def close(self) -> None:
        self._client.close()

    def post_json(self, url: str, body: dict[str, Any], headers: dict[str, str], *,
                  api_key: str, deadline_s: float) -> httpx.Response:
        """POST ``body``; the response comes back read whole, or a retryable error at the
        deadline. ``api_key`` is only used to keep it out of error texts."""
        ends_at = time.monotonic() + deadline_s
        timeout = httpx.Timeout(
            min(self._read_timeout_s, deadline_s), connect=min(self._connect_timeout_s, deadline_s)
        )
        try:
            with self._client.stream(
                "POST", url, content=orjson.dumps(body), headers=headers, timeout=timeout
            ) as response:
                content = _read_before(response, ends_at, deadline_s)
        except httpx.TimeoutException as exc:
            raise deadline_error(deadline_s, type(exc).__name__) from None
        except httpx.TransportError as exc:
            message = redact(f"cannot reach the provider: {type(exc).__name__}: {exc}",
                             [api_key])
            raise RetryableProviderError(message, code="provider_unreachable") from None
        kept = [(k, v) for k, v in response.headers.multi_items()
                if k.lower() not in WIRE_HEADERS]
        return httpx.Response(response.status_code, headers=kept, content=content,
                              request=response.request)


def _read_before(response: httpx.Response, ends_at: float, deadline_s: float) -> bytes:
    chunks: list[bytes] = []
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        if time.monotonic() > ends_at:
            raise deadline_error(deadline_s, "body still arriving at the deadline")
    if time.monotonic() > ends_at:
        raise deadline_error(deadline_s, "body complete only after the deadline")
    return b"".join(chunks)


def deadline_error(deadline_s: float, detail: str) -> RetryableProviderError:
    return RetryableProviderError(
        f"provider did not answer within the attempt deadline of {deadline_s:.1f}s ({detail})",
        code="provider_timeout",
    )

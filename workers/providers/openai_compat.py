"""OpenAI wire protocol (OpenAI itself, LiteLLM proxies, vLLM and other compatible servers)."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

from workers.errors import ProviderError, RetryableProviderError, classify_status
from workers.providers.base import CallKind, Credential, ProviderResponse, TokenUsage
from workers.providers.http import PooledHttp
from workers.redaction import redact

PATHS: dict[CallKind, str] = {"chat": "/chat/completions", "embedding": "/embeddings"}
MAX_ERROR_MESSAGE_CHARS = 2000


class OpenAICompatibleProvider:
    """One pooled httpx client per worker process, shared by all of its threads."""

    name = "openai"

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int):
        self._http = PooledHttp(connect_timeout_s=connect_timeout_s,
                                read_timeout_s=read_timeout_s, max_connections=max_connections)

    def close(self) -> None:
        self._http.close()

    def call(
        self,
        kind: CallKind,
        request: dict[str, Any],
        *,
        model: str,
        credential: Credential,
        deadline_s: float,
    ) -> ProviderResponse:
        body = dict(request, model=model)
        if kind == "chat" and body.get("stream"):
            # The job API stores whole responses; streaming to callers is done by the broker.
            body.pop("stream", None)
            body.pop("stream_options", None)
        url = credential.base_url.rstrip("/") + PATHS[kind]
        started = time.perf_counter()
        response = self._send(url, body, credential, deadline_s)
        latency_ms = (time.perf_counter() - started) * 1000
        if response.status_code >= 400:
            raise _error_from_response(response, credential)
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise RetryableProviderError(
                f"provider returned status {response.status_code} with a body that is not JSON",
                code="provider_bad_response",
                status=response.status_code,
            ) from exc
        return ProviderResponse(
            body=payload, usage=parse_usage(payload), status=response.status_code,
            latency_ms=latency_ms,
        )

    def _send(
        self, url: str, body: dict[str, Any], credential: Credential, deadline_s: float
    ) -> httpx.Response:
        headers = {
            "Authorization": f"Bearer {credential.api_key}",
            "Content-Type": "application/json",
        }
        return self._http.post_json(url, body, headers, api_key=credential.api_key,
                                    deadline_s=deadline_s)


def parse_usage(payload: dict[str, Any]) -> TokenUsage | None:
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or {}
    return TokenUsage(
        input_tokens=int(usage.get("prompt_tokens") or 0),
        cached_input_tokens=int(details.get("cached_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
    )


def _error_from_response(response: httpx.Response, credential: Credential) -> ProviderError:
    status = response.status_code
    message = _provider_message(response)
    message = redact(message, [credential.api_key])[:MAX_ERROR_MESSAGE_CHARS]
    cls = classify_status(status)
    code = {
        401: "provider_auth_failed",
        403: "provider_forbidden",
        404: "provider_not_found",
        429: "provider_rate_limited",
    }.get(status, "provider_error")
    if status == 400 and "context_length" in message:
        code = "context_length_exceeded"
    return cls(
        f"provider returned {status}: {message}", code=code, status=status,
        retry_after_s=retry_after_s(response.headers),
    )


def _provider_message(response: httpx.Response) -> str:
    try:
        payload = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text.strip() or response.reason_phrase
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return response.text.strip()


def retry_after_s(headers: httpx.Headers) -> float | None:
    """The provider's hint: ``retry-after-ms`` wins over ``Retry-After`` (seconds or a date)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None

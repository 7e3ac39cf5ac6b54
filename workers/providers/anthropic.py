"""Anthropic Messages wire protocol: OpenAI chat requests in, OpenAI chat completions out.

The translation itself lives in :mod:`workers.providers.anthropic_translate`; this module sends
the request, maps Anthropic's errors onto :mod:`workers.errors` and its usage onto
:class:`TokenUsage`. Anthropic has no embeddings endpoint: such a call is refused.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson

from broker.catalog import Catalog
from workers.errors import (
    PermanentProviderError,
    ProviderError,
    RetryableProviderError,
    classify_status,
)
from workers.providers import anthropic_translate as translate
from workers.providers.base import CallKind, Credential, ProviderResponse, TokenUsage
from workers.providers.http import PooledHttp
from workers.providers.openai_compat import retry_after_s
from workers.redaction import redact

API_VERSION = "2023-06-01"
MAX_ERROR_MESSAGE_CHARS = 2000
FALLBACK_MAX_TOKENS = 4096
CONTEXT_ERROR_MARKERS = ("prompt is too long", "context window", "context_length")


class AnthropicProvider:
    """One pooled httpx client per worker process, shared by all of its threads."""

    name = "anthropic"

    def __init__(self, *, catalog: Catalog, connect_timeout_s: float, read_timeout_s: float,
                 max_connections: int):
        self._catalog = catalog
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
        body = self._translate(kind, request, model)
        url = credential.base_url.rstrip("/") + "/v1/messages"
        started = time.perf_counter()
        response = self._send(url, body, credential, deadline_s)
        latency_ms = (time.perf_counter() - started) * 1000
        if response.status_code >= 400:
            raise _error_from_response(response, credential)
        try:
            message = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise RetryableProviderError(
                f"provider returned status {response.status_code} with a body that is not JSON",
                code="provider_bad_response", status=response.status_code,
            ) from exc
        completion = translate.to_chat_completion(message)
        return ProviderResponse(body=completion, usage=token_usage(completion["usage"]),
                                status=response.status_code, latency_ms=latency_ms)

    def _translate(self, kind: CallKind, request: dict[str, Any], model: str) -> dict[str, Any]:
        if kind != "chat":
            raise PermanentProviderError(
                f"model {model!r} is an Anthropic model and Anthropic has no embeddings API; "
                "route the capability to an embedding model", code="provider_unsupported")
        default = self._default_max_tokens(model)
        try:
            return translate.to_messages_request(request, model=model, default_max_tokens=default)
        except translate.UnsupportedRequest as exc:
            raise PermanentProviderError(exc.message, code="unsupported_parameter") from None

    def _default_max_tokens(self, model: str) -> int:
        if model in self._catalog:
            return self._catalog.get(model).max_output_tokens or FALLBACK_MAX_TOKENS
        return FALLBACK_MAX_TOKENS

    def _send(self, url: str, body: dict[str, Any], credential: Credential,
              deadline_s: float) -> httpx.Response:
        headers = {
            "x-api-key": credential.api_key,
            "anthropic-version": API_VERSION,
            "content-type": "application/json",
        }
        return self._http.post_json(url, body, headers, api_key=credential.api_key,
                                    deadline_s=deadline_s)


def token_usage(usage: dict[str, Any]) -> TokenUsage:
    """Cache writes are counted as input tokens at the input price (see the README)."""
    details = usage.get("prompt_tokens_details") or {}
    return TokenUsage(
        input_tokens=int(usage.get("prompt_tokens") or 0),
        cached_input_tokens=int(details.get("cached_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
    )


def _error_from_response(response: httpx.Response, credential: Credential) -> ProviderError:
    status = response.status_code
    message = redact(_provider_message(response), [credential.api_key])
    message = message[:MAX_ERROR_MESSAGE_CHARS]
    code = {
        401: "provider_auth_failed", 403: "provider_forbidden", 404: "provider_not_found",
        413: "provider_request_too_large", 429: "provider_rate_limited",
        529: "provider_overloaded",
    }.get(status, "provider_error")
    if status == 400 and any(marker in message.lower() for marker in CONTEXT_ERROR_MARKERS):
        code = "context_length_exceeded"
    return classify_status(status)(
        f"provider returned {status}: {message}", code=code, status=status,
        retry_after_s=retry_after_s(response.headers),
    )


def _provider_message(response: httpx.Response) -> str:
    try:
        payload = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text.strip() or response.reason_phrase
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return response.text.strip()

"""A fake OpenAI-compatible upstream: a real HTTP server standing in for the paid providers.

Tests, the demo and the benchmarks point provider integrations at it. Answers are derived from a
sha256 of the input, token usage is computed from the input, and a directive embedded in the
request text scripts failures, hangs and stalls, so every path through the broker can be driven
over real HTTP. ``molar-llm fake-upstream`` runs it through :func:`serve`.

The directive is the first ``<<fake:{JSON}>>`` found in a chat message's text (string content
or ``{"type": "text"}`` parts, in message order) or in an embeddings input string. The JSON
object follows the colon directly; every field is optional:

- ``scenario`` (str): calls carrying it are counted, and call k (1-based) uses ``fail[k-1]``.
  Without a scenario the directive is stateless: every call counts as call 1, so ``fail[0]``
  applies to every call (a permanent failure) and later steps never do.
- ``fail`` (list): one step per call; ``null`` or ``{}`` answers normally. A step holds
  ``status`` (400-599; 401 by default with ``echo_key``, else 500), ``message``, ``type``,
  ``code``, ``retry_after`` (seconds, sent as ``Retry-After``), ``retry_after_ms`` (sent as
  ``retry-after-ms``), ``echo_key`` (the caller's key goes into the message and into a URL in
  it), ``hang`` (never answer; give up after an hour or when the client leaves) and ``stall``
  (send the status line, the headers and half of the body, then go quiet).
- ``latency_ms`` (number): replaces the server's latency for this call.
- ``no_usage`` (bool): leave ``usage`` out of the answer.
- ``cached_tokens`` (int): reported in ``prompt_tokens_details`` (at most the prompt tokens).
- ``completion_tokens`` (int): forces the completion size (still capped by ``max_tokens``).
- ``cache_write_tokens`` (int): Anthropic only, reported as ``cache_creation_input_tokens``.
- ``echo`` (bool): Anthropic only; the answer's text is the request body as received, so
  tests can see what a translation sent.

``POST /v1/messages`` speaks Anthropic's Messages API; see :mod:`workers.fake_anthropic`.

Scenario counters count only calls that passed the key check and validation.
``DELETE /_control/calls`` clears the call log and the scenario counters.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import operator
import os
import secrets
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import repeat
from typing import Any, NamedTuple

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

API_KEYS_ENV = "FAKE_UPSTREAM_API_KEYS"
DIRECTIVE_MARKER = "<<fake:"
DIRECTIVE_END = ">>"
CALL_LOG_MAX_ENTRIES = 200_000
HANG_MAX_S = 3600.0

TOKENS_PER_MESSAGE = 4
TOKENS_PER_IMAGE = 85
CHARS_PER_TOKEN = 4
BASE_COMPLETION_TOKENS = 8
COMPLETION_TOKENS_SPREAD = 24
MAX_CHOICES = 128
STREAM_PIECES_PER_CHOICE = 4

DEFAULT_EMBEDDING_DIMENSIONS = 256
MAX_EMBEDDING_DIMENSIONS = 8192
MAX_EMBEDDING_INPUTS = 2048

MODEL_IDS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
)

# An escaped marker (\u003c) would slip past this pre-check; JSON encoders do not escape "<".
_MARKER_BYTES = DIRECTIVE_MARKER.encode()
_MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_JSON_DECODER = json.JSONDecoder()
_WORDS = (
    "atlas", "beacon", "canvas", "delta", "ember", "falcon", "garnet", "harbor",
    "island", "jasper", "kernel", "lantern", "meadow", "nectar", "orbit", "prism",
    "quartz", "raven", "signal", "timber", "umber", "vector", "willow", "xenon",
    "yonder", "zephyr", "anchor", "button", "cursor", "dialog", "editor", "footer",
    "gallery", "header", "input", "journey", "keyboard", "label", "menu", "navbar",
    "option", "panel", "query", "render", "scroll", "tab", "upload", "viewport",
    "widget", "badge", "banner", "checkbox", "dropdown", "element", "form", "grid",
    "hover", "icon", "link", "modal", "node", "page", "route", "selector",
)  # fmt: skip
_WORD_OF_BYTE = tuple(_WORDS[value % len(_WORDS)] for value in range(256))

Json = dict[str, Any]


class _ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _default_error_type(status)
        self.headers = headers or {}

    def to_response(self) -> Response:
        error = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        return _json_response({"error": error}, self.status, self.headers)


def _default_error_type(status: int) -> str:
    if status == 429:
        return "requests"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _default_error_code(status: int) -> str | None:
    return {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


# --- the directive -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """What one scripted call does instead of answering normally."""

    status: int | None = None
    message: str | None = None
    error_type: str | None = None
    code: str | None = None
    retry_after_s: float | None = None
    retry_after_ms: float | None = None
    echo_key: bool = False
    hang: bool = False
    stall: bool = False


@dataclass(frozen=True)
class Directive:
    """The parsed ``<<fake:{JSON}>>`` script of one request."""

    scenario: str | None = None
    fail: tuple[Step | None, ...] = ()
    latency_ms: float | None = None
    no_usage: bool = False
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    cache_write_tokens: int | None = None
    echo: bool = False


def find_directive(texts: Iterable[str]) -> Directive | None:
    """Parse the first directive found in ``texts``; raise a 400 error when it is malformed."""
    for text in texts:
        start = text.find(DIRECTIVE_MARKER)
        if start >= 0:
            return _parse_directive(text, start + len(DIRECTIVE_MARKER))
    return None


def _parse_directive(text: str, offset: int) -> Directive:
    try:
        fields, end = _JSON_DECODER.raw_decode(text, offset)
    except json.JSONDecodeError as exc:
        raise _directive_error(f"bad JSON after {DIRECTIVE_MARKER!r}: {exc.msg}") from exc
    if not isinstance(fields, dict):
        raise _directive_error(f"the JSON must be an object, got {type(fields).__name__}")
    if not text.startswith(DIRECTIVE_END, end):
        raise _directive_error(f"the JSON object must be followed by {DIRECTIVE_END!r}")

    return Directive(
        scenario=_optional_str(fields, "scenario"),
        fail=_parse_steps(fields.get("fail")),
        latency_ms=_optional_number(fields, "latency_ms"),
        no_usage=_flag(fields, "no_usage"),
        cached_tokens=_optional_count(fields, "cached_tokens"),
        completion_tokens=_optional_count(fields, "completion_tokens"),
        cache_write_tokens=_optional_count(fields, "cache_write_tokens"),
        echo=_flag(fields, "echo"),
    )


def _parse_steps(raw: Any) -> tuple[Step | None, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _directive_error(f"'fail' must be a list of steps, got {raw!r}")
    return tuple(_parse_step(step, position) for position, step in enumerate(raw))


def _parse_step(raw: Any, position: int) -> Step | None:
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict):
        raise _directive_error(f"fail[{position}] must be an object or null, got {raw!r}")

    status = _optional_count(raw, "status")
    if status is not None and not 400 <= status <= 599:
        raise _directive_error(f"fail[{position}].status must be within 400-599, got {status}")
    return Step(
        status=status,
        message=_optional_str(raw, "message"),
        error_type=_optional_str(raw, "type"),
        code=_optional_str(raw, "code"),
        retry_after_s=_optional_number(raw, "retry_after"),
        retry_after_ms=_optional_number(raw, "retry_after_ms"),
        echo_key=_flag(raw, "echo_key"),
        hang=_flag(raw, "hang"),
        stall=_flag(raw, "stall"),
    )


def _directive_error(detail: str) -> _ApiError:
    return _ApiError(
        400,
        f"invalid fake directive: {detail}; expected {DIRECTIVE_MARKER}{{...}}{DIRECTIVE_END} "
        "as documented in workers/fake_upstream.py",
        code="invalid_fake_directive",
    )


def _optional_str(fields: Json, name: str) -> str | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise _directive_error(f"{name!r} must be a string, got {value!r}")
    return value


def _optional_number(fields: Json, name: str) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _directive_error(f"{name!r} must be a non-negative number, got {value!r}")
    return float(value)


def _optional_count(fields: Json, name: str) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _directive_error(f"{name!r} must be a non-negative integer, got {value!r}")
    return value


def _flag(fields: Json, name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise _directive_error(f"{name!r} must be true or false, got {value!r}")
    return value


# --- server state ------------------------------------------------------------------------------


class CallRecord(NamedTuple):
    """One request as the call log keeps it; the key is kept only as its sha256."""

    n: int
    path: str
    model: str | None
    scenario: str | None
    scenario_call: int | None
    key_sha256: str | None
    status: int | None
    outcome: str
    at: float
    done_at: float


@dataclass
class _Call:
    """What is learnt about one request while it is answered."""

    path: str
    key: str | None
    at: float
    model: str | None = None
    scenario: str | None = None
    scenario_call: int | None = None
    outcome: str = "ok"


@dataclass
class UpstreamState:
    """The accepted keys, the latency, the call log and the scenario counters of one app."""

    api_keys: set[str]
    latency_ms: float
    calls: deque[CallRecord] = field(default_factory=lambda: deque(maxlen=CALL_LOG_MAX_ENTRIES))
    scenario_calls: dict[str, int] = field(default_factory=dict)
    calls_seen: int = 0

    def authorise(self, key: str | None) -> None:
        if not self.api_keys or key in self.api_keys:
            return
        message = (
            "You didn't provide an API key; send 'Authorization: Bearer <key>'."
            if key is None
            else "Incorrect API key provided; the fake upstream accepts the keys it was "
            "started with and those added through POST /_control/keys."
        )
        raise _ApiError(401, message, code="invalid_api_key")

    def count_scenario_call(self, scenario: str) -> int:
        number = self.scenario_calls.get(scenario, 0) + 1
        self.scenario_calls[scenario] = number
        return number

    def record(self, call: _Call, status: int | None) -> None:
        self.calls_seen += 1
        self.calls.append(
            CallRecord(
                n=self.calls_seen,
                path=call.path,
                model=_shared(call.model),
                scenario=_shared(call.scenario),
                scenario_call=call.scenario_call,
                key_sha256=None if call.key is None else _key_sha256(call.key),
                status=status,
                outcome=call.outcome,
                at=call.at,
                done_at=time.time(),
            )
        )

    def clear(self) -> int:
        cleared = len(self.calls)
        self.calls.clear()
        self.scenario_calls.clear()
        self.calls_seen = 0
        return cleared


def _shared(text: str | None) -> str | None:
    # The log holds up to 200k entries; one shared copy per distinct model keeps it small.
    return None if text is None else sys.intern(text)


@lru_cache(maxsize=1024)
def _key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --- answers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """A successful answer, built before the script decides whether it is sent."""

    chunks: tuple[bytes, ...]
    media_type: str = "application/json"

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def to_response(self) -> Response:
        if self.media_type == "text/event-stream":
            return StreamingResponse(iter(self.chunks), media_type=self.media_type)
        return Response(self.body, media_type=self.media_type)


def _json_answer(body: Json) -> _Answer:
    return _Answer((orjson.dumps(body),))


def _decode_object(body: bytes) -> Json:
    if not body:
        return {}
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _ApiError(
            400,
            f"We could not parse the JSON body of your request ({exc}). "
            "Send a JSON object with 'Content-Type: application/json'.",
        ) from exc
    if not isinstance(payload, dict):
        raise _ApiError(
            400, f"The request body must be a JSON object, got {type(payload).__name__}."
        )
    return payload


def _require_model(payload: Json) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _ApiError(400, "you must provide a model parameter", param="model")
    return model


def _optional_int(payload: Json, name: str, minimum: int, maximum: int) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise _ApiError(
            400,
            f"Invalid '{name}': expected an integer from {minimum} to {maximum}, got {value!r}.",
            param=name,
            code="invalid_value",
        )
    return value


# --- chat completions --------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChatRequest:
    model: str
    messages: list[Json]
    n: int
    max_tokens: int | None
    stream: bool
    include_usage: bool
    json_mode: bool


@dataclass(frozen=True)
class _Choice:
    index: int
    content: str
    completion_tokens: int
    finish_reason: str


def chat_texts(payload: Json) -> Iterator[str]:
    """Yield the text of every message: string content and ``{"type": "text"}`` parts."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return
    for message in messages:
        if isinstance(message, dict):
            yield from _content_texts(message.get("content"))


def _content_texts(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    yield text


def prompt_tokens(messages: list[Json]) -> int:
    """4 per message, a token per 4 characters of text, 85 per image."""
    total = TOKENS_PER_MESSAGE * len(messages)
    for message in messages:
        total += sum(_text_tokens(text) for text in _content_texts(message.get("content")))
        total += TOKENS_PER_IMAGE * _image_count(message.get("content"))
    return total


def _text_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def _image_count(content: Any) -> int:
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url")


def _parse_chat_request(payload: Json) -> _ChatRequest:
    model = _require_model(payload)
    messages = _require_messages(payload)
    max_tokens = _optional_int(payload, "max_completion_tokens", 1, 2**31)
    if max_tokens is None:
        max_tokens = _optional_int(payload, "max_tokens", 1, 2**31)
    stream_options = payload.get("stream_options")
    response_format = payload.get("response_format")

    return _ChatRequest(
        model=model,
        messages=messages,
        n=_optional_int(payload, "n", 1, MAX_CHOICES) or 1,
        max_tokens=max_tokens,
        stream=payload.get("stream") is True,
        include_usage=isinstance(stream_options, dict)
        and stream_options.get("include_usage") is True,
        json_mode=isinstance(response_format, dict)
        and response_format.get("type") in ("json_object", "json_schema"),
    )


def _require_messages(payload: Json) -> list[Json]:
    messages = payload.get("messages")
    if messages is None:
        raise _ApiError(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list) or not messages:
        raise _ApiError(
            400,
            f"Invalid 'messages': expected a non-empty array of messages, got {messages!r}.",
            param="messages",
            code="invalid_value",
        )
    for index, message in enumerate(messages):
        _check_message(message, index)
    return messages


def _check_message(message: Any, index: int) -> None:
    role = message.get("role") if isinstance(message, dict) else None
    if role not in _MESSAGE_ROLES:
        raise _ApiError(
            400,
            f"Invalid 'messages[{index}].role': expected one of {sorted(_MESSAGE_ROLES)}, "
            f"got {role!r}.",
            param=f"messages.[{index}].role",
            code="invalid_value",
        )


def build_chat_completion(payload: Json, directive: Directive | None) -> _Answer:
    """Answer a chat completion deterministically from a sha256 of the messages."""
    request = _parse_chat_request(payload)
    digest = hashlib.sha256(orjson.dumps(request.messages, option=orjson.OPT_SORT_KEYS)).digest()
    choices = [_make_choice(digest, index, request, directive) for index in range(request.n)]
    usage = _chat_usage(request, choices, directive)
    header = {
        "id": f"chatcmpl-fake{secrets.token_hex(12)}",
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": "fp_fake_upstream",
    }

    if request.stream:
        return _stream_answer(header, choices, usage if request.include_usage else None)
    completion = {**header, "object": "chat.completion", "choices": _choice_bodies(choices)}
    if usage is not None:
        completion["usage"] = usage
    return _json_answer(completion)


def _make_choice(
    digest: bytes, index: int, request: _ChatRequest, directive: Directive | None
) -> _Choice:
    seed = digest if index == 0 else hashlib.sha256(digest + index.to_bytes(4, "big")).digest()
    wanted = _wanted_completion_tokens(seed, directive)
    tokens = wanted if request.max_tokens is None else min(wanted, request.max_tokens)
    text = _words(seed, tokens)

    return _Choice(
        index=index,
        content=orjson.dumps({"answer": text}).decode() if request.json_mode else text,
        completion_tokens=tokens,
        finish_reason="length" if tokens < wanted else "stop",
    )


def _wanted_completion_tokens(seed: bytes, directive: Directive | None) -> int:
    if directive is not None and directive.completion_tokens is not None:
        return directive.completion_tokens
    return BASE_COMPLETION_TOKENS + int.from_bytes(seed, "big") % COMPLETION_TOKENS_SPREAD


def _words(seed: bytes, count: int) -> str:
    """``count`` words, one per token; the first carries the seed so contents differ visibly."""
    if count == 0:
        return ""
    picks = hashlib.shake_256(seed).digest(count - 1)
    return " ".join([f"fake-{seed[:4].hex()}", *map(_WORD_OF_BYTE.__getitem__, picks)])


def _chat_usage(
    request: _ChatRequest, choices: list[_Choice], directive: Directive | None
) -> Json | None:
    if directive is not None and directive.no_usage:
        return None
    prompt = prompt_tokens(request.messages)
    completion = sum(choice.completion_tokens for choice in choices)
    cached = min(directive.cached_tokens or 0, prompt) if directive is not None else 0

    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _choice_bodies(choices: list[_Choice]) -> list[Json]:
    return [
        {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.content, "refusal": None},
            "logprobs": None,
            "finish_reason": choice.finish_reason,
        }
        for choice in choices
    ]


def _stream_answer(header: Json, choices: list[_Choice], usage: Json | None) -> _Answer:
    """Server-sent ``chat.completion.chunk`` events, as OpenAI streams them."""
    base = {**header, "object": "chat.completion.chunk"}
    if usage is not None:
        base["usage"] = None  # OpenAI sends null usage on every chunk when it will send usage

    events = [_event({**base, "choices": [delta]}) for delta in _stream_deltas(choices)]
    if usage is not None:
        events.append(_event({**base, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return _Answer(tuple(events), media_type="text/event-stream")


def _stream_deltas(choices: list[_Choice]) -> Iterator[Json]:
    for choice in choices:
        yield _delta(choice.index, {"role": "assistant", "content": ""}, None)
        for piece in _pieces(choice.content, STREAM_PIECES_PER_CHOICE):
            yield _delta(choice.index, {"content": piece}, None)
        yield _delta(choice.index, {}, choice.finish_reason)


def _delta(index: int, delta: Json, finish_reason: str | None) -> Json:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _pieces(text: str, count: int) -> Iterator[str]:
    size = max(1, -(-len(text) // count))
    for start in range(0, len(text), size):
        yield text[start : start + size]


def _event(chunk: Json) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


# --- embeddings --------------------------------------------------------------------------------

_EmbeddingInput = str | list[int]


def embedding_texts(payload: Json) -> Iterator[str]:
    """Yield the string inputs of an embeddings request (token arrays carry no directive)."""
    raw = payload.get("input")
    if isinstance(raw, str):
        yield raw
    elif isinstance(raw, list):
        yield from (item for item in raw if isinstance(item, str))


def build_embeddings(payload: Json, directive: Directive | None) -> _Answer:
    """Answer an embeddings request with unit vectors derived from a sha256 of each input."""
    model = _require_model(payload)
    inputs = _embedding_inputs(payload)
    dimensions = _optional_int(payload, "dimensions", 1, MAX_EMBEDDING_DIMENSIONS)
    as_base64 = _wants_base64(payload)

    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": _encode(embedding_vector(item, dimensions), as_base64),
        }
        for index, item in enumerate(inputs)
    ]
    body: Json = {"object": "list", "data": data, "model": model}
    if directive is None or not directive.no_usage:
        tokens = sum(_input_tokens(item) for item in inputs)
        body["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return _json_answer(body)


def _embedding_inputs(payload: Json) -> list[_EmbeddingInput]:
    raw = payload.get("input")
    if raw is None:
        raise _ApiError(
            400,
            "Missing required parameter: 'input'.",
            param="input",
            code="missing_required_parameter",
        )
    if isinstance(raw, list) and raw and all(_is_token(token) for token in raw):
        return [raw]

    items = raw if isinstance(raw, list) else [raw]
    if not items or len(items) > MAX_EMBEDDING_INPUTS or not all(map(_is_input, items)):
        raise _ApiError(
            400,
            "Invalid 'input': expected a non-empty string, a token array, or a list of at most "
            f"{MAX_EMBEDDING_INPUTS} of either.",
            param="input",
            code="invalid_value",
        )
    return items


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_input(item: Any) -> bool:
    if isinstance(item, str):
        return bool(item)
    return isinstance(item, list) and bool(item) and all(map(_is_token, item))


def _wants_base64(payload: Json) -> bool:
    encoding: object = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _ApiError(
            400,
            f"Invalid 'encoding_format': expected 'float' or 'base64', got {encoding!r}.",
            param="encoding_format",
            code="invalid_value",
        )
    return encoding == "base64"


def embedding_vector(item: _EmbeddingInput, dimensions: int | None = None) -> bytes:
    """The unit vector of one input as little-endian float32 bytes."""
    source = item.encode() if isinstance(item, str) else b"tokens:" + orjson.dumps(item)
    return _unit_vector(hashlib.sha256(source).digest(), dimensions or DEFAULT_EMBEDDING_DIMENSIONS)


# Benchmarks repeat their inputs, and normalising in pure Python costs about 0.1 ms a vector.
@lru_cache(maxsize=8192)
def _unit_vector(seed: bytes, size: int) -> bytes:
    components = struct.unpack(f"<{size}h", hashlib.shake_256(seed).digest(2 * size))
    norm = math.hypot(*components) or 1.0
    return struct.pack(f"<{size}f", *map(operator.truediv, components, repeat(norm, size)))


def _encode(vector: bytes, as_base64: bool) -> str | list[float]:
    if as_base64:
        return base64.b64encode(vector).decode()
    return list(struct.unpack(f"<{len(vector) // 4}f", vector))


def _input_tokens(item: _EmbeddingInput) -> int:
    return _text_tokens(item) if isinstance(item, str) else len(item)


# --- models ------------------------------------------------------------------------------------


def _no_texts(payload: Json) -> Iterator[str]:
    return iter(())


def build_model_list(payload: Json, directive: Directive | None) -> _Answer:
    models = [
        {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "fake-upstream"}
        for model in MODEL_IDS
    ]
    return _json_answer({"object": "list", "data": models})


# --- scripted behaviour ------------------------------------------------------------------------


class _HangResponse(Response):
    """Accept the request and never answer, until the client leaves or an hour has passed."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _wait_for_disconnect(receive, HANG_MAX_S)


class _StallResponse(Response):
    """Send the status line, the headers and the first half of the body, then go quiet."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        half = bytes(self.body[: len(self.body) // 2])
        await send({"type": "http.response.body", "body": half, "more_body": True})
        await _wait_for_disconnect(receive, HANG_MAX_S)


async def _wait_for_disconnect(receive: Receive, timeout_s: float) -> None:
    # The body has been read, so receive() now returns only when the client goes away.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while (await receive())["type"] != "http.disconnect":
                pass


def _step_for(state: UpstreamState, call: _Call, directive: Directive | None) -> Step | None:
    if directive is None:
        return None
    number = 1
    if directive.scenario is not None:
        number = state.count_scenario_call(directive.scenario)
        call.scenario_call = number
    return directive.fail[number - 1] if number <= len(directive.fail) else None


def _deliver(answer: _Answer, step: Step | None, call: _Call) -> Response:
    if step is None:
        return answer.to_response()
    if step.hang:
        call.outcome = "hang"
        return _HangResponse()
    if step.stall:
        call.outcome = "stall"
        return _StallResponse(answer.body, step.status or 200, media_type=answer.media_type)
    raise _scripted_error(step, call.key)


def _scripted_error(step: Step, key: str | None) -> _ApiError:
    status = step.status or (401 if step.echo_key else 500)
    message = step.message or f"Scripted failure from the fake upstream: HTTP {status}."
    if step.echo_key:
        # Real providers echo keys like this; the broker must redact them.
        message += (
            f" Incorrect API key provided: {key}. "
            f"See https://upstream.fake.invalid/v1/keys?api_key={key} for its usage."
        )

    return _ApiError(
        status,
        message,
        code=step.code or _default_error_code(status),
        error_type=step.error_type,
        headers=_retry_headers(step),
    )


def _retry_headers(step: Step) -> dict[str, str]:
    headers = {}
    if step.retry_after_s is not None:
        headers["Retry-After"] = _header_number(step.retry_after_s)
    if step.retry_after_ms is not None:
        headers["retry-after-ms"] = _header_number(step.retry_after_ms)
    return headers


def _header_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else str(value)


async def _sleep_ms(latency_ms: float) -> None:
    if latency_ms > 0:
        await asyncio.sleep(latency_ms / 1000)


# --- the HTTP layer ----------------------------------------------------------------------------

_Texts = Callable[[Json], Iterator[str]]
_Build = Callable[[Json, Directive | None], _Answer]


@dataclass(frozen=True)
class _Endpoint:
    """An API endpoint: where its directive may hide, how it answers, whose key it reads."""

    texts: _Texts
    build: _Build
    key_of: Callable[[Request], str | None] = field(default=lambda r: _bearer_key(r))
    render_error: Callable[[_ApiError], Response] = field(default=lambda e: e.to_response())


@dataclass(frozen=True)
class _Inbound:
    """A decoded request; its problem is reported after the key check, as the real API does."""

    payload: Json
    directive: Directive | None = None
    problem: _ApiError | None = None


def _inspect(body: bytes, texts: _Texts) -> _Inbound:
    try:
        payload = _decode_object(body)
    except _ApiError as problem:
        return _Inbound({}, problem=problem)
    if _MARKER_BYTES not in body:
        return _Inbound(payload)
    try:
        return _Inbound(payload, find_directive(texts(payload)))
    except _ApiError as problem:
        return _Inbound(payload, problem=problem)


def _bearer_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


async def _handle(state: UpstreamState, endpoint: _Endpoint, request: Request) -> Response:
    call = _Call(path=request.url.path, key=endpoint.key_of(request), at=time.time())
    try:
        response = await _respond(state, endpoint, request, call)
    except _ApiError as error:
        call.outcome = "error"
        response = endpoint.render_error(error)
    state.record(call, None if call.outcome == "hang" else response.status_code)
    return response


async def _respond(
    state: UpstreamState, endpoint: _Endpoint, request: Request, call: _Call
) -> Response:
    inbound = _inspect(await request.body(), endpoint.texts)
    model = inbound.payload.get("model")
    call.model = model if isinstance(model, str) else None
    call.scenario = inbound.directive.scenario if inbound.directive else None

    state.authorise(call.key)
    if inbound.problem is not None:
        raise inbound.problem
    answer = endpoint.build(inbound.payload, inbound.directive)
    step = _step_for(state, call, inbound.directive)

    directive_latency_ms = inbound.directive.latency_ms if inbound.directive else None
    await _sleep_ms(state.latency_ms if directive_latency_ms is None else directive_latency_ms)
    return _deliver(answer, step, call)


def _api_route(path: str, method: str, state: UpstreamState, endpoint: _Endpoint) -> Route:
    async def handle(request: Request) -> Response:
        return await _handle(state, endpoint, request)

    return Route(path, handle, methods=[method])


def _control_routes(state: UpstreamState) -> list[Route]:
    async def add_keys(request: Request) -> Response:
        try:
            keys = _decode_object(await request.body()).get("keys")
        except _ApiError as error:
            return error.to_response()
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            message = f'expected {{"keys": [non-empty strings]}}, got "keys": {keys!r}'
            return _ApiError(400, message, param="keys").to_response()
        state.api_keys.update(keys)
        return _json_response({"keys_accepted": len(state.api_keys)})

    async def list_calls(request: Request) -> Response:
        scenario = request.query_params.get("scenario")
        calls = [c._asdict() for c in state.calls if scenario is None or c.scenario == scenario]
        return _json_response({"calls": calls})

    async def clear_calls(request: Request) -> Response:
        return _json_response({"cleared": state.clear()})

    async def health(request: Request) -> Response:
        return _json_response({"status": "ok"})

    return [
        Route("/_control/keys", add_keys, methods=["POST"]),
        Route("/_control/calls", list_calls, methods=["GET"]),
        Route("/_control/calls", clear_calls, methods=["DELETE"]),
        Route("/_control/health", health, methods=["GET"]),
    ]


async def _unknown_route(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = f"{request.method} {request.url.path} is not served by the fake upstream ({exc})."
    return _ApiError(status, message, code="unknown_url").to_response()


def _anthropic_endpoint() -> _Endpoint:
    # Imported here: the Anthropic module builds on this one's directive and answer types.
    from workers import fake_anthropic

    return _Endpoint(
        fake_anthropic.message_texts, fake_anthropic.build_message,
        key_of=fake_anthropic.api_key_of, render_error=fake_anthropic.render_error,
    )


def create_app(*, api_keys: Iterable[str] = (), latency_ms: float = 0.0) -> Starlette:
    """Build the fake upstream; an empty key set accepts any caller."""
    if latency_ms < 0:
        raise ValueError(f"latency_ms must be zero or more, got {latency_ms}")
    state = UpstreamState(api_keys={key for key in api_keys if key}, latency_ms=latency_ms)
    chat = _Endpoint(chat_texts, build_chat_completion)
    embeddings = _Endpoint(embedding_texts, build_embeddings)
    models = _Endpoint(_no_texts, build_model_list)

    routes = [
        _api_route("/v1/chat/completions", "POST", state, chat),
        _api_route("/v1/embeddings", "POST", state, embeddings),
        _api_route("/v1/models", "GET", state, models),
        _api_route("/v1/messages", "POST", state, _anthropic_endpoint()),
        *_control_routes(state),
    ]
    app = Starlette(routes=routes, exception_handlers={404: _unknown_route, 405: _unknown_route})
    app.state.upstream = state
    return app


def serve(host: str, port: int, *, latency_ms: float = 0.0, api_keys: Iterable[str] = ()) -> None:
    """Run the fake upstream until interrupted; keys also come from ``FAKE_UPSTREAM_API_KEYS``."""
    env_keys = [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",")]
    app = create_app(api_keys=[*api_keys, *env_keys], latency_ms=latency_ms)
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
        server_header=False,
        # Hung and stalled requests would otherwise hold shutdown until their clients leave.
        timeout_graceful_shutdown=5,
    )

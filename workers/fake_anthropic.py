"""Anthropic's Messages API (``POST /v1/messages``) for the fake upstream.

It enforces the validation rules of the real API that a wrong OpenAI-to-Anthropic translation
would trip: ``max_tokens`` required, only ``user``/``assistant`` roles and strictly alternating,
``system`` only as the top-level field, no empty or whitespace-only text blocks, image sources of
the two documented shapes, every ``tool_use`` answered by a ``tool_result`` (listed first) in the
next user turn, no unknown top-level fields, ``temperature`` and ``top_p`` within 0-1 and no
whitespace-only stop sequences. Errors use Anthropic's shape
``{"type": "error", "error": {"type", "message"}}``.

Answers are deterministic like the OpenAI side's. With ``tools`` and a ``tool_choice`` other than
``none``, a turn that does not end in tool results is answered with a ``tool_use`` per tool (only
the first when ``disable_parallel_tool_use``, only the named one for ``{"type": "tool"}``); the
inputs are built from each tool's ``input_schema``. ``output_config.format`` of type
``json_schema`` gets a JSON text built from the schema. The directive of
:mod:`workers.fake_upstream` works here too; ``cached_tokens`` becomes
``cache_read_input_tokens`` and ``cache_write_tokens`` ``cache_creation_input_tokens``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from workers.fake_upstream import (
    TOKENS_PER_IMAGE,
    TOKENS_PER_MESSAGE,
    Directive,
    Json,
    _Answer,
    _ApiError,
    _json_answer,
    _text_tokens,
    _wanted_completion_tokens,
    _words,
)

CONTEXT_WINDOW_TOKENS = 200_000
IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
TOP_LEVEL_FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
    "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier",
    "output_config", "container", "mcp_servers",
})
STREAM_PIECES = 4
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 529: "overloaded_error",
}


def api_key_of(request: Request) -> str | None:
    return request.headers.get("x-api-key") or None


def render_error(error: _ApiError) -> Response:
    kind = _ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else
                            "invalid_request_error")
    if error.error_type not in ("invalid_request_error", "server_error", "requests"):
        kind = error.error_type  # a scripted failure may name its own type
    body = {"type": "error", "error": {"type": kind, "message": error.message}}
    return Response(orjson.dumps(body), error.status, error.headers,
                    media_type="application/json")


def _invalid(message: str) -> _ApiError:
    return _ApiError(400, message)


# --- what the directive may hide in ------------------------------------------------------------


def message_texts(payload: Json) -> Iterator[str]:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return
    for message in messages:
        if isinstance(message, dict):
            yield from _block_texts(message.get("content"))


def _block_texts(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                text = block.get("text")
                if isinstance(text, str):
                    yield text
            elif isinstance(block, dict) and block.get("type") == "tool_result":
                yield from _block_texts(block.get("content"))


# --- validation --------------------------------------------------------------------------------


def _validate(payload: Json) -> None:
    extra = sorted(set(payload) - TOP_LEVEL_FIELDS)
    if extra:
        raise _invalid(f"{extra[0]}: Extra inputs are not permitted")
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise _invalid("model: Field required")
    max_tokens = payload.get("max_tokens")
    if max_tokens is None:
        raise _invalid("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _invalid("max_tokens: Input should be a valid integer greater than or equal to 1")
    _check_range(payload, "temperature")
    _check_range(payload, "top_p")
    _check_stop_sequences(payload.get("stop_sequences"))
    _check_system(payload.get("system"))
    tool_names = _check_tools(payload.get("tools"))
    _check_tool_choice(payload.get("tool_choice"), tool_names)
    _check_output_config(payload.get("output_config"))
    _check_messages(payload.get("messages"))


def _check_range(payload: Json, name: str) -> None:
    value = payload.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise _invalid(f"{name}: Input should be less than or equal to 1")


def _check_stop_sequences(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _invalid("stop_sequences: Input should be a valid list of strings")
    if any(not s.strip() for s in value):
        raise _invalid("stop_sequences: each stop sequence must contain non-whitespace")


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise _invalid("system: Input should be a valid string or list of text blocks")
    for index, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _invalid(f"system.{index}: system blocks must be of type 'text'")
        _check_text(block, f"system.{index}")


def _check_text(block: Json, where: str) -> None:
    text = block.get("text")
    if not isinstance(text, str):
        raise _invalid(f"{where}.text: Field required")
    if not text:
        raise _invalid(f"{where}: text content blocks must be non-empty")
    if not text.strip():
        raise _invalid(f"{where}: text content blocks must contain non-whitespace text")


def _check_tools(tools: Any) -> set[str]:
    if tools is None:
        return set()
    if not isinstance(tools, list):
        raise _invalid("tools: Input should be a valid list")
    names: set[str] = set()
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not TOOL_NAME.match(str(tool.get("name", ""))):
            raise _invalid(f"tools.{index}.name: String should match pattern "
                           f"'{TOOL_NAME.pattern}'")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise _invalid(f"tools.{index}.input_schema: input_schema must be a JSON Schema "
                           "object with type 'object'")
        extra = sorted(set(tool) - {"name", "description", "input_schema", "cache_control",
                                    "type", "strict"})
        if extra:
            raise _invalid(f"tools.{index}.{extra[0]}: Extra inputs are not permitted")
        if tool["name"] in names:
            raise _invalid(f"tools: Tool names must be unique; {tool['name']!r} repeats")
        names.add(tool["name"])
    return names


def _check_tool_choice(choice: Any, tool_names: set[str]) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise _invalid("tool_choice: Input tag does not match any of the expected tags: "
                       "'auto', 'any', 'tool', 'none'")
    if choice["type"] == "tool" and choice.get("name") not in tool_names:
        raise _invalid(f"tool_choice.name: tool {choice.get('name')!r} is not in tools")
    if not tool_names and choice["type"] in ("any", "tool"):
        raise _invalid("tool_choice: may only be specified while providing tools")
    flag = choice.get("disable_parallel_tool_use")
    if flag is not None and not isinstance(flag, bool):
        raise _invalid("tool_choice.disable_parallel_tool_use: Input should be a valid boolean")


def _check_output_config(config: Any) -> None:
    if config is None:
        return
    fmt = config.get("format") if isinstance(config, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise _invalid("output_config.format: expected {'type': 'json_schema', 'schema': {...}}")
    if not isinstance(fmt.get("schema"), dict):
        raise _invalid("output_config.format.schema: Field required")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: Field required; send at least one message")
    previous_role = None
    pending: set[str] = set()
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":
            raise _invalid(f'{where}: Unexpected role "system". The Messages API accepts a '
                           "top-level `system` parameter, not \"system\" as an input message role.")
        if role not in ("user", "assistant"):
            raise _invalid(f"{where}.role: Input should be 'user' or 'assistant'")
        if role == previous_role:
            raise _invalid(f"{where}: roles must alternate between \"user\" and \"assistant\", "
                           f"but found multiple \"{role}\" roles in a row")
        blocks = _content_blocks(message.get("content"), where, role)
        _check_tool_pairing(blocks, pending, where)
        pending = {b["id"] for b in blocks if b.get("type") == "tool_use"}
        previous_role = role
    if pending:
        raise _invalid(f"messages.{len(messages) - 1}: tool_use ids were found without "
                       f"tool_result blocks after them: {sorted(pending)}")


def _content_blocks(content: Any, where: str, role: str) -> list[Json]:
    if isinstance(content, str):
        if not content.strip():
            raise _invalid(f"{where}: text content blocks must contain non-whitespace text")
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise _invalid(f"{where}.content: Input should be a valid string or non-empty list")
    for index, block in enumerate(content):
        _check_block(block, f"{where}.content.{index}", role)
    return content


def _check_block(block: Any, where: str, role: str) -> None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        _check_text(block, where)
    elif kind == "image":
        _check_image_source(block.get("source"), where)
    elif kind == "tool_use" and role == "assistant":
        if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            raise _invalid(f"{where}: tool_use blocks need an id and a name")
        if not isinstance(block.get("input"), dict):
            raise _invalid(f"{where}.input: Input should be a valid dictionary")
    elif kind == "tool_result" and role == "user":
        if not isinstance(block.get("tool_use_id"), str):
            raise _invalid(f"{where}.tool_use_id: Field required")
        _check_tool_result_content(block.get("content"), where)
    else:
        raise _invalid(f"{where}.type: {kind!r} blocks are not allowed in a {role} message")


def _check_image_source(source: Any, where: str) -> None:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        if source.get("media_type") not in IMAGE_MEDIA_TYPES:
            raise _invalid(f"{where}.source.media_type: Input should be one of "
                           f"{', '.join(sorted(IMAGE_MEDIA_TYPES))}")
        if not isinstance(source.get("data"), str) or not source["data"]:
            raise _invalid(f"{where}.source.data: Field required")
    elif kind == "url":
        if not str(source.get("url", "")).startswith(("http://", "https://")):
            raise _invalid(f"{where}.source.url: Input should be an http(s) URL")
    else:
        raise _invalid(f"{where}.source: Input tag {kind!r} does not match any of the expected "
                       "tags: 'base64', 'url'")


def _check_tool_result_content(content: Any, where: str) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _invalid(f"{where}.content: Input should be a valid string or list")
    for index, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") not in ("text", "image"):
            raise _invalid(f"{where}.content.{index}: only text and image blocks are allowed")
        if block["type"] == "text":
            _check_text(block, f"{where}.content.{index}")


def _check_tool_pairing(blocks: list[Json], pending: set[str], where: str) -> None:
    results = [b for b in blocks if b.get("type") == "tool_result"]
    if pending:
        answered = {b.get("tool_use_id") for b in results}
        missing = pending - answered
        if missing:
            raise _invalid(f"{where}: tool_use ids were found without tool_result blocks "
                           f"immediately after: {sorted(missing)}. Each tool_use block must have "
                           "a corresponding tool_result block in the next message.")
        first = [b.get("type") for b in blocks[: len(results)]]
        if set(first) != {"tool_result"}:
            raise _invalid(f"{where}: tool_result blocks must come first in the content")
    for block in results:
        if block.get("tool_use_id") not in pending:
            raise _invalid(f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                           f"{block.get('tool_use_id')}. Each `tool_result` block must have a "
                           "corresponding `tool_use` block in the previous message.")


# --- answers -----------------------------------------------------------------------------------


def build_message(payload: Json, directive: Directive | None) -> _Answer:
    """Validate like the real API, then answer deterministically from a sha256 of the input."""
    _validate(payload)
    prompt = _prompt_tokens(payload)
    if prompt > CONTEXT_WINDOW_TOKENS:
        raise _invalid(f"prompt is too long: {prompt} tokens > {CONTEXT_WINDOW_TOKENS} maximum")
    digest = hashlib.sha256(orjson.dumps(
        [payload.get("system"), payload["messages"]], option=orjson.OPT_SORT_KEYS
    )).digest()
    content, output_tokens, stop_reason = _content(payload, digest, directive)
    message = {
        "id": f"msg_fake{secrets.token_hex(12)}", "type": "message", "role": "assistant",
        "model": payload["model"], "content": content, "stop_reason": stop_reason,
        "stop_sequence": None, "usage": _usage(prompt, output_tokens, directive),
    }
    if payload.get("stream") is True:
        return _stream(message)
    return _json_answer(message)


def _prompt_tokens(payload: Json) -> int:
    system = payload.get("system")
    total = sum(_text_tokens(t) for t in _block_texts(system)) if system else 0
    for message in payload["messages"]:
        total += TOKENS_PER_MESSAGE + sum(_text_tokens(t) for t in _block_texts(message["content"]))
        if isinstance(message["content"], list):
            total += TOKENS_PER_IMAGE * sum(1 for b in message["content"] if b["type"] == "image")
    return total


def _content(payload: Json, digest: bytes, directive: Directive | None
             ) -> tuple[list[Json], int, str]:
    if directive is not None and directive.echo:
        return [{"type": "text", "text": orjson.dumps(payload).decode()}], 1, "end_turn"
    tools = _tools_to_call(payload)
    if tools:
        blocks = [_tool_use(tool, digest, n) for n, tool in enumerate(tools)]
        return blocks, sum(_text_tokens(orjson.dumps(b["input"]).decode()) for b in blocks), \
            "tool_use"
    wanted = _wanted_completion_tokens(digest, directive)
    tokens = min(wanted, payload["max_tokens"])
    text = _words(digest, tokens)
    fmt = (payload.get("output_config") or {}).get("format")
    if fmt is not None:
        text = orjson.dumps(value_for_schema(fmt["schema"], text)).decode()
    if not text:
        return [], tokens, "max_tokens"
    return [{"type": "text", "text": text}], tokens, "max_tokens" if tokens < wanted else "end_turn"


def _tools_to_call(payload: Json) -> list[Json]:
    tools = payload.get("tools") or []
    choice = payload.get("tool_choice") or {"type": "auto"}
    last = payload["messages"][-1]
    answered = isinstance(last["content"], list) and any(
        b.get("type") == "tool_result" for b in last["content"])
    if not tools or choice["type"] == "none" or (answered and choice["type"] == "auto"):
        return []
    if choice["type"] == "tool":
        return [t for t in tools if t["name"] == choice["name"]]
    return tools[:1] if choice.get("disable_parallel_tool_use") else list(tools)


def _tool_use(tool: Json, digest: bytes, number: int) -> Json:
    seed = hashlib.sha256(digest + tool["name"].encode()).hexdigest()
    return {"type": "tool_use", "id": f"toolu_fake{seed[:16]}{number}", "name": tool["name"],
            "input": value_for_schema(tool["input_schema"], f"fake-{seed[:8]}")}


def value_for_schema(schema: Json, text: str) -> Any:
    """A value of the schema's type: objects fill every property, strings take ``text``."""
    kind = schema.get("type")
    if schema.get("enum"):
        return schema["enum"][0]
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: value_for_schema(sub, text) for name, sub in props.items()}
    if kind == "array":
        return [value_for_schema(schema.get("items") or {"type": "string"}, text)]
    if kind == "integer":
        return len(text)
    if kind == "number":
        return len(text) / 2
    if kind == "boolean":
        return True
    return text


def _usage(prompt: int, output_tokens: int, directive: Directive | None) -> Json:
    read = min(directive.cached_tokens or 0, prompt) if directive else 0
    write = min(directive.cache_write_tokens or 0, prompt - read) if directive else 0
    return {
        "input_tokens": prompt - read - write, "output_tokens": output_tokens,
        "cache_read_input_tokens": read, "cache_creation_input_tokens": write,
    }


def _stream(message: Json) -> _Answer:
    """The event sequence of a streamed message, as Anthropic sends it."""
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**message["usage"], "output_tokens": 1}}
    events = [_event("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message["content"]):
        events.extend(_block_events(index, block))
    events.append(_event("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": message["usage"]["output_tokens"]},
    }))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return _Answer(tuple(events), media_type="text/event-stream")


def _block_events(index: int, block: Json) -> Iterator[bytes]:
    if block["type"] == "text":
        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": {"type": "text", "text": ""}})
        for piece in _pieces(block["text"]):
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                 "delta": {"type": "text_delta", "text": piece}})
    else:
        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": {**block, "input": {}}})
        for piece in _pieces(orjson.dumps(block["input"]).decode()):
            delta = {"type": "input_json_delta", "partial_json": piece}
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                 "delta": delta})
    yield _event("content_block_stop", {"type": "content_block_stop", "index": index})


def _pieces(text: str) -> Iterator[str]:
    size = max(1, -(-len(text) // STREAM_PIECES))
    for start in range(0, len(text), size):
        yield text[start : start + size]


def _event(name: str, data: Json) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

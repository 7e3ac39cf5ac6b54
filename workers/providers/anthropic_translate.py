"""OpenAI chat completions to Anthropic Messages and back, as pure functions.

Kept apart from the HTTP client so the API can refuse, before anything is queued, a request
that an Anthropic model cannot serve (:func:`unsupported_reason`), and so the translation
can be tested without a network. Nothing is changed silently: a parameter with no faithful
Anthropic equivalent raises :class:`UnsupportedRequest`, which the API answers with 400.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson

Json = dict[str, Any]
DATA_URL = re.compile(r"^data:(?P<media>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)$", re.DOTALL)
# Accepted and passed on, or meaningless for Anthropic and harmless to drop (no output change).
IGNORED = frozenset({"model", "stream", "stream_options", "store", "service_tier",
                     "parallel_tool_calls", "metadata"})
# Accepted only at their neutral value, because Anthropic has no equivalent.
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}


class UnsupportedRequest(ValueError):
    """The request cannot be served by an Anthropic model without changing its meaning."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


def unsupported_reason(request: Json) -> UnsupportedRequest | None:
    """The reason an Anthropic model cannot serve ``request``, or None when it can."""
    try:
        to_messages_request(request, model="check", default_max_tokens=1)
    except UnsupportedRequest as exc:
        return exc
    return None


# --- request -----------------------------------------------------------------------------------


def to_messages_request(request: Json, *, model: str, default_max_tokens: int) -> Json:
    """The Anthropic Messages body for an OpenAI chat completions body."""
    _refuse_unsupported(request)
    system, messages = _split_messages(request.get("messages") or [])
    body: Json = {"model": model, "messages": messages,
                  "max_tokens": _max_tokens(request, default_max_tokens)}
    if system:
        body["system"] = system
    _sampling(request, body)
    _tools(request, body)
    _response_format(request.get("response_format"), body)
    if isinstance(request.get("user"), str) and request["user"]:
        body["metadata"] = {"user_id": request["user"]}
    return body


def _refuse_unsupported(request: Json) -> None:
    for name, neutral in NEUTRAL.items():
        value = request.get(name)
        if value is not None and value != neutral:
            raise UnsupportedRequest(
                f"{name}={value!r} is not supported by Anthropic models (the route's provider); "
                f"send {name}={neutral!r} or leave it out, or route the capability to an "
                "OpenAI model", param=name)
    for name in ("top_logprobs", "logit_bias", "seed", "audio", "modalities", "prediction",
                 "reasoning_effort", "functions", "function_call", "web_search_options"):
        if request.get(name) is not None:
            raise UnsupportedRequest(
                f"{name} is not supported by Anthropic models (the route's provider); remove "
                "it or route the capability to an OpenAI model", param=name)


def _max_tokens(request: Json, default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UnsupportedRequest(f"{name} must be a positive integer", param=name)
            return value
    return default


def _sampling(request: Json, body: Json) -> None:
    temperature = request.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, int | float) or not 0 <= temperature <= 1:
            raise UnsupportedRequest(
                f"temperature={temperature!r}: Anthropic models accept 0 to 1 (OpenAI's range "
                "is 0 to 2); send a value within 0-1", param="temperature")
        body["temperature"] = temperature
    if request.get("top_p") is not None:
        body["top_p"] = request["top_p"]
    stop = request.get("stop")
    sequences = [stop] if isinstance(stop, str) else list(stop or [])
    # Anthropic refuses whitespace-only stop sequences; they could never end a reply anyway.
    kept = [s for s in sequences if isinstance(s, str) and s.strip()]
    if kept:
        body["stop_sequences"] = kept


def _tools(request: Json, body: Json) -> None:
    tools = request.get("tools")
    if tools:
        body["tools"] = [_tool(tool, index) for index, tool in enumerate(tools)]
    choice = _tool_choice(request.get("tool_choice"))
    if request.get("parallel_tool_calls") is False and tools:
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None and (tools or choice["type"] == "none"):
        body["tool_choice"] = choice


def _tool(tool: Any, index: int) -> Json:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(
            function, dict) or not function.get("name"):
        raise UnsupportedRequest(
            f"tools[{index}] must be {{'type': 'function', 'function': {{'name', ...}}}}; other "
            "tool types are not supported by Anthropic models", param=f"tools[{index}]")
    converted: Json = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        converted["description"] = function["description"]
    return converted


def _tool_choice(choice: Any) -> Json | None:
    if choice is None:
        return None
    simple = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}
    if isinstance(choice, str) and choice in simple:
        return dict(simple[choice])
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if isinstance(name, str) and name:
            return {"type": "tool", "name": name}
    raise UnsupportedRequest(
        f"tool_choice {choice!r} is not one of 'auto', 'none', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")


def _response_format(fmt: Any, body: Json) -> None:
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise UnsupportedRequest("response_format.json_schema.schema must be a JSON Schema "
                                     "object", param="response_format")
        body["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        return
    raise UnsupportedRequest(
        "response_format json_object is not supported by Anthropic models; send "
        "{'type': 'json_schema', 'json_schema': {'name', 'schema'}} instead",
        param="response_format")


# --- messages ----------------------------------------------------------------------------------


def _split_messages(messages: list[Any]) -> tuple[list[Json], list[Json]]:
    """System and developer texts, in order, and the turns merged so roles alternate."""
    system: list[Json] = []
    turns: list[Json] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_text_blocks(message.get("content"), f"messages[{index}].content"))
            continue
        role, blocks = _turn(message, index)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = _merge(turns[-1]["content"], blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise UnsupportedRequest("messages holds no user or assistant content with text, images "
                                 "or tool calls; Anthropic needs at least one", param="messages")
    return system, turns


def _merge(before: list[Json], after: list[Json]) -> list[Json]:
    # Tool results must lead a user turn; a user's text that follows them goes after.
    results = [b for b in before + after if b["type"] == "tool_result"]
    rest = [b for b in before + after if b["type"] != "tool_result"]
    return results + rest


def _turn(message: Json, index: int) -> tuple[str, list[Json]]:
    role = message.get("role")
    where = f"messages[{index}]"
    if role == "user":
        return "user", _user_blocks(message.get("content"), f"{where}.content")
    if role == "assistant":
        return "assistant", _assistant_blocks(message, where)
    if role == "tool":
        return "user", [_tool_result(message, where)]
    raise UnsupportedRequest(f"{where}.role {role!r} is not supported by Anthropic models; use "
                             "system, developer, user, assistant or tool", param=f"{where}.role")


def _text_blocks(content: Any, where: str) -> list[Json]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content.strip() else []
    blocks: list[Json] = []
    for index, part in enumerate(content or []):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise UnsupportedRequest(f"{where}[{index}] must be a text part here",
                                     param=f"{where}[{index}]")
        text = part.get("text")
        if isinstance(text, str) and text.strip():
            blocks.append({"type": "text", "text": text})
    return blocks


def _user_blocks(content: Any, where: str) -> list[Json]:
    if isinstance(content, str) or content is None:
        return _text_blocks(content, where)
    blocks: list[Json] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.extend(_text_blocks([part], where))
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), f"{where}[{index}]"))
        else:
            raise UnsupportedRequest(
                f"{where}[{index}] has type {kind!r}; Anthropic models take text and "
                "image_url parts here", param=f"{where}[{index}].type")
    return blocks


def _image(image_url: Any, where: str) -> Json:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise UnsupportedRequest(f"{where}.image_url.url is required", param=f"{where}.image_url")
    match = DATA_URL.match(url)
    if match:
        source = {"type": "base64", "media_type": match["media"], "data": match["data"]}
    elif url.startswith(("http://", "https://")):
        source = {"type": "url", "url": url}
    else:
        raise UnsupportedRequest(
            f"{where}.image_url.url must be a base64 data URL (data:image/png;base64,...) or an "
            "http(s) URL", param=f"{where}.image_url.url")
    return {"type": "image", "source": source}


def _assistant_blocks(message: Json, where: str) -> list[Json]:
    blocks = _text_blocks(message.get("content"), f"{where}.content")
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            raise UnsupportedRequest(
                f"{where}.tool_calls[{index}].function.arguments is not valid JSON",
                param=f"{where}.tool_calls[{index}].function.arguments") from None
        if not isinstance(arguments, dict):
            arguments = {"value": arguments}
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                       "input": arguments})
    return blocks


def _tool_result(message: Json, where: str) -> Json:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise UnsupportedRequest(f"{where}.tool_call_id is required on a tool message",
                                 param=f"{where}.tool_call_id")
    result: Json = {"type": "tool_result", "tool_use_id": call_id}
    blocks = _text_blocks(message.get("content"), f"{where}.content")
    if blocks:
        result["content"] = blocks
    return result


# --- response ----------------------------------------------------------------------------------


def to_chat_completion(message: Json) -> Json:
    """The OpenAI chat completion for an Anthropic Messages response."""
    text = "".join(b.get("text", "") for b in message.get("content") or []
                   if b.get("type") == "text")
    calls = [
        {"id": b["id"], "type": "function",
         "function": {"name": b["name"], "arguments": orjson.dumps(b.get("input") or {}).decode()}}
        for b in message.get("content") or [] if b.get("type") == "tool_use"
    ]
    reply: Json = {"role": "assistant", "content": text or None, "refusal": None}
    if calls:
        reply["tool_calls"] = calls
    stop = message.get("stop_reason")
    return {
        "id": f"chatcmpl-{message.get('id', '')}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": message.get("model"),
        "choices": [{"index": 0, "message": reply, "logprobs": None,
                     "finish_reason": FINISH_REASONS.get(str(stop), "stop")}],
        "usage": chat_usage(message.get("usage") or {}),
    }


def chat_usage(usage: Json) -> Json:
    """OpenAI usage: prompt tokens include cache reads and writes, as OpenAI counts them."""
    fresh = int(usage.get("input_tokens") or 0)
    read = int(usage.get("cache_read_input_tokens") or 0)
    write = int(usage.get("cache_creation_input_tokens") or 0)
    output = int(usage.get("output_tokens") or 0)
    return {
        "prompt_tokens": fresh + read + write,
        "completion_tokens": output,
        "total_tokens": fresh + read + write + output,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
    }

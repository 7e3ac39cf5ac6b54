"""The Anthropic provider against the fake Anthropic upstream over real HTTP.

The fake enforces the real API's validation rules, so a wrong translation fails here as it
would in production. Its ``echo`` directive answers with the body it received, which lets a
test see exactly what the translation sent.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from broker.devstack import LocalStack
from broker.routing import load_deployment
from broker.settings import DEFAULTS_DIR
from workers.errors import PermanentProviderError, RetryableProviderError
from workers.providers.anthropic import AnthropicProvider
from workers.providers.base import Credential, ProviderResponse

MODEL = "claude-sonnet-4-5"
PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
           "AAAABJRU5ErkJggg==")
ECHO = '<<fake:{"echo": true}>>'
CLICK = {"type": "function", "function": {
    "name": "click", "description": "Click an element",
    "parameters": {"type": "object", "properties": {"selector": {"type": "string"}},
                   "required": ["selector"]}}}
SCROLL = {"type": "function", "function": {
    "name": "scroll",
    "parameters": {"type": "object", "properties": {"dy": {"type": "integer"}}}}}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("fake") / "logs")
    with stack:
        stack.start_upstream()
        yield stack


@pytest.fixture(scope="module")
def provider() -> Iterator[AnthropicProvider]:
    deployment = load_deployment(DEFAULTS_DIR / "catalog.toml", DEFAULTS_DIR / "routing.toml")
    client = AnthropicProvider(catalog=deployment.catalog, connect_timeout_s=5,
                               read_timeout_s=30, max_connections=4)
    yield client
    client.close()


@pytest.fixture
def call(fake: LocalStack, provider: AnthropicProvider) -> Any:
    credential = Credential("molar-managed", "anthropic", fake.upstream_url, fake.upstream_key)

    def run(request: dict[str, Any], model: str = MODEL) -> ProviderResponse:
        return provider.call("chat", request, model=model, credential=credential, deadline_s=10)

    return run


def sent(response: ProviderResponse) -> dict[str, Any]:
    """The Anthropic body the fake received (needs the echo directive in the request)."""
    body: dict[str, Any] = json.loads(response.body["choices"][0]["message"]["content"])
    return body


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def test_system_and_developer_messages_are_gathered_in_order_into_system(call: Any) -> None:
    body = sent(call({"messages": [
        {"role": "system", "content": "first rule"}, user(ECHO),
        {"role": "developer", "content": [{"type": "text", "text": "second rule"}]},
        {"role": "assistant", "content": "ok"}, user("go on"),
    ]}))
    assert body["system"] == [{"type": "text", "text": "first rule"},
                              {"type": "text", "text": "second rule"}]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]


def test_string_content_and_text_parts_become_text_blocks(call: Any) -> None:
    body = sent(call({"messages": [user([{"type": "text", "text": ECHO},
                                         {"type": "text", "text": "second part"}])]}))
    assert body["messages"] == [user([{"type": "text", "text": ECHO},
                                      {"type": "text", "text": "second part"}])]


def test_empty_and_blank_text_parts_are_dropped_not_sent(call: Any) -> None:
    body = sent(call({"messages": [
        {"role": "system", "content": ""},
        user([{"type": "text", "text": ""}, {"type": "text", "text": ECHO},
              {"type": "text", "text": "  \n"}]),
        {"role": "assistant", "content": ""}, user("again"),
    ]}))
    assert "system" not in body
    # The empty assistant turn is gone, so the two user turns merge to keep roles alternating.
    assert body["messages"] == [user([{"type": "text", "text": ECHO},
                                      {"type": "text", "text": "again"}])]


def test_image_url_parts_from_data_urls_and_http_urls_become_image_blocks(call: Any) -> None:
    body = sent(call({"messages": [user([
        {"type": "text", "text": ECHO},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/shot.webp",
                                            "detail": "high"}},
    ])]}))
    blocks = body["messages"][0]["content"]
    assert blocks[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                     "data": PNG_B64}}
    assert blocks[2] == {"type": "image", "source": {"type": "url",
                                                     "url": "https://example.com/shot.webp"}}


def test_an_image_of_a_type_anthropic_refuses_fails_with_the_providers_message(call: Any) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        call({"messages": [user([{"type": "text", "text": "look"}, {
            "type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}}])]})
    assert caught.value.status == 400
    assert "media_type" in caught.value.message


def test_parallel_tool_calls_and_their_results_make_a_valid_round_trip(call: Any) -> None:
    request = {"messages": [user("open the menu")], "tools": [CLICK, SCROLL],
               "tool_choice": "required"}
    first = call(request).body["choices"][0]
    assert first["finish_reason"] == "tool_calls"
    calls = first["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["click", "scroll"]
    assert json.loads(calls[0]["function"]["arguments"])["selector"]

    request["messages"] += [
        first["message"],
        *({"role": "tool", "tool_call_id": c["id"], "content": f"done {c['id']}"} for c in calls),
        user(ECHO),
    ]
    request["tool_choice"] = "auto"
    body = sent(call(request))
    assistant, results = body["messages"][1], body["messages"][2]
    assert [b["type"] for b in assistant["content"]] == ["tool_use", "tool_use"]
    assert assistant["content"][0]["input"] == json.loads(calls[0]["function"]["arguments"])
    assert [b["type"] for b in results["content"]] == ["tool_result", "tool_result", "text"]
    done = [{"type": "text", "text": f"done {calls[1]['id']}"}]
    assert results["content"][1] == {"type": "tool_result", "tool_use_id": calls[1]["id"],
                                     "content": done}
    assert body["tools"][0] == {"name": "click", "description": "Click an element",
                                "input_schema": CLICK["function"]["parameters"]}
    assert body["tool_choice"] == {"type": "auto"}


@pytest.mark.parametrize(("tool_choice", "parallel", "expected"), [
    pytest.param("auto", None, {"type": "auto"}, id="auto"),
    pytest.param("none", None, {"type": "none"}, id="none"),
    pytest.param("required", None, {"type": "any"}, id="required-is-any"),
    pytest.param({"type": "function", "function": {"name": "scroll"}}, None,
                 {"type": "tool", "name": "scroll"}, id="named-function"),
    pytest.param(None, False, {"type": "auto", "disable_parallel_tool_use": True},
                 id="no-parallel-calls"),
])
def test_tool_choice_maps_to_anthropics_form(call: Any, tool_choice: Any, parallel: Any,
                                             expected: dict[str, Any]) -> None:
    request: dict[str, Any] = {"messages": [user("x")], "tools": [CLICK, SCROLL]}
    if tool_choice is not None:
        request["tool_choice"] = tool_choice
    if parallel is not None:
        request["parallel_tool_calls"] = parallel
    choice = call(request).body["choices"][0]
    names = [c["function"]["name"] for c in choice["message"].get("tool_calls") or []]
    assert names == {"auto": ["click", "scroll"], "none": [], "required-is-any":
                     ["click", "scroll"]}.get(str(tool_choice), names)
    if parallel is False:
        assert names == ["click"]
    request["messages"] = [user(ECHO)]
    assert sent(call(request))["tool_choice"] == expected


@pytest.mark.parametrize(("fields", "expected"), [
    pytest.param({"max_tokens": 77}, 77, id="max_tokens"),
    pytest.param({"max_completion_tokens": 55, "max_tokens": 9}, 55,
                 id="max_completion_tokens-wins"),
    pytest.param({}, 64000, id="catalog-default"),
])
def test_max_tokens_comes_from_the_request_or_the_catalog(call: Any, fields: dict[str, Any],
                                                           expected: int) -> None:
    assert sent(call({"messages": [user(ECHO)], **fields}))["max_tokens"] == expected


def test_sampling_parameters_pass_and_blank_stop_sequences_are_dropped(call: Any) -> None:
    body = sent(call({"messages": [user(ECHO)], "temperature": 0.2, "top_p": 0.9,
                      "stop": ["\n", " ", "END"], "user": "u-1"}))
    assert (body["temperature"], body["top_p"]) == (0.2, 0.9)
    assert body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "u-1"}
    assert sent(call({"messages": [user(ECHO)], "stop": "  "})).get("stop_sequences") is None


def test_a_json_schema_response_format_yields_json_that_follows_the_schema(call: Any) -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"},
                                               "steps": {"type": "array",
                                                         "items": {"type": "integer"}}},
              "required": ["title", "steps"], "additionalProperties": False}
    request = {"messages": [user("plan")], "response_format": {
        "type": "json_schema", "json_schema": {"name": "plan", "schema": schema}}}
    content = json.loads(call(request).body["choices"][0]["message"]["content"])
    assert set(content) == {"title", "steps"}
    assert all(isinstance(step, int) for step in content["steps"])
    request["messages"] = [user(ECHO)]
    assert sent(call(request))["output_config"] == {
        "format": {"type": "json_schema", "schema": schema}}


@pytest.mark.parametrize(("request_fields", "finish_reason"), [
    pytest.param({}, "stop", id="end_turn-is-stop"),
    pytest.param({"max_tokens": 2}, "length", id="max_tokens-is-length"),
    pytest.param({"tools": [CLICK], "tool_choice": "required"}, "tool_calls",
                 id="tool_use-is-tool_calls"),
])
def test_stop_reasons_map_to_finish_reason(call: Any, request_fields: dict[str, Any],
                                           finish_reason: str) -> None:
    response = call({"messages": [user("hello")], **request_fields})
    assert response.body["choices"][0]["finish_reason"] == finish_reason


def test_usage_counts_cache_reads_and_writes_as_prompt_tokens(call: Any) -> None:
    text = '<<fake:{"cached_tokens": 30, "cache_write_tokens": 20}>> ' + "word " * 200
    response = call({"messages": [user(text)], "max_tokens": 5})
    usage = response.body["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 30, "cache_write_tokens": 20}
    assert usage["prompt_tokens"] > 50
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] == \
        usage["prompt_tokens"] + 5
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.cached_input_tokens,
            response.usage.output_tokens) == (usage["prompt_tokens"], 30, 5)


@pytest.mark.parametrize(("fields", "param"), [
    pytest.param({"n": 2}, "n", id="n-above-1"),
    pytest.param({"temperature": 1.5}, "temperature", id="temperature-above-1"),
    pytest.param({"logprobs": True}, "logprobs", id="logprobs"),
    pytest.param({"response_format": {"type": "json_object"}}, "response_format",
                 id="json-object-mode"),
    pytest.param({"seed": 7}, "seed", id="seed"),
])
def test_what_anthropic_cannot_serve_is_refused_not_changed(call: Any, fields: dict[str, Any],
                                                           param: str) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        call({"messages": [user("x")], **fields})
    assert caught.value.code == "unsupported_parameter"
    assert param in caught.value.message


def test_a_prompt_over_the_context_window_is_context_length_exceeded(call: Any) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        call({"messages": [user("abcd" * 201_000)]})
    assert caught.value.code == "context_length_exceeded"
    assert "prompt is too long" in caught.value.message


def test_provider_errors_keep_the_message_redacted_and_the_retry_hint(
        call: Any, fake: LocalStack) -> None:
    scenario = secrets.token_hex(4)
    directive = {"scenario": scenario, "fail": [{"status": 429, "retry_after": 3,
                                                 "echo_key": True}]}
    with pytest.raises(RetryableProviderError) as caught:
        call({"messages": [user(f"<<fake:{orjson.dumps(directive).decode()}>>")]})
    assert caught.value.status == 429
    assert caught.value.code == "provider_rate_limited"
    assert caught.value.retry_after_s == 3
    assert "Scripted failure" in caught.value.message
    # The provider client redacts the key it sent; the runner adds the other live secrets.
    assert fake.upstream_key not in caught.value.message
    assert "[REDACTED]" in caught.value.message


def test_a_bad_translation_would_be_caught_by_the_fakes_validation(fake: LocalStack) -> None:
    import httpx

    headers = {"x-api-key": fake.upstream_key, "anthropic-version": "2023-06-01"}
    bad = [
        {"model": MODEL, "messages": [user("x")]},
        {"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "s"},
                                                       user("x")]},
        {"model": MODEL, "max_tokens": 5, "messages": [user("x"), user("y")]},
        {"model": MODEL, "max_tokens": 5, "messages": [user([{"type": "text", "text": ""}])]},
        {"model": MODEL, "max_tokens": 5, "messages": [user("x")], "n": 1},
    ]
    for body in bad:
        response = httpx.post(f"{fake.upstream_url}/v1/messages", json=body, headers=headers)
        assert response.status_code == 400, body
        assert response.json()["type"] == "error"

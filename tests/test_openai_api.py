"""The OpenAI-compatible API driven by the official ``openai`` SDK against a running broker.

Real processes: fake upstream, API and a worker on Redis and PostgreSQL (one test also on the
embedded default). ``planner`` is routed to Claude by default and ``grounding_tier0`` to an
OpenAI model, so both providers are exercised through the same SDK calls.
"""

from __future__ import annotations

import base64
import json
import statistics
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from sqlalchemy import select

from broker.completion_wait import RECHECK_INTERVAL_S
from broker.devstack import LocalStack
from broker.models import UsageEvent
from tests.conftest import SERVICE_KEY, api, stack_db, wait_job

ORG = "org_sdk"
PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
           "AAAABJRU5ErkJggg==")
CLICK = {"type": "function", "function": {
    "name": "click", "parameters": {"type": "object",
                                    "properties": {"selector": {"type": "string"}}}}}
SCROLL = {"type": "function", "function": {
    "name": "scroll", "parameters": {"type": "object",
                                     "properties": {"dy": {"type": "integer"}}}}}


@pytest.fixture(scope="module")
def stack(make_stack: Any) -> LocalStack:
    # A short attempt deadline lets the 504 case finish quickly; every other call is fast.
    stack: LocalStack = make_stack("redis-pg", env={"MOLAR_LLM_ATTEMPT_DEADLINE_S": "3"})
    stack.start_worker("worker", concurrency=16)
    return stack


def sdk(stack: LocalStack, capability: str | None = None, **headers: str) -> openai.OpenAI:
    default_headers = {"X-Molar-Org-Id": ORG, **headers}
    if capability:
        default_headers["X-Molar-Capability"] = capability
    return openai.OpenAI(base_url=stack.api_url + "/v1", api_key=SERVICE_KEY, max_retries=0,
                         timeout=60, default_headers=default_headers)


def directive(**fields: Any) -> str:
    return f"<<fake:{orjson.dumps(fields).decode()}>>"


@pytest.fixture
def client(stack: LocalStack) -> Iterator[openai.OpenAI]:
    with sdk(stack) as sdk_client:
        yield sdk_client


@pytest.mark.parametrize("capability", ["grounding_tier0", "planner"])
def test_a_chat_completion_answers_in_openai_shape_with_the_job_id(
        stack: LocalStack, capability: str) -> None:
    with sdk(stack, capability) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="ignored-when-the-header-names-the-capability",
            messages=[{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "name the main menu"}], max_tokens=20)
    completion = raw.parse()
    job_id = raw.headers["x-molar-job-id"]
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    with api(stack, ORG) as http:
        job = wait_job(http, job_id)
    assert job["status"] == "succeeded"
    assert job["capability"] == capability
    assert completion.model == job["route"]["model"] == raw.headers["x-molar-model"]
    assert job["usage"]["input_tokens"] == completion.usage.prompt_tokens
    assert job["usage"]["output_tokens"] == completion.usage.completion_tokens


def test_model_may_name_the_capability(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="planner", messages=[{"role": "user", "content": "plan a crawl"}])
    assert completion.model == "claude-sonnet-4-5"


def test_run_level_routing_comes_from_the_routing_header(stack: LocalStack) -> None:
    routing = {"planner": {"provider_integration_id": "molar-managed", "model": "gpt-4o-mini"}}
    with sdk(stack, "planner", **{"X-Molar-Model-Routing": json.dumps(routing)}) as client:
        completion = client.chat.completions.create(
            model="planner", messages=[{"role": "user", "content": "plan"}])
    assert completion.model == "gpt-4o-mini"


@pytest.mark.parametrize("capability", ["grounding_tier1_vlm", "planner"])
def test_vision_parts_from_data_and_http_urls_are_served(
        stack: LocalStack, capability: str) -> None:
    content = [
        {"type": "text", "text": "what is on this page?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/page.png"}},
    ]
    with sdk(stack, capability) as client:
        completion = client.chat.completions.create(
            model=capability, messages=[{"role": "user", "content": content}])
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.prompt_tokens > 2 * 85


def test_vision_parts_reach_anthropic_as_image_blocks(client: openai.OpenAI) -> None:
    content = [{"type": "text", "text": directive(echo=True)},
               {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG_B64}"}}]
    completion = client.chat.completions.create(
        model="planner", messages=[{"role": "user", "content": content}])
    sent = json.loads(completion.choices[0].message.content or "")
    assert sent["messages"][0]["content"][1]["source"] == {
        "type": "base64", "media_type": "image/jpeg", "data": PNG_B64}


def test_tools_with_parallel_calls_round_trip_through_the_broker(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "open the menu and scroll"}]
    first = client.chat.completions.create(
        model="planner", messages=messages, tools=[CLICK, SCROLL], tool_choice="required")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["click", "scroll"]  # type: ignore[union-attr]

    messages.append(choice.message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": c.id, "content": "done"} for c in calls]
    second = client.chat.completions.create(model="planner", messages=messages,
                                            tools=[CLICK, SCROLL])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content


def test_json_schema_output_follows_the_schema(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"selector": {"type": "string"},
                                               "confidence": {"type": "number"}},
              "required": ["selector", "confidence"], "additionalProperties": False}
    completion = client.chat.completions.create(
        model="planner", messages=[{"role": "user", "content": "find the login button"}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "target", "schema": schema, "strict": True}})
    parsed = json.loads(completion.choices[0].message.content or "")
    assert set(parsed) == {"selector", "confidence"}
    assert isinstance(parsed["confidence"], float)


def test_embeddings_in_float_and_base64_agree_and_honour_dimensions(
        client: openai.OpenAI, stack: LocalStack) -> None:
    floats = client.embeddings.create(model="embeddings", input=["one", "two"],
                                      encoding_format="float", dimensions=64)
    with sdk(stack) as plain:
        raw = plain.embeddings.with_raw_response.create(
            model="embeddings", input=["one", "two"], encoding_format="base64", dimensions=64)
    body = httpx.Response(200, content=raw.http_response.content).json()
    decoded = list(struct.unpack("<64f", base64.b64decode(body["data"][0]["embedding"])))
    assert len(floats.data) == 2 and len(floats.data[0].embedding) == 64
    assert decoded == pytest.approx(floats.data[0].embedding)
    assert floats.usage.prompt_tokens > 0
    with api(stack, ORG) as http:
        job = wait_job(http, raw.headers["x-molar-job-id"])
    assert job["usage"]["input_tokens"] == body["usage"]["prompt_tokens"]
    assert float(job["usage"]["cost_usd"]) > 0


def test_embeddings_take_a_string_and_token_arrays(client: openai.OpenAI) -> None:
    single = client.embeddings.create(model="embeddings", input="a string")
    tokens = client.embeddings.create(model="embeddings", input=[[1, 2, 3], [4, 5]])
    assert len(single.data) == 1
    assert [d.index for d in tokens.data] == [0, 1]
    assert tokens.usage.prompt_tokens == 5


@pytest.mark.parametrize("capability", ["grounding_tier0", "planner"])
def test_a_streamed_call_matches_the_same_call_unstreamed_and_is_metered_alike(
        stack: LocalStack, capability: str) -> None:
    messages = [{"role": "user", "content": f"stream me ({capability})"}]
    with sdk(stack, capability) as client:
        whole = client.chat.completions.with_raw_response.create(
            model=capability, messages=messages)  # type: ignore[arg-type]
        stream = client.chat.completions.with_raw_response.create(
            model=capability, messages=messages, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        chunks = list(stream.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.parse().choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.parse().usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    engine = stack_db(stack)
    with engine.connect() as conn:
        rows = conn.execute(select(UsageEvent.job_id, UsageEvent.input_tokens,
                                   UsageEvent.output_tokens, UsageEvent.cost_usd)
                            .where(UsageEvent.job_id.in_([whole.headers["x-molar-job-id"],
                                                          stream.headers["x-molar-job-id"]]))
                            ).all()
    engine.dispose()
    assert len(rows) == 2
    assert rows[0][1:] == rows[1][1:]


def test_a_stream_of_tool_calls_carries_them_in_deltas(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="planner", messages=[{"role": "user", "content": "click it"}], tools=[CLICK],
        tool_choice="required", stream=True))
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["click"]  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_models_lists_the_catalog_and_the_capability_keys(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert {"gpt-4.1", "claude-sonnet-4-5", "text-embedding-3-small"} <= ids
    assert {"planner", "embeddings", "stagehand_vlm"} <= ids


def test_without_a_capability_the_400_names_both_ways_to_give_one(
        client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4.1",
                                       messages=[{"role": "user", "content": "x"}])
    assert "X-Molar-Capability" in caught.value.message
    assert "model" in caught.value.message


def test_a_wrong_key_is_an_authentication_error(stack: LocalStack) -> None:
    with openai.OpenAI(base_url=stack.api_url + "/v1", api_key="wrong", max_retries=0,
                       default_headers={"X-Molar-Org-Id": ORG}) as client, \
            pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_n_above_one_on_an_anthropic_route_is_a_400_that_says_so(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="planner", n=2,
                                       messages=[{"role": "user", "content": "x"}])
    assert "not supported by Anthropic" in caught.value.message
    assert caught.value.code == "unsupported_parameter"


def test_an_over_long_prompt_is_a_400_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="planner",
                                       messages=[{"role": "user", "content": "word " * 170_000}])
    assert caught.value.code == "context_length_exceeded"


@pytest.mark.parametrize(("status", "exception", "answered"), [
    pytest.param(404, openai.NotFoundError, 404, id="404-not-found"),
    pytest.param(409, openai.ConflictError, 409, id="409-conflict"),
    pytest.param(422, openai.UnprocessableEntityError, 422, id="422-unprocessable"),
    pytest.param(429, openai.RateLimitError, 429, id="429-rate-limited"),
    pytest.param(500, openai.InternalServerError, 502, id="upstream-500-is-502"),
    pytest.param(401, openai.InternalServerError, 502, id="upstream-401-is-502"),
])
@pytest.mark.parametrize("capability", ["grounding_tier0", "planner"])
def test_provider_errors_map_to_the_sdks_exception_with_the_providers_message(
        stack: LocalStack, capability: str, status: int, exception: type[Exception],
        answered: int) -> None:
    text = directive(fail=[{"status": status, "message": f"upstream says {status}"}])
    with sdk(stack, capability) as client, pytest.raises(exception) as caught:
        client.chat.completions.create(model=capability,
                                       messages=[{"role": "user", "content": text}])
    error = caught.value
    assert isinstance(error, openai.APIStatusError)
    assert error.status_code == answered
    assert f"upstream says {status}" in error.message
    assert error.response.headers["x-molar-job-id"].startswith("job_")


def test_a_provider_that_never_answers_is_a_504(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="grounding_tier0", messages=[
            {"role": "user", "content": directive(fail=[{"hang": True}])}])
    assert caught.value.status_code == 504


def test_a_wait_that_runs_out_is_a_504_and_the_job_can_be_polled(stack: LocalStack) -> None:
    with sdk(stack, "grounding_tier0", **{"X-Molar-Timeout-S": "0.5"}) as client, \
            pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="grounding_tier0", messages=[
            {"role": "user", "content": directive(latency_ms=2000)}])
    assert caught.value.status_code == 504
    job_id = caught.value.response.headers["x-molar-job-id"]
    assert f"GET /v1/jobs/{job_id}" in caught.value.message
    with api(stack, ORG) as http:
        assert wait_job(http, job_id)["status"] == "succeeded"


def test_a_spent_cap_is_a_402(stack: LocalStack) -> None:
    org = "org_capped"
    with api(stack) as http:
        response = http.put(f"/v1/orgs/{org}/settings", json={"spend_cap_usd": "0"})
        assert response.status_code == 200, response.text
    with openai.OpenAI(base_url=stack.api_url + "/v1", api_key=SERVICE_KEY, max_retries=0,
                       default_headers={"X-Molar-Org-Id": org}) as client, \
            pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="planner",
                                       messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 402
    assert caught.value.code == "spend_cap_exceeded"
    assert caught.value.body["message"].startswith("org LLM spend cap exceeded")


def test_the_embedded_default_answers_through_its_sql_fallback(make_stack: Any) -> None:
    stack: LocalStack = make_stack("embedded")
    stack.start_worker("embedded-worker", concurrency=4)
    with sdk(stack) as client:
        completion = client.chat.completions.create(
            model="planner", messages=[{"role": "user", "content": "hello"}])
        vectors = client.embeddings.create(model="embeddings", input="hello")
    assert completion.choices[0].message.content
    assert vectors.data[0].embedding


def test_the_wait_is_woken_by_the_announcement_not_by_the_periodic_recheck(
        client: openai.OpenAI) -> None:
    # Without the announcement a Redis-backed wait would first look again after
    # RECHECK_INTERVAL_S (2 s); a median well below it shows the worker's announcement woke it.
    durations_s = []
    for index in range(5):
        started = time.perf_counter()
        client.chat.completions.create(model="grounding_tier0",
                                       messages=[{"role": "user", "content": f"ping {index}"}])
        durations_s.append(time.perf_counter() - started)
    assert statistics.median(durations_s) < RECHECK_INTERVAL_S * 0.75


@pytest.mark.parametrize(("headers", "param"), [
    pytest.param({"X-Molar-Model-Routing": "not json"}, "X-Molar-Model-Routing",
                 id="routing-not-json"),
    pytest.param({"X-Molar-Model-Routing": '{"planner": {"provider_integration_id": '
                  '"molar-managed", "model": "gpt-9"}}'}, "X-Molar-Model-Routing.planner.model",
                 id="routing-unknown-model"),
    pytest.param({"X-Molar-Capability": "planer"}, "X-Molar-Capability", id="unknown-capability"),
    pytest.param({"X-Molar-Run-Id": "r" * 129}, "X-Molar-Run-Id", id="run-id-too-long"),
])
def test_bad_molar_headers_are_400s_naming_the_header(
        stack: LocalStack, headers: dict[str, str], param: str) -> None:
    with sdk(stack, **headers) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="planner",
                                       messages=[{"role": "user", "content": "x"}])
    assert caught.value.param == param

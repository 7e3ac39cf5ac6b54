"""The fake upstream over real HTTP: deterministic answers, token usage, scripts and the call log.

One server process is shared by the module; each test scripts its own scenario id, so tests do
not see each other's calls.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = "k1"
ENV_KEY = "k2-from-the-environment"
STARTUP_TIMEOUT_S = 15.0
SHORT_TIMEOUT_S = 0.5
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
CALLS = "/_control/calls"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_until_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the fake upstream exited early with code {process.returncode}")
        try:
            if httpx.get(f"{url}/_control/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"the fake upstream at {url} was not healthy after {STARTUP_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    port = _free_port()
    code = (
        f"from workers.fake_upstream import serve; serve('127.0.0.1', {port}, api_keys=['{KEY}'])"
    )
    env = {**os.environ, "FAKE_UPSTREAM_API_KEYS": f" {ENV_KEY} ,"}
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def client(upstream_url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=upstream_url, headers=headers, timeout=5) as http:
        yield http


@pytest.fixture
def scenario() -> str:
    return f"scenario-{uuid.uuid4().hex[:12]}"


def directive(**fields: Any) -> str:
    return f"<<fake:{json.dumps(fields)}>>"


def chat_body(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **fields}


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def calls_of(client: httpx.Client, scenario: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = client.get(CALLS, params={"scenario": scenario}).json()["calls"]
    return calls


def parse_sse(text: str) -> list[Any]:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    return [event if event == "[DONE]" else json.loads(event) for event in events]


# --- chat completions --------------------------------------------------------------------------


def test_same_messages_give_the_same_content_and_usage_computed_from_the_input(
    client: httpx.Client,
) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello world"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ]
    body = {"model": "gpt-4o-mini", "messages": messages}

    first = client.post(CHAT, json=body).json()
    second = client.post(CHAT, json=body).json()

    digest = hashlib.sha256(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)).digest()
    expected_completion_tokens = 8 + int.from_bytes(digest, "big") % 24
    assert first["object"] == "chat.completion"
    assert first["model"] == "gpt-4o-mini"
    assert first["choices"][0]["message"]["role"] == "assistant"
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["choices"][0]["finish_reason"] == "stop"
    assert first["usage"] == second["usage"]
    assert first["usage"]["prompt_tokens"] == (4 + 2) + (4 + 3 + 85)
    assert first["usage"]["completion_tokens"] == expected_completion_tokens
    assert first["usage"]["total_tokens"] == 98 + expected_completion_tokens
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_different_messages_give_different_content(client: httpx.Client) -> None:
    one = client.post(CHAT, json=chat_body("plan the crawl")).json()
    other = client.post(CHAT, json=chat_body("plan the export")).json()

    assert one["choices"][0]["message"]["content"] != other["choices"][0]["message"]["content"]


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
def test_output_is_cut_at_the_token_cap_with_finish_reason_length(
    client: httpx.Client, cap_field: str
) -> None:
    completion = client.post(CHAT, json=chat_body("long answer", **{cap_field: 3})).json()

    assert completion["usage"]["completion_tokens"] == 3
    assert len(completion["choices"][0]["message"]["content"].split()) == 3
    assert completion["choices"][0]["finish_reason"] == "length"


def test_n_returns_that_many_choices_and_sums_their_tokens(client: httpx.Client) -> None:
    completion = client.post(CHAT, json=chat_body("three ideas", n=3)).json()

    contents = [choice["message"]["content"] for choice in completion["choices"]]
    assert [choice["index"] for choice in completion["choices"]] == [0, 1, 2]
    assert len(set(contents)) == 3
    assert completion["usage"]["completion_tokens"] == sum(len(c.split()) for c in contents)


def test_a_stream_sends_chunks_then_usage_then_done(client: httpx.Client) -> None:
    plain = client.post(CHAT, json=chat_body("stream me")).json()
    body = chat_body("stream me", stream=True, stream_options={"include_usage": True})

    response = client.post(CHAT, json=body)
    events = parse_sse(response.text)

    chunks, usage_chunk, done = events[:-2], events[-2], events[-1]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert content == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == plain["usage"]
    assert done == "[DONE]"


def test_a_stream_without_include_usage_has_no_usage_chunk(client: httpx.Client) -> None:
    events = parse_sse(client.post(CHAT, json=chat_body("stream me", stream=True)).text)

    assert events[-1] == "[DONE]"
    assert all("usage" not in event for event in events[:-1])


# --- embeddings --------------------------------------------------------------------------------


def _norm(vector: list[float]) -> float:
    return math.sqrt(sum(component * component for component in vector))


def test_embeddings_are_deterministic_unit_vectors(client: httpx.Client) -> None:
    body = {"model": "text-embedding-3-small", "input": ["first text", "second text"]}

    first = client.post(EMBEDDINGS, json=body).json()
    again = client.post(EMBEDDINGS, json=body).json()

    vectors = [item["embedding"] for item in first["data"]]
    assert first["object"] == "list"
    assert first["model"] == "text-embedding-3-small"
    assert [item["index"] for item in first["data"]] == [0, 1]
    assert [len(vector) for vector in vectors] == [256, 256]
    assert all(abs(_norm(vector) - 1) < 1e-5 for vector in vectors)
    assert vectors[0] != vectors[1]
    assert first["data"] == again["data"]
    assert first["usage"] == {"prompt_tokens": 3 + 3, "total_tokens": 6}


def test_base64_embeddings_decode_to_the_float_vectors(client: httpx.Client) -> None:
    body = {"model": "text-embedding-3-small", "input": "some text", "dimensions": 64}

    floats = client.post(EMBEDDINGS, json=body).json()["data"][0]["embedding"]
    encoded = client.post(EMBEDDINGS, json={**body, "encoding_format": "base64"}).json()

    decoded = struct.unpack("<64f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert list(decoded) == floats


@pytest.mark.parametrize(
    ("token_input", "vectors", "tokens"),
    [([11, 22, 33], 1, 3), ([[11, 22], [33]], 2, 3)],
    ids=["one_token_array", "two_token_arrays"],
)
def test_token_arrays_are_embedded_and_counted(
    client: httpx.Client, token_input: list[Any], vectors: int, tokens: int
) -> None:
    body = {"model": "text-embedding-3-small", "input": token_input}

    answer = client.post(EMBEDDINGS, json=body).json()

    assert len(answer["data"]) == vectors
    assert answer["usage"]["prompt_tokens"] == tokens


# --- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer not-a-key"}, {}],
    ids=["wrong_key", "missing_key"],
)
def test_an_unknown_or_missing_key_is_refused_with_401(
    upstream_url: str, headers: dict[str, str]
) -> None:
    response = httpx.post(f"{upstream_url}{CHAT}", json=chat_body("hi"), headers=headers)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_keys_come_from_the_environment_and_from_the_control_api(upstream_url: str) -> None:
    runtime_key = f"sk-runtime-{uuid.uuid4().hex}"

    from_env = httpx.post(
        f"{upstream_url}{CHAT}",
        json=chat_body("hi"),
        headers={"Authorization": f"Bearer {ENV_KEY}"},
    )
    added = httpx.post(f"{upstream_url}/_control/keys", json={"keys": [runtime_key]})
    at_runtime = httpx.post(
        f"{upstream_url}{CHAT}",
        json=chat_body("hi"),
        headers={"Authorization": f"Bearer {runtime_key}"},
    )

    assert from_env.status_code == 200
    assert added.status_code == 200
    assert at_runtime.status_code == 200


# --- scripted behaviour ------------------------------------------------------------------------


def test_a_scenario_answers_429_twice_with_retry_headers_then_succeeds(
    client: httpx.Client, scenario: str
) -> None:
    steps = [
        {"status": 429, "retry_after": 1},
        {"status": 429, "retry_after": 2, "retry_after_ms": 1500},
    ]
    body = chat_body("plan " + directive(scenario=scenario, fail=steps))

    first, second, third = (client.post(CHAT, json=body) for _ in range(3))

    assert (first.status_code, second.status_code, third.status_code) == (429, 429, 200)
    assert first.headers["retry-after"] == "1"
    assert "retry-after-ms" not in first.headers
    assert second.headers["retry-after"] == "2"
    assert second.headers["retry-after-ms"] == "1500"
    assert first.json()["error"]["code"] == "rate_limit_exceeded"
    assert set(first.json()["error"]) == {"message", "type", "param", "code"}
    calls = calls_of(client, scenario)
    assert [call["scenario_call"] for call in calls] == [1, 2, 3]
    assert [call["status"] for call in calls] == [429, 429, 200]


def test_a_directive_without_scenario_fails_every_call(client: httpx.Client) -> None:
    body = chat_body(directive(fail=[{"status": 400, "message": "bad prompt"}]))

    statuses = [client.post(CHAT, json=body).status_code for _ in range(3)]

    assert statuses == [400, 400, 400]


def test_echo_key_puts_the_callers_key_in_the_error(upstream_url: str, scenario: str) -> None:
    secret_key = f"sk-echo-{uuid.uuid4().hex}"
    httpx.post(f"{upstream_url}/_control/keys", json={"keys": [secret_key]})
    body = chat_body(directive(scenario=scenario, fail=[{"status": 401, "echo_key": True}]))

    response = httpx.post(
        f"{upstream_url}{CHAT}", json=body, headers={"Authorization": f"Bearer {secret_key}"}
    )

    assert response.status_code == 401
    assert response.json()["error"]["message"].count(secret_key) == 2
    assert f"api_key={secret_key}" in response.text


def test_hang_never_answers_so_the_client_times_out(client: httpx.Client, scenario: str) -> None:
    body = chat_body(directive(scenario=scenario, fail=[{"hang": True}]))

    with pytest.raises(httpx.ReadTimeout):
        client.post(CHAT, json=body, timeout=SHORT_TIMEOUT_S)

    assert client.get("/_control/health").status_code == 200
    [call] = calls_of(client, scenario)
    assert (call["outcome"], call["status"]) == ("hang", None)


def test_stall_sends_headers_and_half_the_body_then_stops(
    client: httpx.Client, scenario: str
) -> None:
    body = chat_body(directive(scenario=scenario, fail=[{"stall": True}]))
    received = bytearray()

    timeout = httpx.Timeout(5, read=SHORT_TIMEOUT_S)
    with client.stream("POST", CHAT, json=body, timeout=timeout) as response:
        declared_length = int(response.headers["content-length"])
        with pytest.raises(httpx.ReadTimeout):
            for chunk in response.iter_bytes():
                received += chunk

    assert response.status_code == 200
    assert 0 < len(received) < declared_length
    assert calls_of(client, scenario)[0]["outcome"] == "stall"


def test_latency_ms_in_the_directive_delays_the_answer(client: httpx.Client) -> None:
    started = time.monotonic()
    response = client.post(CHAT, json=chat_body("slow " + directive(latency_ms=200)))

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


def test_no_usage_leaves_usage_out(client: httpx.Client) -> None:
    chat = client.post(CHAT, json=chat_body(directive(no_usage=True))).json()
    embedding_body = {"model": "text-embedding-3-small", "input": directive(no_usage=True)}
    embeddings = client.post(EMBEDDINGS, json=embedding_body).json()

    assert "usage" not in chat
    assert "usage" not in embeddings


@pytest.mark.parametrize(
    ("cached_tokens", "expected"),
    [(3, 3), (10_000, None)],
    ids=["reported", "capped_at_prompt_tokens"],
)
def test_cached_tokens_are_reported(
    client: httpx.Client, cached_tokens: int, expected: int | None
) -> None:
    body = chat_body("cache me " + directive(cached_tokens=cached_tokens))

    usage = client.post(CHAT, json=body).json()["usage"]

    wanted = usage["prompt_tokens"] if expected is None else expected
    assert usage["prompt_tokens_details"]["cached_tokens"] == wanted


def test_completion_tokens_can_be_forced(client: httpx.Client) -> None:
    body = chat_body("big " + directive(completion_tokens=500))

    usage = client.post(CHAT, json=body).json()["usage"]

    assert usage["completion_tokens"] == 500


# --- the call log ------------------------------------------------------------------------------


def test_the_call_log_proves_which_key_arrived_without_storing_it(
    upstream_url: str, client: httpx.Client, scenario: str
) -> None:
    logged_key = f"sk-logged-{uuid.uuid4().hex}"
    httpx.post(f"{upstream_url}/_control/keys", json={"keys": [logged_key]})
    body = chat_body(directive(scenario=scenario))
    for key in (logged_key, "wrong-key"):
        httpx.post(f"{upstream_url}{CHAT}", json=body, headers={"Authorization": f"Bearer {key}"})

    log = client.get(CALLS, params={"scenario": scenario})

    calls = log.json()["calls"]
    assert [call["key_sha256"] for call in calls] == [
        sha256_hex(logged_key),
        sha256_hex("wrong-key"),
    ]
    assert [call["status"] for call in calls] == [200, 401]
    assert (calls[0]["path"], calls[0]["model"]) == (CHAT, "gpt-4o-mini")
    assert logged_key not in log.text


def test_clearing_the_call_log_also_restarts_scenarios(client: httpx.Client, scenario: str) -> None:
    body = chat_body(directive(scenario=scenario, fail=[{"status": 500}]))
    assert client.post(CHAT, json=body).status_code == 500

    assert client.delete(CALLS).status_code == 200

    assert client.get(CALLS).json()["calls"] == []
    assert client.post(CHAT, json=body).status_code == 500


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "hi"}]}, "model"),
        (CHAT, {"model": "gpt-4o-mini"}, "messages"),
        (CHAT, {"model": "gpt-4o-mini", "messages": []}, "messages"),
        (EMBEDDINGS, {"model": "text-embedding-3-small"}, "input"),
        (EMBEDDINGS, {"model": "text-embedding-3-small", "input": ""}, "input"),
    ],
    ids=[
        "chat_without_model",
        "chat_without_messages",
        "chat_with_empty_messages",
        "embeddings_without_input",
        "embeddings_of_an_empty_string",
    ],
)
def test_invalid_requests_get_an_openai_shaped_400(
    client: httpx.Client, path: str, body: dict[str, Any], param: str
) -> None:
    response = client.post(path, json=body)

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"<<fake:{oops}>>"],
    ids=["malformed_json", "malformed_directive"],
)
def test_malformed_bodies_and_directives_get_400(client: httpx.Client, content: bytes) -> None:
    if content.startswith(b"<<"):
        content = orjson.dumps(chat_body(content.decode()))

    response = client.post(CHAT, content=content, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_models_are_listed(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()

    assert models["object"] == "list"
    assert "gpt-4o-mini" in [model["id"] for model in models["data"]]


# --- the official SDK --------------------------------------------------------------------------


@pytest.fixture
def sdk(upstream_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key=KEY, base_url=f"{upstream_url}/v1", max_retries=0) as sdk_client:
        yield sdk_client


def test_the_openai_sdk_reads_chat_completions_and_streams(
    sdk: openai.OpenAI, client: httpx.Client
) -> None:
    messages: list[Any] = [{"role": "user", "content": "sdk says hello"}]
    raw = client.post(CHAT, json={"model": "gpt-4o", "messages": messages}).json()

    completion = sdk.chat.completions.create(model="gpt-4o", messages=messages)
    stream = sdk.chat.completions.create(
        model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    assert completion.choices[0].message.content == raw["choices"][0]["message"]["content"]
    assert completion.usage is not None
    assert completion.usage.total_tokens == raw["usage"]["total_tokens"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == raw["choices"][0]["message"]["content"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == raw["usage"]["completion_tokens"]


def test_the_openai_sdk_reads_embeddings(sdk: openai.OpenAI, client: httpx.Client) -> None:
    body = {"model": "text-embedding-3-small", "input": ["alpha", "beta"], "dimensions": 32}
    raw = client.post(EMBEDDINGS, json=body).json()

    answer = sdk.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"], dimensions=32
    )

    assert [item.embedding for item in answer.data] == [item["embedding"] for item in raw["data"]]
    assert answer.usage.prompt_tokens == raw["usage"]["prompt_tokens"]


def test_the_openai_sdk_raises_its_rate_limit_error_for_a_scripted_429(
    sdk: openai.OpenAI, scenario: str
) -> None:
    text = directive(scenario=scenario, fail=[{"status": 429, "retry_after": 1}])

    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
        )

    assert raised.value.status_code == 429
    assert raised.value.code == "rate_limit_exceeded"

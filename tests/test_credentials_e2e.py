"""Credentials stay on the server, end to end through real API, Redis, PostgreSQL, worker and
fake upstream processes: the canary scan, the right key reaching the upstream, and rotation."""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest
import redis
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import inspect, select, text

from broker.capabilities import CAPABILITIES
from broker.devstack import free_port
from broker.models import Integration
from tests.conftest import api, chat, redis_key, stack_db, upstream_calls, wait_job

pytestmark = pytest.mark.redis


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def directive(scenario: str, **fields: Any) -> str:
    return "<<fake:" + orjson.dumps({"scenario": scenario, **fields}).decode() + ">>"


ECHO = [{"status": 401, "echo_key": True}]


class Recorder:
    """Keeps the body of every API response the test sees, for the canary scan."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    def __call__(self, response: httpx.Response) -> None:
        response.read()
        self.bodies.append(f"{response.request.url} {response.headers} {response.text}")


def client(stack, org: str, recorder: Recorder) -> httpx.Client:
    http = api(stack, org=org)
    http.event_hooks["response"] = [recorder]
    return http


def store(http: httpx.Client, org: str, integration_id: str, key: str, base_url: str) -> None:
    response = http.post(f"/v1/orgs/{org}/integrations", json={
        "id": integration_id, "provider": "openai_compatible", "base_url": base_url,
        "api_key": key})
    assert response.status_code == 201, response.text


def submit(http: httpx.Client, capability: str, integration_id: str, text_: str,
           model: str = "gpt-4.1-mini") -> str:
    request = ({"input": text_} if capability == "embeddings" else chat(text_))
    if capability == "embeddings":
        model = "text-embedding-3-small"
    response = http.post("/v1/jobs", json={
        "capability": capability, "request": request,
        "model_routing": {capability: {"provider_integration_id": integration_id,
                                       "model": model}}})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


@contextmanager
def pubsub_tap(url: str) -> Iterator[list[tuple[bytes, bytes]]]:
    """Every pub/sub message on the Redis server while the block runs (events, fanout)."""
    seen: list[tuple[bytes, bytes]] = []
    stop = threading.Event()
    conn = redis.Redis.from_url(url)
    pubsub = conn.pubsub()
    pubsub.psubscribe("*")

    def pump() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message and message["type"] == "pmessage":
                seen.append((bytes(message["channel"]), bytes(message["data"])))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=5)
        pubsub.close()
        conn.close()


# --- the canary scan ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def canary_stack(make_stack):
    env = {"MOLAR_LLM_LOG_LEVEL": "DEBUG",
           "MOLAR_LLM_ENCRYPTION_KEYS": Fernet.generate_key().decode()}
    stack = make_stack("redis-pg", env=env)
    # stagehand_vlm is left unserved so one job's message stays on its queue for the scan.
    served = [cap for cap in CAPABILITIES if cap != "stagehand_vlm"]
    stack.worker_metrics_port = free_port()
    stack.start_worker("worker", capabilities=served, concurrency=8,
                       metrics_port=stack.worker_metrics_port)
    return stack


def test_canary_keys_appear_nowhere_and_the_right_key_reaches_the_upstream(canary_stack):
    stack = canary_stack
    canaries = {name: f"canary{name}{secrets.token_hex(12)}" for name in ("A", "E", "B", "T")}
    platform_key = stack.upstream_key
    httpx.post(f"{stack.upstream_url}/_control/keys",
               json={"keys": list(canaries.values())}).raise_for_status()
    upstream = f"{stack.upstream_url}/v1"
    run = secrets.token_hex(4)
    recorder = Recorder()

    with pubsub_tap(stack.env["MOLAR_LLM_BROKER_URL"]) as published, \
            client(stack, "org_a", recorder) as org_a, client(stack, "org_b", recorder) as org_b:
        store(org_a, "org_a", "byok-ok", canaries["A"], upstream)
        store(org_a, "org_a", "byok-echo", canaries["E"], upstream)
        store(org_b, "org_b", "byok-b", canaries["B"], upstream)
        store(org_a, "org_a", "byok-temp", canaries["T"], upstream)
        assert org_a.delete("/v1/orgs/org_a/integrations/byok-temp").status_code == 200

        jobs = {
            "byok_ok": submit(org_a, "planner", "byok-ok", directive(f"{run}-ok")),
            "byok_embed": submit(org_a, "embeddings", "byok-ok", directive(f"{run}-embed")),
            "byok_echo": submit(org_a, "export_healer", "byok-echo",
                                directive(f"{run}-echo", fail=ECHO)),
            "managed_ok": submit(org_a, "planner", "molar-managed", directive(f"{run}-managed")),
            "managed_echo": submit(org_a, "grounding_tier0", "molar-managed",
                                   directive(f"{run}-managed-echo", fail=ECHO)),
            "other_org": submit(org_b, "planner", "byok-ok", directive(f"{run}-other")),
            "own_org_b": submit(org_b, "planner", "byok-b", directive(f"{run}-b")),
            "deleted": submit(org_a, "planner", "byok-temp", directive(f"{run}-deleted")),
        }
        batch = org_a.post("/v1/batches", json={
            "items": [{"custom_id": f"i{n}", "capability": "planner",
                       "request": chat(directive(f"{run}-batch-{n}",
                                                 fail=ECHO if n % 2 else None))}
                      for n in range(6)],
            "model_routing": {"planner": {"provider_integration_id": "byok-echo",
                                          "model": "gpt-4.1-mini"}}}).json()
        queued = submit(org_a, "stagehand_vlm", "byok-ok", "stays queued", model="gpt-4o-mini")
        refused = org_a.post("/v1/jobs", json={
            "capability": "planner", "request": chat("x"),
            "model_routing": {"planner": {"provider_integration_id": "byok-ok",
                                          "model": "gpt-4.1-mini", "api_key": canaries["A"]}}})

        done = {name: wait_job(org_a if name not in ("other_org", "own_org_b") else org_b,
                               job_id) for name, job_id in jobs.items()}
        lines = [orjson.loads(line) for line in
                 _wait_results(org_a, batch["id"]).splitlines()]
        org_a.get("/v1/orgs/org_a/integrations")
        org_a.get(f"/v1/jobs/{queued}")
        metrics = org_a.get("/metrics")
        worker_metrics = httpx.get(f"http://127.0.0.1:{stack.worker_metrics_port}/metrics")

    _assert_outcomes(done, lines, refused)
    _assert_keys_reaching_the_upstream(stack, run, canaries, platform_key)

    secrets_ = [*canaries.values(), platform_key]
    for body in recorder.bodies:
        _assert_clean("an API response", body, secrets_)
    assert metrics.status_code == 200
    assert "molar_llm_http_requests_total" in metrics.text
    assert worker_metrics.status_code == 200
    assert "molar_llm_requests_total" in worker_metrics.text
    _assert_clean("/metrics", metrics.text, secrets_)
    _assert_clean("the worker's /metrics", worker_metrics.text, secrets_)
    _scan_redis(stack, queued, secrets_)
    _scan_published(stack, published, jobs, secrets_)
    _scan_sql(stack, secrets_, canaries)
    _scan_logs(stack, secrets_, jobs)


def _wait_results(http: httpx.Client, batch_id: str) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if http.get(f"/v1/batches/{batch_id}").json()["status"] == "completed":
            return http.get(f"/v1/batches/{batch_id}/results").text
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not complete")


def _assert_outcomes(done: dict[str, dict[str, Any]], lines: list[dict[str, Any]],
                     refused: httpx.Response) -> None:
    for name in ("byok_ok", "byok_embed", "managed_ok", "own_org_b"):
        assert done[name]["status"] == "succeeded", done[name]
    for name in ("byok_echo", "managed_echo"):
        error = done[name]["error"]
        assert done[name]["status"] == "failed"
        assert error["code"] == "provider_auth_failed"
        assert error["message"].count("[REDACTED]") == 2, error
    for name, integration in (("other_org", "byok-ok"), ("deleted", "byok-temp")):
        assert done[name]["status"] == "failed"
        assert done[name]["attempts"] == 1
        assert done[name]["error"]["code"] == "integration_not_found"
        assert done[name]["error"]["retryable"] is False
        assert integration in done[name]["error"]["message"]
    assert [line["status"] for line in lines] == ["succeeded", "failed"] * 3
    assert all("[REDACTED]" in line["error"]["message"] for line in lines[1::2])
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "model_routing.planner.api_key"


def _assert_keys_reaching_the_upstream(stack, run: str, canaries: dict[str, str],
                                       platform_key: str) -> None:
    def keys(scenario: str) -> list[str | None]:
        return [call["key_sha256"] for call in upstream_calls(stack, scenario=f"{run}-{scenario}")]

    assert keys("ok") == [sha(canaries["A"])]
    assert keys("embed") == [sha(canaries["A"])]
    assert keys("echo") == [sha(canaries["E"])]
    assert keys("b") == [sha(canaries["B"])]
    assert keys("managed") == [sha(platform_key)]
    assert keys("managed-echo") == [sha(platform_key)]
    assert keys("other") == []  # org_b's job never reached the upstream with any key
    assert keys("deleted") == []
    for n in range(6):
        assert keys(f"batch-{n}") == [sha(canaries["E"])]


def _assert_clean(where: str, content: str, secrets_: list[str]) -> None:
    for secret in secrets_:
        assert secret not in content, f"a secret leaked into {where}: {content[:300]}"


def _assert_clean_bytes(where: str, content: bytes, secrets_: list[str]) -> None:
    for secret in secrets_:
        raw = secret.encode()
        # A base64-encoded copy shows up whole in one of three alignments.
        encodings = [base64.b64encode(b"x" * pad + raw)[4:-4] for pad in range(3)]
        assert raw not in content, f"a secret leaked into {where}"
        assert not any(enc in content for enc in encodings), f"base64 secret in {where}"
    for body in _kombu_bodies(content):
        _assert_clean(f"a decoded message body in {where}", body, secrets_)


def _kombu_bodies(content: bytes) -> list[str]:
    """Decoded bodies of kombu messages inside ``content`` (they are base64 on Redis)."""
    try:
        payload = orjson.loads(content)
    except orjson.JSONDecodeError:
        return []
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        payload = payload[0]
    if not isinstance(payload, dict) or not isinstance(payload.get("body"), str):
        return []
    try:
        return [base64.b64decode(payload["body"]).decode()]
    except (binascii.Error, UnicodeDecodeError):
        return [payload["body"]]


def _scan_published(stack, published: list[tuple[bytes, bytes]], jobs: dict[str, str],
                    secrets_: list[str]) -> None:
    ours = [data for channel, data in published
            if channel.startswith(redis_key(stack, "").encode())]
    bodies = [body for data in ours for body in _kombu_bodies(data)]
    assert any(job_id in body for body in bodies for job_id in jobs.values()), "no task events"
    for channel, data in published:
        _assert_clean_bytes(f"pub/sub channel {channel!r}", channel, secrets_)
        _assert_clean_bytes(f"a message on {channel!r}", data, secrets_)


def _redis_values(conn: redis.Redis, key: bytes) -> list[bytes]:
    kind = conn.type(key).decode()
    if kind == "string":
        return [conn.get(key) or b""]
    if kind == "list":
        return list(conn.lrange(key, 0, -1))
    if kind == "hash":
        return [k + b" " + v for k, v in conn.hgetall(key).items()]
    if kind == "set":
        return list(conn.smembers(key))
    if kind == "zset":
        return list(conn.zrange(key, 0, -1))
    return []


def _scan_redis(stack, queued_job: str, secrets_: list[str]) -> None:
    conn = redis.Redis.from_url(stack.env["MOLAR_LLM_BROKER_URL"])
    prefix = redis_key(stack, "")
    keys = list(conn.scan_iter(match=prefix + "*", count=1000))
    queue = redis_key(stack, "llm.stagehand_vlm").encode()
    assert queue in keys, keys
    bodies = [body for value in _redis_values(conn, queue) for body in _kombu_bodies(value)]
    assert any(queued_job in body for body in bodies), "the decoder must see the job id"
    for key in keys:
        _assert_clean_bytes(f"Redis key name {key!r}", key, secrets_)
        for value in _redis_values(conn, key):
            _assert_clean_bytes(f"Redis key {key!r}", value, secrets_)
    conn.close()


def _scan_sql(stack, secrets_: list[str], canaries: dict[str, str]) -> None:
    engine = stack_db(stack)
    fernet = Fernet(stack.env["MOLAR_LLM_ENCRYPTION_KEYS"])
    scanned = 0
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            result = conn.execute(text(f'SELECT * FROM "{table}"'))
            for row in result.mappings():
                for column, value in row.items():
                    if (table, column) == ("integrations", "key_ciphertext"):
                        continue
                    _assert_clean(f"SQL {table}.{column}", str(value), secrets_)
                    scanned += 1
        tokens = dict(conn.execute(select(Integration.id, Integration.key_ciphertext)).all())
    engine.dispose()
    assert scanned > 100
    for token in tokens.values():
        _assert_clean("integrations.key_ciphertext", token, secrets_)
    decrypted = {fernet.decrypt(token.encode()).decode() for token in tokens.values()}
    assert decrypted == {canaries["A"], canaries["E"], canaries["B"]}


def _scan_logs(stack, secrets_: list[str], jobs: dict[str, str]) -> None:
    logs = {path.name: path.read_text(errors="replace") for path in stack.log_dir.glob("*.log")}
    assert {"api.log", "worker.log"} <= set(logs)
    assert " DEBUG " in logs["worker.log"] and " DEBUG " in logs["api.log"]
    assert jobs["byok_echo"] in logs["worker.log"]
    for name, content in logs.items():
        _assert_clean(f"log {name}", content, secrets_)


# --- key rotation -------------------------------------------------------------------------


def _restart(stack, keys: str, *, api_too: bool) -> None:
    stack.env["MOLAR_LLM_ENCRYPTION_KEYS"] = keys
    # Every job has finished: a hard stop loses nothing and keeps the test short.
    stack.kill("worker", sig=signal.SIGKILL)
    if api_too:
        stack.kill("api")
        stack.start_api()
    stack.start_worker("worker", concurrency=4)


def _run_ok(stack, integration_id: str, scenario: str) -> str | None:
    with api(stack, org="org_rot") as http:
        job = wait_job(http, submit(http, "planner", integration_id, directive(scenario)))
    assert job["status"] == "succeeded", job
    calls = upstream_calls(stack, scenario=scenario)
    return calls[-1]["key_sha256"] if calls else None


def _tokens(stack) -> dict[str, str]:
    engine = stack_db(stack)
    with engine.connect() as conn:
        tokens = dict(conn.execute(select(Integration.id, Integration.key_ciphertext)).all())
    engine.dispose()
    return tokens


def _rotate(stack, keys: str) -> tuple[int, str]:
    proc = stack.molar("rotate", "rotate-keys",
                       extra_env={"MOLAR_LLM_ENCRYPTION_KEYS": keys})
    code = proc.wait(timeout=60)
    return code, (stack.log_dir / "rotate.log").read_text()


def test_after_rotate_keys_old_and_new_credentials_work_and_the_old_key_can_go(make_stack):
    """Also: rotate-keys without the key a credential was stored under changes nothing."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    stack = make_stack("redis-pg", env={"MOLAR_LLM_ENCRYPTION_KEYS": old})
    stack.start_worker("worker", concurrency=4)
    first, second = (f"rotation-{n}-{secrets.token_hex(12)}" for n in (1, 2))
    httpx.post(f"{stack.upstream_url}/_control/keys", json={"keys": [first, second]})
    upstream = f"{stack.upstream_url}/v1"
    with api(stack, org="org_rot") as http:
        store(http, "org_rot", "byok-first", first, upstream)
    assert _run_ok(stack, "byok-first", "rot-1") == sha(first)

    _restart(stack, f"{new},{old}", api_too=True)
    with api(stack, org="org_rot") as http:
        store(http, "org_rot", "byok-second", second, upstream)
    assert _run_ok(stack, "byok-first", "rot-2") == sha(first)
    assert _run_ok(stack, "byok-second", "rot-3") == sha(second)
    before = _tokens(stack)
    with pytest.raises(InvalidToken):
        Fernet(new).decrypt(before["byok-first"].encode())

    code, output = _rotate(stack, new)  # the old key is missing: nothing may change
    assert code != 0
    assert "byok-first" in output and "org_rot" in output and "nothing was changed" in output
    assert _tokens(stack) == before

    code, output = _rotate(stack, f"{new},{old}")
    assert code == 0, output
    assert "re-encrypted 2 stored credential(s)" in output
    tokens = _tokens(stack)
    assert {Fernet(new).decrypt(t.encode()).decode() for t in tokens.values()} == {first, second}

    _restart(stack, new, api_too=False)  # only workers decrypt
    assert _run_ok(stack, "byok-first", "rot-4") == sha(first)
    assert _run_ok(stack, "byok-second", "rot-5") == sha(second)

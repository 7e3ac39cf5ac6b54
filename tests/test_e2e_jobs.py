"""End to end: jobs and batches through real API, queue, worker and fake upstream processes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

import httpx
import orjson
import pytest
import redis
from sqlalchemy import func, select

from broker.models import Attempt, Job, UsageEvent
from tests.conftest import (
    api,
    chat,
    redis_key,
    stack_db,
    upstream_calls,
    wait_batch,
    wait_job,
)

BACKENDS = ["embedded", "redis-pg"]


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request, make_stack):
    stack = make_stack(request.param)
    stack.start_worker("worker-all", concurrency=64)
    return stack


def test_a_300_item_batch_over_three_capabilities_completes_with_one_usage_event_per_job(stack):
    caps = ["planner", "grounding_tier0", "embeddings"]
    items = [
        {"custom_id": f"item-{i:04d}", "capability": caps[i % 3],
         "request": {"input": f"text {i}"} if caps[i % 3] == "embeddings" else chat(f"page {i}")}
        for i in range(300)
    ]
    with api(stack) as client:
        response = client.post("/v1/batches", json={"items": items, "run_id": "run-300"})
        assert response.status_code == 202, response.text
        batch = response.json()
        assert batch["request_counts"] == {"total": 300, "queued": 300, "running": 0,
                                           "succeeded": 0, "failed": 0, "cancelled": 0}
        done = wait_batch(client, batch["id"], timeout_s=180)
        lines = [orjson.loads(line) for line in
                 client.get(f"/v1/batches/{batch['id']}/results").text.splitlines()]

    assert done["status"] == "completed"
    assert done["request_counts"]["succeeded"] == 300
    assert [line["custom_id"] for line in lines] == [item["custom_id"] for item in items]
    for line, item in zip(lines, items, strict=True):
        assert line["status"] == "succeeded"
        assert line["capability"] == item["capability"]
        if item["capability"] == "embeddings":
            assert line["result"]["data"][0]["embedding"]
        else:
            assert line["result"]["choices"][0]["message"]["content"]
        assert line["usage"]["input_tokens"] > 0
        assert float(line["usage"]["cost_usd"]) > 0

    engine = stack_db(stack)
    with engine.connect() as conn:
        job_ids = {line["job_id"] for line in lines}
        events = conn.execute(
            select(UsageEvent.job_id, UsageEvent.run_id, UsageEvent.meters)
            .where(UsageEvent.job_id.in_(job_ids))
        ).all()
    engine.dispose()
    assert len(events) == 300
    assert {e.job_id for e in events} == job_ids
    assert {e.run_id for e in events} == {"run-300"}
    assert all(set(e.meters) == {"debugger_tokens_input", "debugger_tokens_output"}
               for e in events)


def test_a_single_job_records_result_usage_route_and_ordered_timestamps(stack):
    with api(stack) as client:
        job = client.post("/v1/jobs", json={
            "capability": "export_generator", "request": chat("write a test", max_tokens=10),
            "metadata": {"page": "checkout"},
        }).json()
        assert job["status"] == "queued"
        done = wait_job(client, job["id"])

    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1
    assert done["route"]["source"] == "default"
    assert done["route"]["provider_integration_id"] == "molar-managed"
    assert done["metadata"] == {"page": "checkout"}
    assert done["result"]["object"] == "chat.completion"
    assert done["usage"]["output_tokens"] <= 10
    created, started, finished = (datetime.fromisoformat(done[k])
                                  for k in ("created_at", "started_at", "finished_at"))
    assert created <= started <= finished


def test_the_platform_key_reaches_the_upstream_and_never_the_message(stack):
    scenario = f"keycheck-{stack.api_url[-5:]}"
    directive = "<<fake:" + orjson.dumps({"scenario": scenario}).decode() + ">>"
    with api(stack, org="org_keycheck") as client:
        job = client.post("/v1/jobs", json={
            "capability": "planner", "request": chat(directive),
        }).json()
        assert wait_job(client, job["id"])["status"] == "succeeded"
    calls = upstream_calls(stack, scenario=scenario)
    assert len(calls) == 1
    assert calls[0]["key_sha256"] == hashlib.sha256(stack.upstream_key.encode()).hexdigest()


@pytest.mark.parametrize("level", ["default", "org", "submission"])
def test_routing_precedence_submission_over_org_over_default(stack, level):
    org = f"org_route_{level}_{stack.api_url[-5:]}"
    body = {"capability": "planner", "request": chat(f"route via {level}")}
    with api(stack, org=org) as client:
        if level in ("org", "submission"):
            response = client.put(f"/v1/orgs/{org}/settings", json={"model_routing": {
                "planner": {"provider_integration_id": "molar-managed", "model": "gpt-4.1"}}})
            assert response.status_code == 200, response.text
        if level == "submission":
            body["model_routing"] = {
                "planner": {"provider_integration_id": "molar-managed", "model": "gpt-4o-mini"}}
        table = client.get("/v1/routing").json()["routes"]
        job = wait_job(client, client.post("/v1/jobs", json=body).json()["id"])

    expected = {"default": "claude-sonnet-4-5", "org": "gpt-4.1",
                "submission": "gpt-4o-mini"}[level]
    assert job["status"] == "succeeded"
    assert job["route"]["model"] == expected
    assert job["route"]["source"] == level
    assert job["result"]["model"] == expected  # what the upstream was asked for
    assert table["planner"]["source"] == ("default" if level == "default" else "org")
    assert set(table) == {"planner", "grounding_tier0", "grounding_tier1_vlm",
                          "export_generator", "export_healer", "passive_ux_vlm", "embeddings",
                          "stagehand_planner", "stagehand_vlm"}


def test_org_settings_put_replaces_named_fields_and_keeps_the_others(stack):
    org = f"org_settings_{stack.api_url[-5:]}"
    routing = {"planner": {"provider_integration_id": "molar-managed", "model": "gpt-4.1"}}
    with api(stack, org=org) as client:
        client.put(f"/v1/orgs/{org}/settings", json={"model_routing": routing})
        client.put(f"/v1/orgs/{org}/settings", json={"spend_cap_usd": "25.50"})
        stored = client.get(f"/v1/orgs/{org}/settings").json()
    assert stored["model_routing"] == routing
    assert stored["spend_cap_usd"] == "25.500000"


BAD_JOBS = [
    pytest.param(b'{"capability": "planner"', "", "invalid_json", id="malformed-json"),
    pytest.param({"request": chat("x")}, "capability", "missing_field", id="missing-capability"),
    pytest.param({"capability": "planer", "request": chat("x")}, "capability", "invalid_request",
                 id="unknown-capability"),
    pytest.param({"capability": "planner", "request": {"temperature": 0}}, "request.messages",
                 "invalid_request", id="no-messages"),
    pytest.param({"capability": "embeddings", "request": {"model": "x"}}, "request.input",
                 "invalid_request", id="embeddings-without-input"),
    pytest.param({"capability": "planner", "request": chat("x"), "colour": "red"}, "colour",
                 "unknown_field", id="unknown-field"),
    pytest.param({"capability": "planner", "request": chat("x"),
                  "model_routing": {"planner": {"provider_integration_id": "molar-managed",
                                                "model": "gpt-9"}}},
                 "model_routing.planner.model", "invalid_request", id="unknown-model"),
    pytest.param({"capability": "embeddings", "request": {"input": "x"},
                  "model_routing": {"embeddings": {"provider_integration_id": "molar-managed",
                                                   "model": "gpt-4.1"}}},
                 "model_routing.embeddings.model", "invalid_request",
                 id="chat-model-for-embeddings"),
]


def _count_rows(stack) -> tuple[int, int]:
    from broker.models import Batch

    engine = stack_db(stack)
    with engine.connect() as conn:
        jobs = conn.scalar(select(func.count()).select_from(Job))
        batches = conn.scalar(select(func.count()).select_from(Batch))
    engine.dispose()
    return jobs or 0, batches or 0


@pytest.mark.parametrize(("body", "param", "code"), BAD_JOBS)
def test_bad_job_submissions_are_400_naming_the_field_and_write_nothing(stack, body, param, code):
    before = _count_rows(stack)
    with api(stack) as client:
        if isinstance(body, bytes):
            response = client.post("/v1/jobs", content=body,
                                   headers={"Content-Type": "application/json"})
        else:
            response = client.post("/v1/jobs", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert (error["param"] or "") == param
    if param:
        assert param.split(".")[0] in error["message"]
    assert _count_rows(stack) == before


def _item(custom_id: str, capability: str = "planner", **request: object) -> dict[str, object]:
    return {"custom_id": custom_id, "capability": capability, "request": request or chat("x")}


BAD_BATCHES = [
    pytest.param({"items": [_item("a"), _item("a")]}, "items[1].custom_id",
                 id="duplicate-custom-id"),
    pytest.param({"items": [_item("ok"), _item("has space")]}, "items[1].custom_id",
                 id="malformed-custom-id"),
    pytest.param({"items": [_item("x" * 65)]}, "items[0].custom_id", id="custom-id-too-long"),
    pytest.param({"items": [_item("ok"), _item("bad", capability="nope")]},
                 "items[1].capability", id="unknown-capability-in-item"),
    pytest.param({"items": [_item("ok"), {"custom_id": "b", "capability": "planner",
                                          "request": {}}]},
                 "items[1].request.messages", id="item-without-messages"),
    pytest.param({"items": []}, "items", id="empty-batch"),
    pytest.param({"items": [_item(f"i{n}") for n in range(50_001)]}, "items", id="oversized"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BATCHES)
def test_bad_batches_are_400_naming_the_item_and_create_no_jobs(stack, body, param):
    before = _count_rows(stack)
    with api(stack) as client:
        response = client.post("/v1/batches", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert _count_rows(stack) == before


def test_unknown_settings_field_is_400_and_unknown_ids_are_404(stack):
    with api(stack) as client:
        bad = client.put("/v1/orgs/org_a/settings", json={"routing": {}})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "routing"
        for path in ("/v1/jobs/job_nope", "/v1/batches/batch_nope",
                     "/v1/batches/batch_nope/results"):
            response = client.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["type"] == "not_found_error"


def test_another_orgs_job_is_404(stack):
    with api(stack, org="org_owner") as owner, api(stack, org="org_other") as other:
        job = owner.post("/v1/jobs", json={"capability": "planner", "request": chat("x")}).json()
        assert owner.get(f"/v1/jobs/{job['id']}").status_code == 200
        assert other.get(f"/v1/jobs/{job['id']}").status_code == 404


def test_requests_without_the_service_key_are_401(stack):
    response = httpx.post(f"{stack.api_url}/v1/jobs", json={"capability": "planner",
                                                             "request": chat("x")})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_a_worker_serves_only_its_capabilities(make_stack):
    stack = make_stack("redis-pg")
    stack.start_worker("planner-only", capabilities=["planner"], concurrency=8)
    with api(stack) as client:
        planner = [client.post("/v1/jobs", json={"capability": "planner",
                                                 "request": chat(f"p{i}")}).json()["id"]
                   for i in range(5)]
        embeds = [client.post("/v1/jobs", json={"capability": "embeddings",
                                                "request": {"input": f"e{i}"}}).json()["id"]
                  for i in range(5)]
        for job_id in planner:
            assert wait_job(client, job_id)["status"] == "succeeded"
        time.sleep(1.5)
        assert {client.get(f"/v1/jobs/{j}").json()["status"] for j in embeds} == {"queued"}
        broker = redis.Redis.from_url(stack.env["MOLAR_LLM_BROKER_URL"])
        assert broker.llen(redis_key(stack, "llm.embeddings")) == 5

        stack.start_worker("embeddings-only", capabilities=["embeddings"], concurrency=8)
        for job_id in embeds:
            assert wait_job(client, job_id)["status"] == "succeeded"

    engine = stack_db(stack)
    with engine.connect() as conn:
        workers = dict(conn.execute(
            select(Job.capability, func.count(func.distinct(Attempt.worker)))
            .join(Attempt, Attempt.job_id == Job.id).group_by(Job.capability)
        ).all())
    engine.dispose()
    assert workers == {"planner": 1, "embeddings": 1}


def test_one_worker_process_keeps_64_provider_calls_in_flight(make_stack):
    stack = make_stack("redis-pg")
    worker = stack.start_worker("wide", capabilities=["planner"], concurrency=64)
    slow = '<<fake:{"latency_ms": 1500}>>'
    items = [{"custom_id": f"slow-{i}", "capability": "planner",
              "request": chat(f"{slow} call {i}")} for i in range(128)]
    with api(stack) as client:
        batch = client.post("/v1/batches", json={"items": items}).json()
        done = wait_batch(client, batch["id"], timeout_s=120)
    assert done["request_counts"]["succeeded"] == 128

    engine = stack_db(stack)
    with engine.connect() as conn:
        spans = conn.execute(
            select(Attempt.started_at, Attempt.finished_at, Attempt.worker)
            .join(Job, Job.id == Attempt.job_id).where(Job.batch_id == batch["id"])
        ).all()
    engine.dispose()
    assert len({span.worker for span in spans}) == 1  # one worker process did all of it
    peak = _peak_in_flight([(s.started_at, s.finished_at) for s in spans])
    assert peak >= 64, f"only {peak} provider calls were in flight at once"
    assert worker.poll() is None


def _peak_in_flight(spans: list[tuple[Any, Any]]) -> int:
    """Most (start, end) spans open at once; at a tie an end sorts before a start."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    in_flight = peak = 0
    for _, step in edges:
        in_flight += step
        peak = max(peak, in_flight)
    return peak


@pytest.mark.parametrize(("concurrency", "spare"), [(2, 2), (4, 0)])
def test_spare_threads_leave_provider_calls_at_the_concurrency(make_stack, concurrency, spare):
    stack = make_stack("redis-pg")
    stack.start_worker("slots", capabilities=["planner"], concurrency=concurrency,
                       spare_threads=spare)
    slow = '<<fake:{"latency_ms": 300}>>'
    items = [{"custom_id": f"c{i}", "capability": "planner",
              "request": chat(f"{slow} slot {i} of {concurrency}+{spare}")} for i in range(12)]
    with api(stack) as client:
        batch = client.post("/v1/batches", json={"items": items})
        assert batch.status_code == 202, batch.text
        done = wait_batch(client, batch.json()["id"], timeout_s=60)
    assert done["request_counts"]["succeeded"] == 12
    calls = upstream_calls(stack)  # this stack's upstream serves these jobs only
    assert len(calls) == 12
    # With spare threads, four threads run jobs but only two provider calls at once; four
    # threads without spares make four calls at once.
    assert _peak_in_flight([(c["at"], c["done_at"]) for c in calls]) == concurrency


def test_more_spare_threads_than_calls_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "broker.cli", "worker", "--concurrency", "4", "--spare-threads",
         "5"], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "MOLAR_LLM_VAR_DIR": str(tmp_path / "var")})
    assert proc.returncode == 2
    assert "--spare-threads: 5 is more than --concurrency (4)" in proc.stderr
    assert not (tmp_path / "var").exists()

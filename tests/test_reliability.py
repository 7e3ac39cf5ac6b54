"""Jobs survive failure: retries, manual retry, idempotent submission, crashes, cancel, timeouts.

Real API, worker and fake upstream processes on Redis + PostgreSQL; failures are scripted with
the fake upstream's directive. Leases, deadlines and the visibility timeout are shortened
through the environment so crashes and waits resolve in seconds.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from itertools import pairwise
from typing import Any

import orjson
import psycopg
import pytest
from sqlalchemy import select

from broker.client import BrokerClient
from broker.models import Attempt, Batch, UsageEvent
from tests.conftest import SERVICE_KEY, api, chat, stack_db, upstream_calls, wait_batch, wait_job

DEADLINE_S = 3.0
VISIBILITY_TIMEOUT_S = 8
FAST = {
    "MOLAR_LLM_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
    "MOLAR_LLM_TASK_TIME_LIMIT_S": "4",
    "MOLAR_LLM_ATTEMPT_DEADLINE_S": str(DEADLINE_S),
    "MOLAR_LLM_LEASE_MARGIN_S": "1",
    "MOLAR_LLM_SCHEDULER_INTERVAL_S": "0.25",
    "MOLAR_LLM_RETRY_POLICIES": orjson.dumps(
        {"*": {"base_backoff_s": 0.2, "max_backoff_s": 1, "max_retry_after_s": 30}}
    ).decode(),
}


@pytest.fixture(scope="module")
def stack(make_stack):
    stack = make_stack("redis-pg", env=FAST)
    stack.start_worker("worker", concurrency=16)
    return stack


def scripted(text: str = "hello", **directive: Any) -> dict[str, Any]:
    """A chat request carrying a fake-upstream directive with a scenario of its own."""
    directive.setdefault("scenario", f"s-{uuid.uuid4().hex[:12]}")
    return chat(f"<<fake:{orjson.dumps(directive).decode()}>> {text}")


def scenario_of(request: dict[str, Any]) -> str:
    text = request["messages"][0]["content"]
    start = text.index("{")
    return str(orjson.loads(text[start:text.index(">>")])["scenario"])


def submit(client, capability: str, request: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", json={"capability": capability, "request": request})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def attempt_rows(client, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/jobs/{job_id}/attempts")
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def usage_events(stack, job_id: str) -> list[Any]:
    engine = stack_db(stack)
    with engine.connect() as conn:
        rows = conn.execute(
            select(UsageEvent.attempt, UsageEvent.input_tokens)
            .where(UsageEvent.job_id == job_id).order_by(UsageEvent.attempt)
        ).all()
    engine.dispose()
    return list(rows)


def gaps_s(rows: list[dict[str, Any]]) -> list[float]:
    """Seconds between the end of each attempt and the start of the next."""
    return [
        (datetime.fromisoformat(b["started_at"]) - datetime.fromisoformat(a["finished_at"]))
        .total_seconds()
        for a, b in pairwise(rows)
    ]


# -- retries ----------------------------------------------------------------------------


def test_429_with_retry_after_waits_the_hint_twice_then_succeeds_and_bills_once(stack):
    hint = {"status": 429, "retry_after": 1}
    request = scripted(fail=[hint, hint])
    with api(stack) as client:
        job_id = submit(client, "planner", request)
        seen = set()
        deadline = time.monotonic() + 30
        job = client.get(f"/v1/jobs/{job_id}").json()
        while job["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
            seen.add(job["status"])
            time.sleep(0.05)
            job = client.get(f"/v1/jobs/{job_id}").json()
        rows = attempt_rows(client, job_id)

    assert job["status"] == "succeeded", job
    assert job["attempts"] == 3
    assert "retrying" in seen
    assert [r["outcome"] for r in rows] == ["failed", "failed", "succeeded"]
    assert [r["provider_status"] for r in rows] == [429, 429, 200]
    assert all(gap >= 1.0 for gap in gaps_s(rows)), gaps_s(rows)
    calls = upstream_calls(stack, scenario=scenario_of(request))
    assert [c["status"] for c in calls] == [429, 429, 200]
    assert all(b["at"] - a["at"] >= 1.0 for a, b in pairwise(calls))
    assert [e.attempt for e in usage_events(stack, job_id)] == [3]


def test_500_three_times_then_success_on_export_work(stack):
    request = scripted(fail=[{"status": 500}] * 3)
    with api(stack) as client:
        job = wait_job(client, submit(client, "export_generator", request), timeout_s=60)
        rows = attempt_rows(client, job["id"])
    assert job["status"] == "succeeded", job
    assert [r["provider_status"] for r in rows] == [500, 500, 500, 200]
    assert len(upstream_calls(stack, scenario=scenario_of(request))) == 4
    assert len(usage_events(stack, job["id"])) == 1


def test_400_is_not_retried_and_the_error_keeps_status_code_and_retryable(stack):
    request = scripted(fail=[{"status": 400, "message": "bad field 'temperature'"}])
    with api(stack) as client:
        job = wait_job(client, submit(client, "planner", request))
        time.sleep(1.0)
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "failed"
    assert job["status"] == "failed"
    assert job["attempts"] == 1
    assert job["error"]["provider_status"] == 400
    assert job["error"]["retryable"] is False
    assert job["error"]["code"] == "provider_error"
    assert "temperature" in job["error"]["message"]
    assert len(upstream_calls(stack, scenario=scenario_of(request))) == 1
    assert usage_events(stack, job["id"]) == []


def test_exhausted_attempts_fail_then_a_manual_retry_succeeds(stack):
    # planner allows 3 attempts; the manual retry's first attempt fails once more.
    request = scripted(fail=[{"status": 503}] * 4)
    with api(stack) as client:
        job_id = submit(client, "planner", request)
        failed = wait_job(client, job_id, timeout_s=60)
        assert failed["status"] == "failed", failed
        assert failed["attempts"] == 3
        assert failed["error"]["retryable"] is True
        assert failed["error"]["provider_status"] == 503

        retried = client.post(f"/v1/jobs/{job_id}/retry")
        assert retried.status_code == 200, retried.text
        assert retried.json()["status"] in ("queued", "running", "retrying")
        done = wait_job(client, job_id, timeout_s=60)
        again = client.post(f"/v1/jobs/{job_id}/retry")
        rows = attempt_rows(client, job_id)

    assert done["status"] == "succeeded", done
    assert done["attempts"] == 5
    assert done["error"] is None
    assert [r["outcome"] for r in rows] == ["failed"] * 4 + ["succeeded"]
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_not_retryable"
    assert [e.attempt for e in usage_events(stack, job_id)] == [5]


def test_a_retry_after_above_the_ceiling_fails_at_once_as_provider_rate_limited(stack):
    request = scripted(fail=[{"status": 429, "retry_after": 600}])
    with api(stack) as client:
        job = wait_job(client, submit(client, "planner", request))
    assert job["status"] == "failed"
    assert job["attempts"] == 1
    assert job["error"]["code"] == "provider_rate_limited"
    assert job["error"]["provider_status"] == 429
    assert "600" in job["error"]["message"]


def test_a_backoff_longer_than_the_visibility_timeout_runs_the_job_once_more_only(stack):
    wait_s = VISIBILITY_TIMEOUT_S + 2
    request = scripted(fail=[{"status": 503, "retry_after": wait_s}])
    with api(stack) as client:
        job_id = submit(client, "planner", request)
        job = wait_job(client, job_id, timeout_s=60)
        # Long enough for the broker to have restored any message parked on it.
        time.sleep(VISIBILITY_TIMEOUT_S / 2)
        rows = attempt_rows(client, job_id)
    calls = upstream_calls(stack, scenario=scenario_of(request))
    assert job["status"] == "succeeded", job
    assert [c["status"] for c in calls] == [503, 200]
    assert calls[1]["at"] - calls[0]["at"] >= wait_s
    assert len(rows) == 2
    assert gaps_s(rows)[0] >= wait_s
    assert len(usage_events(stack, job_id)) == 1


# -- cancel -----------------------------------------------------------------------------


def test_cancel_of_a_waiting_job_stops_it_and_a_manual_retry_runs_it(stack):
    request = scripted(fail=[{"status": 429, "retry_after": 20}])
    with api(stack) as client:
        job_id = submit(client, "planner", request)
        waiting = wait_job(client, job_id, statuses=("retrying",))
        assert waiting["next_attempt_at"] > waiting["started_at"]
        assert waiting["error"]["provider_status"] == 429
        cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
        assert len(upstream_calls(stack, scenario=scenario_of(request))) == 1

        assert client.post(f"/v1/jobs/{job_id}/retry").status_code == 200
        done = wait_job(client, job_id)
    assert done["status"] == "succeeded"
    assert len(upstream_calls(stack, scenario=scenario_of(request))) == 2


def test_cancel_of_a_1000_item_batch_mid_flight_makes_no_call_for_cancelled_items(stack):
    request = scripted(latency_ms=60)
    items = [{"custom_id": f"c{i:04d}", "capability": "grounding_tier0", "request": request}
             for i in range(1000)]
    with api(stack) as client:
        batch = client.post("/v1/batches", json={"items": items}).json()
        deadline = time.monotonic() + 60
        while client.get(f"/v1/batches/{batch['id']}").json()["request_counts"][
                "succeeded"] < 30:
            assert time.monotonic() < deadline, "the batch never started"
            time.sleep(0.05)
        response = client.post(f"/v1/batches/{batch['id']}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] in ("cancelling", "cancelled")
        done = wait_batch(client, batch["id"], timeout_s=60)
        lines = [orjson.loads(line) for line in
                 client.get(f"/v1/batches/{batch['id']}/results").text.splitlines()]
        assert client.post(f"/v1/batches/{batch['id']}/cancel").status_code == 200

    counts = done["request_counts"]
    assert done["status"] == "cancelled"
    assert counts["queued"] == counts["running"] == 0
    assert counts["succeeded"] + counts["failed"] + counts["cancelled"] == 1000
    assert counts["cancelled"] > 0
    assert len(lines) == 1000
    assert sum(line["status"] == "cancelled" for line in lines) == counts["cancelled"]
    assert all(line["attempts"] == 0 for line in lines if line["status"] == "cancelled")
    assert all(line["result"] for line in lines if line["status"] == "succeeded")
    calls = upstream_calls(stack, scenario=scenario_of(request))
    assert len(calls) == counts["succeeded"] + counts["failed"]


# -- timeouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", [{"hang": True}, {"stall": True}], ids=["hang", "stall"])
def test_an_upstream_that_goes_silent_ends_the_attempt_at_its_deadline(stack, step):
    request = scripted(fail=[step])
    with api(stack) as client:
        job = wait_job(client, submit(client, "planner", request), timeout_s=60)
        rows = attempt_rows(client, job["id"])
    assert job["status"] == "succeeded", job
    assert rows[0]["error_code"] == "provider_timeout"
    assert DEADLINE_S * 1000 <= rows[0]["latency_ms"] <= (DEADLINE_S + 1.5) * 1000, rows[0]
    assert rows[1]["outcome"] == "succeeded"


# -- idempotent submission --------------------------------------------------------------


def test_the_same_idempotency_key_sent_20_times_at_once_creates_one_batch(stack):
    org = f"org_idem_{uuid.uuid4().hex[:8]}"
    body = {"items": [{"custom_id": f"i{n}", "capability": "planner", "request": chat(f"p{n}")}
                      for n in range(50)]}
    key = uuid.uuid4().hex
    answers: list[Any] = []
    start = threading.Barrier(20)

    def send() -> None:
        with api(stack, org=org) as client:
            start.wait()
            answers.append(client.post("/v1/batches", json=body,
                                       headers={"Idempotency-Key": key}))

    threads = [threading.Thread(target=send) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(a.status_code for a in answers) == [200] * 19 + [202], \
        [a.text for a in answers if a.status_code not in (200, 202)]
    assert len({a.json()["id"] for a in answers}) == 1
    engine = stack_db(stack)
    with engine.connect() as conn:
        batches = conn.execute(select(Batch.id).where(Batch.org_id == org)).all()
    engine.dispose()
    assert len(batches) == 1
    with api(stack, org=org) as client:
        done = wait_batch(client, batches[0].id)
        other_body = client.post("/v1/batches", json={"items": body["items"][:1]},
                                 headers={"Idempotency-Key": key})
    assert done["request_counts"]["total"] == 50
    assert other_body.status_code == 409
    assert other_body.json()["error"]["param"] == "Idempotency-Key"


def test_an_idempotency_key_returns_the_original_job_and_is_scoped_per_org(stack):
    key = uuid.uuid4().hex
    body = {"capability": "planner", "request": chat("once")}
    with api(stack, org="org_idem_a") as a, api(stack, org="org_idem_b") as b:
        first = a.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        second = a.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        other_org = b.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        bad = a.post("/v1/jobs", json=body, headers={"Idempotency-Key": "has space"})
    with BrokerClient(stack.api_url, service_key=SERVICE_KEY, org_id="org_idem_a") as client:
        via_client = client.submit_job("planner", chat("once"), idempotency_key=key)
    assert via_client["id"] == first.json()["id"]
    assert (first.status_code, second.status_code, other_org.status_code) == (202, 200, 202)
    assert first.json()["id"] == second.json()["id"] != other_org.json()["id"]
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "Idempotency-Key"


# -- manual retry of batches and from the command line -----------------------------------


def _failing_batch(client, n: int) -> tuple[str, list[str]]:
    # Each item fails once with a 400 (no automatic retry) and succeeds when tried again.
    items = [{"custom_id": f"f{i}", "capability": "export_healer",
              "request": scripted(fail=[{"status": 400}])} for i in range(n)]
    batch = client.post("/v1/batches", json={"items": items}).json()
    done = wait_batch(client, batch["id"])
    assert done["request_counts"]["failed"] == n, done
    return batch["id"], [scenario_of(item["request"]) for item in items]


def test_batch_retry_requeues_its_failed_items(stack):
    with api(stack) as client:
        batch_id, _ = _failing_batch(client, 3)
        response = client.post(f"/v1/batches/{batch_id}/retry")
        assert response.status_code == 200, response.text
        assert response.json()["requeued"] == 3
        done = wait_batch(client, batch_id)
    assert done["status"] == "completed"
    assert done["request_counts"]["succeeded"] == 3


def test_the_retry_command_requeues_what_its_filters_select_and_prints_it(stack):
    with api(stack) as client:
        batch_id, _ = _failing_batch(client, 2)
        other_id, _ = _failing_batch(client, 1)
        command = [sys.executable, "-m", "broker.cli", "retry", "--batch", batch_id,
                   "--capability", "export_healer", "--error-code", "provider_error",
                   "--since", "1h"]
        preview = subprocess.run([*command, "--dry-run"], env=stack.env, capture_output=True,
                                 text=True, timeout=60, check=False)
        assert preview.returncode == 0, preview.stderr
        assert preview.stdout.strip().splitlines()[-1] == "would re-queue 2 job(s) (dry run)"
        assert client.get(f"/v1/batches/{batch_id}").json()["request_counts"]["failed"] == 2
        out = subprocess.run(command, env=stack.env, capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        done = wait_batch(client, batch_id)
        other = client.get(f"/v1/batches/{other_id}").json()
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "re-queued 2 job(s)"
    assert all(line.startswith("requeued job_") and f"batch={batch_id}" in line
               for line in lines[:-1])
    assert done["request_counts"]["succeeded"] == 2
    assert other["request_counts"]["failed"] == 1


# -- crash safety -----------------------------------------------------------------------


# A longer deadline keeps the first, hanging call in flight until the test kills its worker.
CRASH = {**FAST, "MOLAR_LLM_ATTEMPT_DEADLINE_S": "6", "MOLAR_LLM_TASK_TIME_LIMIT_S": "8",
         "MOLAR_LLM_VISIBILITY_TIMEOUT_S": "16"}


@pytest.fixture(scope="module")
def crash_stack(make_stack):
    return make_stack("redis-pg", env=CRASH)


def _wait_attempt(client, job_id: str, outcome: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(r["outcome"] == outcome for r in attempt_rows(client, job_id)):
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} has no {outcome} attempt after {timeout_s}s")


def test_a_worker_killed_mid_call_leaves_a_job_that_the_next_worker_finishes_once(crash_stack):
    request = scripted(fail=[{"hang": True}])
    crash_stack.start_worker("doomed", concurrency=4)
    with api(crash_stack) as client:
        job_id = submit(client, "planner", request)
        _wait_attempt(client, job_id, "running")
        time.sleep(0.3)
        crash_stack.kill("doomed", signal.SIGKILL)
        crash_stack.start_worker("survivor", concurrency=4)
        job = wait_job(client, job_id, timeout_s=60)
        rows = attempt_rows(client, job_id)
    crash_stack.kill("survivor")
    assert job["status"] == "succeeded", job
    assert [r["outcome"] for r in rows] == ["lost", "succeeded"]
    assert len(usage_events(crash_stack, job_id)) == 1


def test_a_worker_killed_before_its_ledger_write_is_finished_without_a_second_call(crash_stack):
    request = scripted()
    crash_stack.start_worker("blocked", concurrency=4)
    with api(crash_stack) as client, psycopg.connect(
            crash_stack.env["MOLAR_LLM_DATABASE_URL"]) as lock:
        lock.execute("LOCK TABLE usage_events IN EXCLUSIVE MODE")
        job_id = submit(client, "planner", request)
        # The answer is kept on the attempt row; the ledger insert now waits on the lock.
        _wait_attempt(client, job_id, "succeeded")
        time.sleep(0.3)
        crash_stack.kill("blocked", signal.SIGKILL)
        lock.rollback()
        crash_stack.start_worker("finisher", concurrency=4)
        job = wait_job(client, job_id, timeout_s=60)
    crash_stack.kill("finisher")
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1
    assert len(upstream_calls(crash_stack, scenario=scenario_of(request))) == 1
    assert [e.attempt for e in usage_events(crash_stack, job_id)] == [1]
    engine = stack_db(crash_stack)
    with engine.connect() as conn:
        kept = conn.execute(select(Attempt.result).where(Attempt.job_id == job_id)).all()
    engine.dispose()
    assert [row.result for row in kept] == [None]  # the kept answer is released once finished


# -- the embedded default ---------------------------------------------------------------


def test_retries_idempotency_and_cancel_work_on_the_embedded_default(make_stack):
    stack = make_stack("embedded", env=FAST)
    stack.start_worker("embedded-worker", concurrency=4)
    request = scripted(fail=[{"status": 429, "retry_after": 1}])
    with api(stack) as client:
        job_id = submit(client, "planner", request)
        job = wait_job(client, job_id, timeout_s=60)
        key = {"Idempotency-Key": uuid.uuid4().hex}
        body = {"capability": "planner", "request": scripted(fail=[
            {"status": 429, "retry_after": 20}])}
        first = client.post("/v1/jobs", json=body, headers=key)
        second = client.post("/v1/jobs", json=body, headers=key)
        wait_job(client, first.json()["id"], statuses=("retrying",))
        cancelled = client.post(f"/v1/jobs/{first.json()['id']}/cancel").json()
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert (first.status_code, second.status_code) == (202, 200)
    assert cancelled["status"] == "cancelled"


# One call slot: a hanging export call holds it for its 3 s deadline, while planner
# attempts may wait for it only 0.5 s.
ONE_SLOT = {**FAST, "MOLAR_LLM_RETRY_POLICIES": orjson.dumps({
    "*": {"base_backoff_s": 0.2, "max_backoff_s": 0.5, "max_retry_after_s": 30},
    "planner": {"attempt_deadline_s": 0.5, "max_attempts": 20},
}).decode()}


def test_a_job_that_waits_past_its_deadline_for_a_call_slot_is_retried(make_stack):
    stack = make_stack("redis-pg", env=ONE_SLOT)
    stack.start_worker("one-slot", capabilities=["planner", "export_generator"],
                       concurrency=1, spare_threads=1)
    with api(stack) as client:
        hog = submit(client, "export_generator", scripted(fail=[{"hang": True}]))
        _wait_attempt(client, hog, "running")
        time.sleep(0.2)  # the hog's call is under way and holds the only slot
        request = scripted()
        job_id = submit(client, "planner", request)
        job = wait_job(client, job_id, timeout_s=60)
        rows = attempt_rows(client, job_id)
        assert wait_job(client, hog, timeout_s=60)["status"] == "succeeded"
    assert job["status"] == "succeeded", job
    assert rows[0]["outcome"] == "failed" and rows[0]["error_code"] == "call_slot_timeout"
    # The wait is not provider latency: the attempt never reached the provider.
    assert rows[0]["latency_ms"] < 200, rows[0]
    assert rows[-1]["outcome"] == "succeeded"
    # Only the attempt that got the slot reached the provider.
    assert len(upstream_calls(stack, scenario=scenario_of(request))) == 1

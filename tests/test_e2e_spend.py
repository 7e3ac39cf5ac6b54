"""End to end: metering and the spend cap through real API, Redis, PostgreSQL, worker and
fake upstream processes.

Costs are checked to the last decimal against the fake upstream's token rules: a chat prompt
is 4 tokens per message plus one per 4 characters (rounded up), an embedding input one per 4
characters, and the directive fixes completion and cached token counts.
"""

from __future__ import annotations

import math
import secrets
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select

from broker.models import Job, UsageEvent
from broker.settings import DEFAULTS_DIR
from tests.conftest import api, chat, stack_db, upstream_calls, wait_job

MILLION = Decimal(1_000_000)
# A chat model whose price changed: an old price, today's, and one not yet in force.
DATED_MODEL = "dated-chat"
TODAY_PRICE = {"input": Decimal("3.00"), "cached_input": Decimal("0.75"),
               "output": Decimal("12.00")}
DATED_ROUTING = {"planner": {"provider_integration_id": "molar-managed", "model": DATED_MODEL}}
# Pinned, so the expected prices do not follow the deployment's default for planner.
MINI_ROUTING = {"planner": {"provider_integration_id": "molar-managed",
                            "model": "gpt-4.1-mini"}}


def catalog_with_a_price_change(path: Path) -> Path:
    today = datetime.now(UTC).date().isoformat()
    path.write_text((DEFAULTS_DIR / "catalog.toml").read_text() + f"""
[models."{DATED_MODEL}"]
provider = "openai"
kind = "chat"
context_window = 128000
max_output_tokens = 4096
prices = [
  {{ effective_from = 2000-01-01, input = "1.00", cached_input = "0.25", output = "4.00" }},
  {{ effective_from = {today}, input = "3.00", cached_input = "0.75", output = "12.00" }},
  {{ effective_from = 2999-01-01, input = "90", cached_input = "90", output = "90" }},
]
""")
    return path


@pytest.fixture(scope="module")
def stack(make_stack, tmp_path_factory):
    catalog = catalog_with_a_price_change(tmp_path_factory.mktemp("catalog") / "catalog.toml")
    stack = make_stack("redis-pg", env={"MOLAR_LLM_CATALOG_FILE": str(catalog)})
    stack.start_worker("worker-spend", concurrency=64)
    return stack


def directive(**fields: Any) -> str:
    return "<<fake:" + orjson.dumps(fields).decode() + ">>"


def plain(amount_usd: Decimal) -> str:
    """How the API writes money: plain decimal notation, no trailing zeros past the cents."""
    text = format(amount_usd.normalize(), "f")
    return text if len(text.partition(".")[2]) >= 2 else f"{amount_usd:.2f}"


def prompt_tokens(text: str) -> int:
    return 4 + math.ceil(len(text) / 4)


def usage_event(stack, job_id: str) -> Any:
    engine = stack_db(stack)
    with engine.connect() as conn:
        rows = conn.execute(select(UsageEvent).where(UsageEvent.job_id == job_id)).all()
    engine.dispose()
    assert len(rows) <= 1
    return rows[0] if rows else None


def new_org(name: str) -> str:
    return f"org_{name}_{secrets.token_hex(3)}"


def set_cap(client: httpx.Client, org: str, cap_usd: str | None) -> None:
    response = client.put(f"/v1/orgs/{org}/settings", json={"spend_cap_usd": cap_usd})
    assert response.status_code == 200, response.text


# -- exact costs ----------------------------------------------------------------------------------


def test_cached_input_tokens_are_billed_at_the_cached_rate_of_the_price_in_force(stack):
    text = "plan the crawl of the checkout " + directive(cached_tokens=8, completion_tokens=20)
    with api(stack, org=new_org("cached")) as client:
        job = client.post("/v1/jobs", json={
            "capability": "planner", "request": chat(text, max_tokens=20),
            "model_routing": DATED_ROUTING}).json()
        done = wait_job(client, job["id"])

    prompt = prompt_tokens(text)
    expected = ((prompt - 8) * TODAY_PRICE["input"] + 8 * TODAY_PRICE["cached_input"]
                + 20 * TODAY_PRICE["output"]) / MILLION
    assert done["status"] == "succeeded", done
    assert done["usage"] == {"input_tokens": prompt, "cached_input_tokens": 8,
                             "output_tokens": 20, "cost_usd": plain(expected),
                             "estimated": False}
    event = usage_event(stack, job["id"])
    assert (event.input_tokens, event.cached_input_tokens, event.output_tokens) == (prompt, 8, 20)
    assert event.cost_usd == expected
    assert (event.billing_kind, event.integration_id, event.model, event.estimated) == (
        "hosted", "molar-managed", DATED_MODEL, False)
    assert event.meters == {"debugger_tokens_input": prompt, "debugger_tokens_output": 20}


def test_embeddings_are_metered_at_the_input_price(stack):
    inputs = ["alpha beta", "gamma", "a longer sentence about the login form"]
    with api(stack, org=new_org("embed")) as client:
        job = client.post("/v1/jobs", json={"capability": "embeddings",
                                            "request": {"input": inputs}}).json()
        done = wait_job(client, job["id"])

    tokens = sum(math.ceil(len(text) / 4) for text in inputs)  # 3 + 2 + 10
    expected = tokens * Decimal("0.02") / MILLION  # text-embedding-3-small
    assert done["status"] == "succeeded", done
    event = usage_event(stack, job["id"])
    assert (event.input_tokens, event.output_tokens, event.estimated) == (15, 0, False)
    assert event.cost_usd == expected == Decimal("0.0000003")
    assert event.meters == {"debugger_tokens_input": 15, "debugger_tokens_output": 0}
    assert done["usage"]["cost_usd"] == "0.0000003"


def test_a_reply_without_usage_is_billed_on_an_estimate_marked_as_such(stack):
    text = "heal this selector " + directive(no_usage=True, completion_tokens=12)
    with api(stack, org=new_org("nousage")) as client:
        job = client.post("/v1/jobs", json={
            "capability": "planner", "request": chat(text, max_tokens=50),
            "model_routing": DATED_ROUTING}).json()
        done = wait_job(client, job["id"])

    assert done["status"] == "succeeded", done
    assert "usage" not in done["result"]
    content = done["result"]["choices"][0]["message"]["content"]
    # The estimate: 16 characters of overhead per message, then a token per 4 characters.
    input_tokens = math.ceil((len(text) + 16) / 4)
    output_tokens = min(math.ceil(len(content) / 4), 50)
    expected = (input_tokens * TODAY_PRICE["input"]
                + output_tokens * TODAY_PRICE["output"]) / MILLION
    event = usage_event(stack, job["id"])
    assert event.estimated is True
    assert (event.input_tokens, event.output_tokens) == (input_tokens, output_tokens)
    assert event.cost_usd == expected > 0
    assert done["usage"]["estimated"] is True
    assert done["usage"]["cost_usd"] == plain(expected)


# -- the cap at submission and at dispatch ---------------------------------------------------------


def _job_count(stack, org: str) -> int:
    engine = stack_db(stack)
    with engine.connect() as conn:
        count = len(conn.execute(select(Job.id).where(Job.org_id == org)).all())
    engine.dispose()
    return count


def test_hosted_submissions_are_402_once_the_cap_is_reached_and_byok_ones_are_accepted(stack):
    org = new_org("zero")
    byok = {"planner": {"provider_integration_id": "byok-own", "model": "llama-3.1-8b-instruct"}}
    with api(stack, org=org) as client:
        set_cap(client, org, "0")
        job = client.post("/v1/jobs", json={"capability": "planner", "request": chat("x")})
        batch = client.post("/v1/batches", json={"items": [
            {"custom_id": "a", "capability": "planner", "request": chat("x")},
            {"custom_id": "b", "capability": "embeddings", "request": {"input": "x"}}]})
        # planner goes to the org's own key, but embeddings still runs on the platform's.
        mixed = client.post("/v1/batches", json={"model_routing": byok, "items": [
            {"custom_id": "a", "capability": "planner", "request": chat("x")},
            {"custom_id": "b", "capability": "embeddings", "request": {"input": "x"}}]})
        assert _job_count(stack, org) == 0
        accepted = client.post("/v1/jobs", json={"capability": "planner", "request": chat("x"),
                                                 "model_routing": byok})

    for refused in (job, batch, mixed):
        assert refused.status_code == 402, refused.text
        error = refused.json()["error"]
        assert error["code"] == "spend_cap_exceeded"
        assert error["type"] == "insufficient_quota"
        assert error["message"].startswith("org LLM spend cap exceeded")
        assert "BYOK" in error["message"] and "raise spend_cap_usd" in error["message"]
    assert "embeddings" in mixed.json()["error"]["message"]
    assert accepted.status_code == 202, accepted.text
    assert _job_count(stack, org) == 1


def test_a_call_whose_bound_does_not_fit_fails_without_reaching_the_provider(stack):
    org = new_org("tight")
    scenario = f"tight-{secrets.token_hex(4)}"
    with api(stack, org=org) as client:
        set_cap(client, org, "0.01")
        # No max_tokens: the bound takes gpt-4.1's 32,768 output tokens at $8/M, about $0.26.
        job = client.post("/v1/jobs", json={
            "capability": "export_generator", "request": chat(directive(scenario=scenario))})
        assert job.status_code == 202, job.text
        done = wait_job(client, job.json()["id"])
        spend = client.get(f"/v1/orgs/{org}/spend").json()

    assert done["status"] == "failed"
    assert done["error"]["code"] == "spend_cap_exceeded"
    assert done["error"]["message"].startswith("org LLM spend cap exceeded")
    assert done["attempts"] == 1 and done["usage"] is None
    assert upstream_calls(stack, scenario=scenario) == []
    assert usage_event(stack, done["id"]) is None
    assert (spend["cap_usd"], spend["spent_usd"], spend["reserved_usd"],
            spend["remaining_usd"]) == ("0.01", "0.00", "0.00", "0.01")


def test_spend_and_usage_report_the_same_money_as_the_jobs(stack):
    org = new_org("report")
    with api(stack, org=org) as client:
        set_cap(client, org, "2.5")
        ids = [client.post("/v1/jobs", json=body).json()["id"] for body in (
            {"capability": "planner", "request": chat("one", max_tokens=30),
             "model_routing": MINI_ROUTING},
            {"capability": "planner", "request": chat("two", max_tokens=30),
             "model_routing": DATED_ROUTING},
            {"capability": "embeddings", "request": {"input": "three"}},
        )]
        jobs = [wait_job(client, job_id) for job_id in ids]
        spend = client.get(f"/v1/orgs/{org}/spend").json()
        by_model = client.get("/v1/usage", params={"group_by": "model,billing",
                                                   "start": "2000-01-01"}).json()
        by_day = client.get("/v1/usage", params=[("group_by", "day"),
                                                 ("group_by", "capability")]).json()

    assert [job["status"] for job in jobs] == ["succeeded"] * 3
    costs = [Decimal(job["usage"]["cost_usd"]) for job in jobs]
    total = sum(costs, Decimal(0))
    today = datetime.now(UTC).date()
    assert spend["period_start"] == today.replace(day=1).isoformat()
    assert Decimal(spend["spent_usd"]) == total
    assert (spend["cap_usd"], spend["reserved_usd"]) == ("2.50", "0.00")
    assert Decimal(spend["remaining_usd"]) == Decimal("2.5") - total

    assert [row["group"] for row in by_model["data"]] == [
        {"model": DATED_MODEL, "billing": "hosted"},
        {"model": "gpt-4.1-mini", "billing": "hosted"},
        {"model": "text-embedding-3-small", "billing": "hosted"}]
    assert [Decimal(row["cost_usd"]) for row in by_model["data"]] == [costs[1], costs[0],
                                                                       costs[2]]
    assert Decimal(by_model["totals"]["cost_usd"]) == total
    assert by_model["totals"]["events"] == 3
    assert by_model["totals"]["meters"] == {
        "debugger_tokens_input": sum(job["usage"]["input_tokens"] for job in jobs),
        "debugger_tokens_output": sum(job["usage"]["output_tokens"] for job in jobs)}
    assert {tuple(row["group"].items()) for row in by_day["data"]} == {
        (("day", today.isoformat()), ("capability", "embeddings")),
        (("day", today.isoformat()), ("capability", "planner"))}


BAD_USAGE_QUERIES = [
    pytest.param({"group_by": "modle"}, "group_by", id="unknown-group"),
    pytest.param({"group_by": "model,colour"}, "group_by", id="unknown-second-group"),
    pytest.param({"start": "yesterday"}, "start", id="start-not-a-date"),
    pytest.param({"end": "2026-13-01"}, "end", id="end-not-a-date"),
    pytest.param({"start": "2026-12-02", "end": "2026-12-01"}, "end", id="end-before-start"),
]


@pytest.mark.parametrize(("params", "param"), BAD_USAGE_QUERIES)
def test_bad_usage_queries_are_400_naming_the_parameter(stack, params, param):
    with api(stack) as client:
        response = client.get("/v1/usage", params=params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert param in error["message"]


def test_another_orgs_spend_is_open_to_the_service_key_only(stack):
    with api(stack, org="org_reader") as client:
        response = client.get("/v1/orgs/org_someone_else/spend")
        bad = client.get("/v1/orgs/bad org/spend")
    assert response.status_code == 200
    assert response.json()["cap_usd"] is None and response.json()["remaining_usd"] is None
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "org"


# -- the cap under concurrency ---------------------------------------------------------------------

HOSTED_JOBS = 160
BYOK_JOBS = 24
# Long enough that 32 calls overlap even when a busy machine dispatches a few per second.
CALL_LATENCY_MS = 8000
CONCURRENT_CAP_USD = Decimal("0.03")
BYOK_ID = "byok-capped"


def store_byok_integration(client: httpx.Client, stack, org: str) -> None:
    """Store the org's own key for the fake upstream as an ``openai_compatible`` integration."""
    key = f"byok-key-{secrets.token_hex(8)}"
    httpx.post(f"{stack.upstream_url}/_control/keys", json={"keys": [key]}).raise_for_status()
    response = client.post(f"/v1/orgs/{org}/integrations", json={
        "id": BYOK_ID, "provider": "openai_compatible", "base_url": f"{stack.upstream_url}/v1",
        "api_key": key})
    assert response.status_code == 201, response.text


def max_in_flight(calls: list[dict[str, Any]], latency_s: float) -> int:
    """Most calls the upstream held at once; each is held ``latency_s`` after it arrived."""
    starts = sorted(call["at"] for call in calls)
    return max((sum(1 for t in starts if s <= t < s + latency_s) for s in starts), default=0)


def test_racing_jobs_never_overrun_the_cap_and_byok_work_goes_on(stack):
    org = new_org("race")
    hosted, byok = f"race-hosted-{secrets.token_hex(4)}", f"race-byok-{secrets.token_hex(4)}"
    hosted_text = "map the settings page " + directive(
        scenario=hosted, latency_ms=CALL_LATENCY_MS, completion_tokens=400)
    items = [{"custom_id": f"hosted-{i:03d}", "capability": "planner",
              "request": chat(hosted_text, max_tokens=400)} for i in range(HOSTED_JOBS)]
    for i in range(BYOK_JOBS):  # spread through the batch, so both kinds run side by side
        items.insert(i * 7, {"custom_id": f"byok-{i:03d}", "capability": "export_healer",
                             "request": chat(directive(scenario=byok), max_tokens=50)})
    routing = {"export_healer": {"provider_integration_id": BYOK_ID,
                                 "model": "llama-3.1-8b-instruct"},
               **MINI_ROUTING}

    with api(stack, org=org) as client:
        set_cap(client, org, str(CONCURRENT_CAP_USD))
        store_byok_integration(client, stack, org)
        batch = client.post("/v1/batches", json={"items": items, "model_routing": routing})
        assert batch.status_code == 202, batch.text
        samples = watch_spend(client, org, batch.json()["id"])
        lines = [orjson.loads(line) for line in
                 client.get(f"/v1/batches/{batch.json()['id']}/results").text.splitlines()]
        spend = client.get(f"/v1/orgs/{org}/spend").json()
        usage = client.get("/v1/usage", params={"group_by": "billing"}).json()

    # At no moment did spent plus held money pass the cap.
    assert samples and all(spent + held <= CONCURRENT_CAP_USD for spent, held in samples)
    hosted_lines = [line for line in lines if line["custom_id"].startswith("hosted-")]
    succeeded = [line for line in hosted_lines if line["status"] == "succeeded"]
    refused = [line for line in hosted_lines if line["status"] != "succeeded"]
    calls = upstream_calls(stack, scenario=hosted)
    assert len(calls) == len(succeeded) >= 32
    assert max_in_flight(calls, CALL_LATENCY_MS / 1000) >= 32
    assert refused and {line["status"] for line in refused} == {"failed"}
    assert {line["error"]["code"] for line in refused} == {"spend_cap_exceeded"}

    spent = Decimal(spend["spent_usd"])
    assert spent <= CONCURRENT_CAP_USD and spend["reserved_usd"] == "0.00"
    assert spent == sum((Decimal(line["usage"]["cost_usd"]) for line in succeeded), Decimal(0))
    billed = {row["group"]["billing"]: row for row in usage["data"]}
    assert Decimal(billed["hosted"]["cost_usd"]) == spent
    assert billed["hosted"]["events"] == len(succeeded)

    byok_lines = [line for line in lines if line["custom_id"].startswith("byok-")]
    assert {line["status"] for line in byok_lines} == {"succeeded"}
    assert len(upstream_calls(stack, scenario=byok)) == BYOK_JOBS
    assert billed["byok"]["events"] == BYOK_JOBS


def watch_spend(client: httpx.Client, org: str, batch_id: str,
                timeout_s: float = 150) -> list[tuple[Decimal, Decimal]]:
    """Sample (spent, reserved) until the batch completes."""
    samples: list[tuple[Decimal, Decimal]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        spend = client.get(f"/v1/orgs/{org}/spend").json()
        samples.append((Decimal(spend["spent_usd"]), Decimal(spend["reserved_usd"])))
        if client.get(f"/v1/batches/{batch_id}").json()["status"] == "completed":
            return samples
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} not completed after {timeout_s}s")

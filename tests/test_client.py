"""The Python caller client against a real stack: submit, wait, iterate, typed errors."""

from __future__ import annotations

import pytest

from broker import errors
from broker.client import BrokerClient
from tests.conftest import SERVICE_KEY, chat


@pytest.fixture(scope="module")
def stack(make_stack):
    stack = make_stack("redis-pg")
    stack.start_worker("worker", concurrency=16)
    return stack


def test_the_client_submits_a_batch_waits_and_streams_results_in_order(stack):
    items = [{"custom_id": f"c{i}", "capability": "grounding_tier0", "request": chat(f"{i}")}
             for i in range(25)]
    with BrokerClient(stack.api_url, service_key=SERVICE_KEY, org_id="org_client") as client:
        batch = client.submit_batch(items, run_id="client-run")
        done = client.wait_batch(batch["id"], poll_s=0.1, timeout_s=120)
        lines = list(client.iter_results(batch["id"]))
    assert done["status"] == "completed"
    assert [line["custom_id"] for line in lines] == [f"c{i}" for i in range(25)]
    assert {line["status"] for line in lines} == {"succeeded"}


def test_the_client_waits_for_a_single_job(stack):
    with BrokerClient(stack.api_url, service_key=SERVICE_KEY, org_id="org_client") as client:
        job = client.submit_job("planner", chat("plan"))
        done = client.wait_job(job["id"], timeout_s=60, poll_s=0.1)
    assert done["status"] == "succeeded"
    assert done["usage"]["output_tokens"] > 0


def test_the_client_raises_typed_errors_carrying_the_param(stack):
    with BrokerClient(stack.api_url, service_key=SERVICE_KEY, org_id="org_client") as client:
        with pytest.raises(errors.NotFound):
            client.get_job("job_missing")
        with pytest.raises(errors.InvalidRequest) as bad:
            client.submit_job("planer", chat("x"))
    assert bad.value.param == "capability"
    assert "planner" in bad.value.message
    with BrokerClient(stack.api_url, service_key="wrong", org_id="org_client") as client, \
            pytest.raises(errors.Unauthenticated):
        client.get_job("job_missing")

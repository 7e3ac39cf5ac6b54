"""The caller client must not report a slow but successful submission as a failure.

A 50,000-item batch takes tens of seconds to accept on a busy host. A client that gives up
after its polling timeout raises ``ServiceUnavailable`` although the batch exists; a caller
that retries then runs every job twice.
"""

from __future__ import annotations

from sqlalchemy import func, select

from broker.client import BrokerClient
from broker.models import Batch
from tests.conftest import SERVICE_KEY, chat, stack_db


def test_a_batch_slower_to_accept_than_the_client_timeout_is_still_returned(make_stack):
    stack = make_stack("redis-pg")
    items = [{"custom_id": f"s{i}", "capability": "planner", "request": chat(f"{i}")}
             for i in range(5000)]
    with BrokerClient(stack.api_url, service_key=SERVICE_KEY, org_id="org_slow",
                      timeout_s=0.05) as client:
        batch = client.submit_batch(items)

    assert batch["request_counts"]["total"] == 5000
    engine = stack_db(stack)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Batch)) == 1
    engine.dispose()

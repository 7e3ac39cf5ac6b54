"""Input that parses as JSON but that the database cannot hold must be refused, not crash.

PostgreSQL text refuses NUL bytes; the JSON serialiser refuses integers beyond 64 bits and
lone UTF-16 surrogates. Each used to surface as a 500 after validation had passed.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from broker.devstack import LocalStack
from broker.models import Batch, Job
from tests.conftest import api, chat, stack_db


@pytest.fixture(scope="module")
def stack(make_stack) -> LocalStack:
    stack: LocalStack = make_stack("redis-pg")
    return stack


def _rows(stack: LocalStack) -> tuple[int, int]:
    engine = stack_db(stack)
    with engine.connect() as conn:
        jobs = conn.scalar(select(func.count()).select_from(Job)) or 0
        batches = conn.scalar(select(func.count()).select_from(Batch)) or 0
    engine.dispose()
    return jobs, batches


def _batch(request: dict[str, object], **fields: object) -> dict[str, object]:
    return {"items": [{"custom_id": "ok", "capability": "planner", "request": chat("fine")},
                      {"custom_id": "bad", "capability": "planner", "request": request}],
            **fields}


SURROGATE = b'{"role": "user", "content": "\\ud800"}'
UNSTORABLE = [
    pytest.param("/v1/jobs", {"capability": "planner", "request": chat("x", seed=2**64)},
                 "request", id="integer-beyond-64-bits-in-request"),
    pytest.param("/v1/jobs", {"capability": "planner", "request": chat("x"),
                              "metadata": {"n": -(2**70)}},
                 "metadata", id="integer-beyond-64-bits-in-metadata"),
    pytest.param("/v1/jobs", b'{"capability": "planner", "request": {"messages": ['
                 + SURROGATE + b"]}}", "request", id="lone-surrogate-in-request"),
    pytest.param("/v1/jobs", {"capability": "planner", "request": chat("x"),
                              "run_id": "run\x00one"},
                 "run_id", id="nul-byte-in-run-id"),
    pytest.param("/v1/batches", _batch(chat("x", max_tokens=2**65)), "items[1].request",
                 id="integer-beyond-64-bits-in-a-batch-item"),
    pytest.param("/v1/batches", _batch(chat("x"), run_id="run\x00two"), "run_id",
                 id="nul-byte-in-batch-run-id"),
]


@pytest.mark.parametrize(("path", "body", "param"), UNSTORABLE)
def test_values_the_database_cannot_hold_are_400_naming_the_field_and_write_nothing(
    stack, path, body, param
):
    before = _rows(stack)
    with api(stack) as client:
        if isinstance(body, bytes):
            response = client.post(path, content=body,
                                   headers={"Content-Type": "application/json"})
        else:
            response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert param in error["message"]
    assert _rows(stack) == before


@pytest.mark.parametrize("path", ["/v1/jobs/job_%00x", "/v1/batches/batch_%00x",
                                  "/v1/batches/batch_%00x/results"])
def test_an_id_with_a_nul_byte_is_404_not_500(stack, path):
    with api(stack) as client:
        response = client.get(path)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["type"] == "not_found_error"


def test_a_body_that_is_not_utf8_is_400_invalid_json_and_writes_nothing(stack):
    before = _rows(stack)
    body = (b'{"capability": "planner", "request": {"messages": '
            b'[{"role": "user", "content": "\xff"}]}}')
    with api(stack) as client:
        response = client.post("/v1/jobs", content=body,
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json"
    assert error["param"] == "body"
    assert _rows(stack) == before

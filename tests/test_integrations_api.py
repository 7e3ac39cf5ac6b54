"""The integration store's HTTP API and the SEC-05 refusal of raw keys, on a real API process."""

from __future__ import annotations

import secrets

import httpx
import pytest
from sqlalchemy import func, select

from broker.models import Batch, Integration, Job
from tests.conftest import SERVICE_KEY, api, chat, stack_db


@pytest.fixture(scope="module")
def stack(make_stack):
    return make_stack("embedded")


def new_key() -> str:
    return f"canary-{secrets.token_hex(16)}"


def test_create_list_show_rotate_and_delete_never_return_the_key(stack):
    key, rotated = new_key(), new_key()
    with api(stack, org="org_crud") as client:
        created = client.post("/v1/orgs/org_crud/integrations", json={
            "id": "byok-litellm", "provider": "openai_compatible",
            "base_url": "http://litellm.internal:4000/v1/", "api_key": key})
        listed = client.get("/v1/orgs/org_crud/integrations")
        shown = client.get("/v1/orgs/org_crud/integrations/byok-litellm")
        updated = client.put("/v1/orgs/org_crud/integrations/byok-litellm",
                             json={"api_key": rotated, "base_url": "https://llm.example/v1"})
        deleted = client.delete("/v1/orgs/org_crud/integrations/byok-litellm")
        gone = client.get("/v1/orgs/org_crud/integrations/byok-litellm")

    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"] == "byok-litellm"
    assert body["provider"] == "openai_compatible"
    assert body["base_url"] == "http://litellm.internal:4000/v1"
    assert body["key_hint"] == "..." + key[-4:]
    assert [item["id"] for item in listed.json()["data"]] == ["byok-litellm"]
    assert shown.json()["key_hint"] == "..." + key[-4:]
    assert updated.status_code == 200, updated.text
    assert updated.json()["key_hint"] == "..." + rotated[-4:]
    assert updated.json()["base_url"] == "https://llm.example/v1"
    assert deleted.json() == {"id": "byok-litellm", "object": "llm.integration.deleted",
                              "deleted": True}
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "integration_not_found"
    for response in (created, listed, shown, updated, deleted, gone):
        assert key not in response.text and rotated not in response.text


def test_the_stored_key_is_a_fernet_token_not_the_plaintext(stack):
    key = new_key()
    with api(stack, org="org_enc") as client:
        assert client.post("/v1/orgs/org_enc/integrations", json={
            "id": "byok-enc", "provider": "openai", "api_key": key}).status_code == 201
    engine = stack_db(stack)
    with engine.connect() as conn:
        row = conn.execute(select(Integration).where(Integration.org_id == "org_enc")).one()
    engine.dispose()
    assert key not in row.key_ciphertext
    assert row.key_ciphertext.startswith("gAAAA")  # Fernet's version byte, base64
    assert row.base_url is None


def test_integrations_of_one_org_are_404_to_another(stack):
    with api(stack, org="org_owner") as client:
        client.post("/v1/orgs/org_owner/integrations", json={
            "id": "byok-mine", "provider": "openai", "api_key": new_key()})
    with api(stack, org="org_other") as other:
        assert other.get("/v1/orgs/org_other/integrations/byok-mine").status_code == 404
        assert other.put("/v1/orgs/org_other/integrations/byok-mine",
                         json={"api_key": new_key()}).status_code == 404
        assert other.delete("/v1/orgs/org_other/integrations/byok-mine").status_code == 404
        assert other.get("/v1/orgs/org_other/integrations").json()["data"] == []
    with api(stack, org="org_owner") as client:
        assert client.get("/v1/orgs/org_owner/integrations/byok-mine").status_code == 200


def test_storing_an_id_twice_is_409_and_keeps_the_first(stack):
    first = new_key()
    with api(stack, org="org_dup") as client:
        client.post("/v1/orgs/org_dup/integrations",
                    json={"id": "byok-dup", "provider": "openai", "api_key": first})
        again = client.post("/v1/orgs/org_dup/integrations",
                            json={"id": "byok-dup", "provider": "openai", "api_key": new_key()})
        shown = client.get("/v1/orgs/org_dup/integrations/byok-dup").json()
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "integration_exists"
    assert shown["key_hint"] == "..." + first[-4:]


GOOD = {"id": "byok-ok", "provider": "openai", "api_key": "abcdefgh-12345678"}
BAD_INTEGRATIONS = [
    pytest.param({**GOOD, "id": "molar-managed"}, "id", "integration_id_reserved",
                 id="reserved-id"),
    pytest.param({**GOOD, "id": "openai-prod"}, "id", "invalid_request", id="id-without-byok"),
    pytest.param({**GOOD, "provider": "cohere"}, "provider", "invalid_request",
                 id="unknown-provider"),
    pytest.param({**GOOD, "provider": "openai_compatible"}, "base_url", "invalid_request",
                 id="compatible-without-base-url"),
    pytest.param({**GOOD, "base_url": "ftp://x"}, "base_url", "invalid_request",
                 id="base-url-not-http"),
    pytest.param({**GOOD, "base_url": "https://user:pw@llm.example/v1"}, "base_url",
                 "raw_credentials_rejected", id="base-url-with-credentials"),
    pytest.param({**GOOD, "base_url": "https://llm.example/v1?key=abc"}, "base_url",
                 "raw_credentials_rejected", id="base-url-with-query"),
    pytest.param({k: v for k, v in GOOD.items() if k != "api_key"}, "api_key", "missing_field",
                 id="missing-key"),
    pytest.param({**GOOD, "api_key": "short"}, "api_key", "invalid_request", id="key-too-short"),
    pytest.param({**GOOD, "api_key": "Bearer abcdefgh12345678"}, "api_key", "invalid_request",
                 id="key-with-space"),
    pytest.param({**GOOD, "colour": "red"}, "colour", "unknown_field", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_INTEGRATIONS)
def test_bad_integrations_are_400_naming_the_field_and_store_nothing(stack, body, param, code):
    with api(stack, org="org_bad") as client:
        response = client.post("/v1/orgs/org_bad/integrations", json=body)
        listed = client.get("/v1/orgs/org_bad/integrations").json()["data"]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert param in error["message"]
    assert "abcdefgh12345678" not in response.text
    assert listed == []


def test_an_empty_put_is_400_and_changes_nothing(stack):
    with api(stack, org="org_put") as client:
        client.post("/v1/orgs/org_put/integrations", json={**GOOD, "id": "byok-put"})
        response = client.put("/v1/orgs/org_put/integrations/byok-put", json={})
        compatible = client.put("/v1/orgs/org_put/integrations/byok-put",
                                json={"provider": "anthropic"})
    assert response.status_code == 400
    assert compatible.status_code == 400
    assert compatible.json()["error"]["code"] == "unknown_field"


# --- SEC-05: raw keys refused on submission -----------------------------------------------

OPENAI_SHAPED = "sk-proj-" + "A1b2C3d4" * 5
ANTHROPIC_SHAPED = "sk-ant-api03-" + "Z9y8X7w6" * 5
ROUTE = {"provider_integration_id": "molar-managed", "model": "gpt-4.1-mini"}
JOB = {"capability": "planner", "request": chat("hello")}
RAW_IN_JOBS = [
    pytest.param({**JOB, "api_key": "anything-12345678"}, {}, "api_key", id="top-level-field"),
    pytest.param({**JOB, "request": {**chat("x"), "api_key": "anything-12345678"}}, {},
                 "request.api_key", id="field-in-request"),
    pytest.param({**JOB, "metadata": {"provider": {"openai_api_key": "v-12345678"}}}, {},
                 "metadata.provider.openai_api_key", id="field-in-metadata"),
    pytest.param({**JOB, "model_routing": {"planner": {**ROUTE, "api_key": "x-12345678"}}}, {},
                 "model_routing.planner.api_key", id="field-in-model-routing"),
    pytest.param({**JOB, "model_routing": {"planner": {**ROUTE,
                                                       "provider_integration_id": OPENAI_SHAPED}}},
                 {}, "model_routing.planner.provider_integration_id", id="openai-key-shape"),
    pytest.param({**JOB, "model_routing": {"planner": {**ROUTE, "model": ANTHROPIC_SHAPED}}},
                 {}, "model_routing.planner.model", id="anthropic-key-shape"),
    pytest.param(JOB, {"x-api-key": "anything"}, "x-api-key", id="x-api-key-header"),
    pytest.param(JOB, {"api-key": "anything"}, "api-key", id="azure-api-key-header"),
    pytest.param(JOB, {"Authorization": f"Bearer {OPENAI_SHAPED}"}, "Authorization",
                 id="foreign-authorization"),
]


def _counts(stack) -> tuple[int, int]:
    engine = stack_db(stack)
    with engine.connect() as conn:
        counts = (conn.scalar(select(func.count()).select_from(Job)) or 0,
                  conn.scalar(select(func.count()).select_from(Batch)) or 0)
    engine.dispose()
    return counts


def _submit(stack, path: str, body: dict, headers: dict[str, str]) -> httpx.Response:
    base = {"Authorization": f"Bearer {SERVICE_KEY}", "X-Molar-Org-Id": "org_raw"}
    return httpx.post(stack.api_url + path, json=body, headers={**base, **headers})


@pytest.mark.parametrize(("body", "headers", "param"), RAW_IN_JOBS)
def test_a_job_carrying_a_raw_credential_is_400_naming_where_and_writes_nothing(
        stack, body, headers, param):
    before = _counts(stack)
    response = _submit(stack, "/v1/jobs", body, headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "raw_credentials_rejected"
    assert error["param"] == param
    assert param in error["message"]
    for secret in (OPENAI_SHAPED, ANTHROPIC_SHAPED, "anything-12345678"):
        assert secret not in response.text
    assert _counts(stack) == before


@pytest.mark.parametrize(("body", "headers", "param"), RAW_IN_JOBS)
def test_a_batch_carrying_a_raw_credential_is_400_naming_where_and_writes_nothing(
        stack, body, headers, param):
    body = dict(body)
    item = {"custom_id": "one", "capability": body.pop("capability"),
            "request": body.pop("request")}
    if param.startswith("request."):
        param = "items[0]." + param
    batch = {"items": [item], **body}
    before = _counts(stack)
    response = _submit(stack, "/v1/batches", batch, headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "raw_credentials_rejected"
    assert response.json()["error"]["param"] == param
    assert _counts(stack) == before


def test_prompts_that_mention_keys_and_schemas_with_an_api_key_property_are_accepted(stack):
    tool = {"type": "function", "function": {"name": "login", "parameters": {
        "type": "object", "properties": {"api_key": {"type": "string"}}}}}
    request = {**chat(f"why does {OPENAI_SHAPED} fail?"), "tools": [tool]}
    response = _submit(stack, "/v1/jobs", {"capability": "planner", "request": request}, {})
    assert response.status_code == 202, response.text


def test_org_settings_refuse_a_raw_key_in_model_routing(stack):
    with api(stack, org="org_raw") as client:
        response = client.put("/v1/orgs/org_raw/settings", json={"model_routing": {
            "planner": {**ROUTE, "provider_integration_id": ANTHROPIC_SHAPED}}})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "raw_credentials_rejected"
    assert ANTHROPIC_SHAPED not in response.text

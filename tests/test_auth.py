"""Every auth path against a real API process: service key, BFF JWT, admin, org isolation,
and the production start-up refusal of development or weak secrets."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import jwt
import pytest
from cryptography.fernet import Fernet

from broker.settings import DEV_JWT_SECRET
from tests.conftest import SERVICE_KEY, api, chat

JWT_SECRET = "test-bff-jwt-secret-0123456789abcdef-xyz"


def bff_token(org: str = "org_a", *, secret: str = JWT_SECRET, exp_s: float = 300,
              aud: str | None = "cartographer-bff", **claims: object) -> str:
    payload: dict[str, object] = {"org_id": org, "exp": int(time.time() + exp_s), **claims}
    if aud is not None:
        payload["aud"] = aud
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def stack(make_stack):
    return make_stack("embedded", env={"BFF_JWT_SECRET": JWT_SECRET})


@pytest.fixture(scope="module")
def job_of_org_a(stack):
    with api(stack, org="org_a") as client:
        response = client.post("/v1/jobs", json={"capability": "planner",
                                                 "request": chat("auth")})
    assert response.status_code == 202, response.text
    return response.json()["id"]


UNAUTHENTICATED = [
    pytest.param({}, "missing_credentials", id="missing"),
    pytest.param({"Authorization": "Bearer not-the-service-key"}, "invalid_api_key",
                 id="wrong-service-key"),
    pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key", id="not-bearer"),
    pytest.param(bearer(bff_token(exp_s=-60)), "token_expired", id="expired-jwt"),
    pytest.param(bearer(bff_token(aud="someone-else")), "invalid_token", id="wrong-audience"),
    pytest.param(bearer(bff_token(aud=None)), "invalid_token", id="no-audience"),
    pytest.param(bearer(bff_token(secret="another-secret-of-32-characters-x")), "invalid_token",
                 id="wrong-signature"),
    pytest.param(bearer(jwt.encode({"org_id": "org_a", "aud": "cartographer-bff"}, JWT_SECRET,
                                   algorithm="HS256")), "invalid_token", id="no-exp"),
    pytest.param(bearer(jwt.encode({"aud": "cartographer-bff", "exp": int(time.time()) + 300},
                                   JWT_SECRET, algorithm="HS256")), "invalid_token",
                 id="no-org-claim"),
    pytest.param(bearer(bff_token(secret=DEV_JWT_SECRET)), "invalid_token",
                 id="signed-with-the-dev-secret"),
]


@pytest.mark.parametrize(("headers", "code"), UNAUTHENTICATED)
@pytest.mark.parametrize("path", ["/v1/jobs/job_x", "/v1/routing", "/v1/orgs/org_a/integrations"])
def test_missing_wrong_and_expired_credentials_are_401(stack, headers, code, path):
    response = httpx.get(stack.api_url + path, headers={**headers, "X-Molar-Org-Id": "org_a"})
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == code


def test_healthz_needs_no_credentials(stack):
    assert httpx.get(stack.api_url + "/healthz").status_code == 200


def test_a_bff_jwt_submits_and_reads_its_own_orgs_jobs(stack):
    with httpx.Client(base_url=stack.api_url, headers=bearer(bff_token("org_bff"))) as client:
        submitted = client.post("/v1/jobs", json={"capability": "planner", "request": chat("x")})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        read = client.get(f"/v1/jobs/{job_id}")
        routing = client.get("/v1/routing")
    assert read.status_code == 200
    assert read.json()["id"] == job_id
    assert routing.json()["org_id"] == "org_bff"
    with api(stack, org="org_bff") as service:
        assert service.get(f"/v1/jobs/{job_id}").status_code == 200


def test_another_orgs_job_is_404_for_a_jwt_even_when_the_header_names_that_org(
        stack, job_of_org_a):
    headers = {**bearer(bff_token("org_b")), "X-Molar-Org-Id": "org_a"}
    response = httpx.get(f"{stack.api_url}/v1/jobs/{job_of_org_a}", headers=headers)
    own = httpx.get(f"{stack.api_url}/v1/jobs/{job_of_org_a}",
                    headers=bearer(bff_token("org_a")))
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"
    assert own.status_code == 200


def test_another_orgs_job_and_batch_are_404_for_the_service_key(stack, job_of_org_a):
    with api(stack, org="org_a") as client:
        batch = client.post("/v1/batches", json={"items": [
            {"custom_id": "a", "capability": "planner", "request": chat("x")}]}).json()
    with api(stack, org="org_b") as other:
        assert other.get(f"/v1/jobs/{job_of_org_a}").status_code == 404
        assert other.get(f"/v1/batches/{batch['id']}").status_code == 404
        assert other.get(f"/v1/batches/{batch['id']}/results").status_code == 404


ADMIN_CALLS = [
    pytest.param("GET", "/v1/orgs/org_a/settings", None, id="get-settings"),
    pytest.param("PUT", "/v1/orgs/org_a/settings", {"spend_cap_usd": "1"}, id="put-settings"),
    pytest.param("GET", "/v1/orgs/org_a/integrations", None, id="list-integrations"),
    pytest.param("POST", "/v1/orgs/org_a/integrations",
                 {"id": "byok-x", "provider": "openai", "api_key": "abcdefgh12345678"},
                 id="create-integration"),
    pytest.param("DELETE", "/v1/orgs/org_a/integrations/byok-x", None, id="delete-integration"),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
def test_admin_endpoints_are_403_with_a_jwt_of_the_same_org(stack, method, path, body):
    response = httpx.request(method, stack.api_url + path, json=body,
                             headers=bearer(bff_token("org_a")))
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "permission_denied"
    with api(stack, org="org_a") as client:
        assert client.get("/v1/orgs/org_a/integrations").json()["data"] == []


# --- production start-up refusal ----------------------------------------------------------

STRONG = {
    "MOLAR_LLM_SERVICE_KEY": "prod-service-key-" + "s" * 32,
    "BFF_JWT_SECRET": "prod-jwt-secret-" + "j" * 32,
    "MOLAR_LLM_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
}
REFUSALS = [
    pytest.param({"MOLAR_LLM_SERVICE_KEY": ""}, ["MOLAR_LLM_SERVICE_KEY"], id="service-key-dev"),
    pytest.param({"MOLAR_LLM_SERVICE_KEY": "short-key"}, ["MOLAR_LLM_SERVICE_KEY"],
                 id="service-key-short"),
    pytest.param({"BFF_JWT_SECRET": ""}, ["BFF_JWT_SECRET"], id="jwt-secret-dev"),
    pytest.param({"BFF_JWT_SECRET": "too-short-secret"}, ["BFF_JWT_SECRET"],
                 id="jwt-secret-short"),
    pytest.param({"MOLAR_LLM_ENCRYPTION_KEYS": ""}, ["MOLAR_LLM_ENCRYPTION_KEYS"],
                 id="encryption-keys-dev"),
    pytest.param({"MOLAR_LLM_ENCRYPTION_KEYS": "not-a-fernet-key"},
                 ["MOLAR_LLM_ENCRYPTION_KEYS"], id="encryption-key-malformed"),
    pytest.param({"MOLAR_LLM_SERVICE_KEY": "", "BFF_JWT_SECRET": "",
                  "MOLAR_LLM_ENCRYPTION_KEYS": ""},
                 ["MOLAR_LLM_SERVICE_KEY", "BFF_JWT_SECRET", "MOLAR_LLM_ENCRYPTION_KEYS"],
                 id="all-three-named"),
]


def _production_env(tmp_path, overrides: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **STRONG, "MOLAR_LLM_ENV": "production",
           "MOLAR_LLM_VAR_DIR": str(tmp_path / "var"), "MOLAR_LLM_DATABASE_URL": "",
           "MOLAR_LLM_BROKER_URL": ""}
    for name, value in overrides.items():
        if value:
            env[name] = value
        else:
            env.pop(name, None)  # unset: the development default applies
    return env


SERVE = ["serve", "--port", "1"]
WORKER = ["worker", "--concurrency", "1"]
STARTS = [pytest.param(SERVE, *case.values, id=f"serve-{case.id}") for case in REFUSALS] + [
    pytest.param(WORKER, *case.values, id=f"worker-{case.id}") for case in REFUSALS
    if case.id in ("all-three-named", "encryption-key-malformed")
]


@pytest.mark.parametrize(("command", "overrides", "named"), STARTS)
def test_production_refuses_to_start_on_dev_or_weak_secrets_and_says_which(
        tmp_path, command, overrides, named):
    env = _production_env(tmp_path, overrides)
    done = subprocess.run([sys.executable, "-m", "broker.cli", *command], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "refusing to start" in done.stderr
    for variable in named:
        assert variable in done.stderr
    for variable in {"MOLAR_LLM_SERVICE_KEY", "BFF_JWT_SECRET",
                     "MOLAR_LLM_ENCRYPTION_KEYS"} - set(named):
        assert variable not in done.stderr
    for secret in STRONG.values():
        assert secret not in done.stderr + done.stdout


def test_production_starts_with_strong_secrets(make_stack):
    stack = make_stack("embedded", env={**STRONG, "MOLAR_LLM_ENV": "production"})
    response = httpx.get(stack.api_url + "/v1/routing", headers={
        "Authorization": f"Bearer {STRONG['MOLAR_LLM_SERVICE_KEY']}", "X-Molar-Org-Id": "o"})
    assert response.status_code == 200, response.text
    assert httpx.get(stack.api_url + "/v1/routing", headers={
        "Authorization": f"Bearer {SERVICE_KEY}", "X-Molar-Org-Id": "o"}).status_code == 401

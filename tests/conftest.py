"""Shared fixtures: real PostgreSQL, real Redis, and real broker processes.

Locally a test that needs a missing service is skipped; in CI (``CI=true``) it fails, so
a green CI run always means the services were really exercised.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from broker.devstack import LocalStack

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_DSN = os.environ.get("MOLAR_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST = os.environ.get("MOLAR_TEST_REDIS_HOST", "127.0.0.1")
SERVICE_KEY = "test-service-key-0123456789abcdef"
_redis_dbs = itertools.cycle(range(1, 16))


def redis_key(stack: LocalStack, key: str) -> str:
    """The Redis key a stack uses for ``key`` (stacks prefix their keys)."""
    return stack.env.get("MOLAR_LLM_REDIS_KEY_PREFIX", "") + key


def need_service(name: str, error: Exception) -> None:
    message = f"{name} is not reachable ({type(error).__name__}: {error})"
    if IN_CI:
        pytest.fail(f"{message}; CI must run against the real service")
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        need_service("PostgreSQL", exc)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def redis_admin() -> redis.Redis:
    client = redis.Redis(host=REDIS_HOST, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        need_service("Redis", exc)
    return client


@pytest.fixture(scope="module")
def fresh_pg_url(pg_admin: psycopg.Connection[Any]) -> Iterator[Callable[[], str]]:
    """Make a new, empty PostgreSQL database per call; all are dropped afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"molar_test_{secrets.token_hex(6)}"
        pg_admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        base = PG_ADMIN_DSN.rsplit("/", 1)[0]
        return f"{base}/{name}"

    yield make
    for name in made:
        pg_admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def fresh_redis_url(redis_admin: redis.Redis) -> Callable[[], str]:
    """A Redis database number of its own, flushed, per call."""

    def make() -> str:
        db = next(_redis_dbs)
        return f"redis://{REDIS_HOST}:6379/{db}"

    return make


def stack_env(backend: str, tmp: Path, fresh_pg_url: Callable[[], str] | None,
              fresh_redis_url: Callable[[], str] | None) -> dict[str, str]:
    env = {
        "MOLAR_LLM_VAR_DIR": str(tmp / "var"),
        "MOLAR_LLM_SERVICE_KEY": SERVICE_KEY,
        "MOLAR_LLM_LOG_LEVEL": "INFO",
    }
    if backend == "redis-pg":
        assert fresh_pg_url is not None and fresh_redis_url is not None
        env["MOLAR_LLM_DATABASE_URL"] = fresh_pg_url()
        env["MOLAR_LLM_BROKER_URL"] = fresh_redis_url()
        # A prefix of its own keeps concurrent test runs on one Redis apart.
        env["MOLAR_LLM_REDIS_KEY_PREFIX"] = f"t{secrets.token_hex(4)}:"
    else:
        env["MOLAR_LLM_DATABASE_URL"] = ""
        env["MOLAR_LLM_BROKER_URL"] = ""
    return env


@pytest.fixture(scope="module")
def make_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LocalStack]]:
    """Start a full stack (fake upstream, migrated database, API); workers are up to the test.

    ``make_stack("redis-pg")`` or ``make_stack("embedded")``; extra env via ``env=``.
    """
    with ExitStack() as stacks:

        def make(backend: str, *, env: dict[str, str] | None = None,
                 upstream_latency_ms: float = 0.0) -> LocalStack:
            tmp = tmp_path_factory.mktemp(f"stack-{backend}")
            pg = request.getfixturevalue("fresh_pg_url") if backend == "redis-pg" else None
            rd = request.getfixturevalue("fresh_redis_url") if backend == "redis-pg" else None
            stack = stacks.enter_context(LocalStack(
                tmp / "logs", env={**stack_env(backend, tmp, pg, rd), **(env or {})},
                upstream_latency_ms=upstream_latency_ms,
            ))
            if backend == "redis-pg":
                migrate = stack.molar("migrate", "migrate")
                assert migrate.wait(timeout=60) == 0, (tmp / "logs" / "migrate.log").read_text()
            stack.start_upstream()
            stack.start_api()
            return stack

        yield make


def api(stack: LocalStack, org: str = "org_a") -> httpx.Client:
    """An HTTP client for the stack's API, acting for ``org`` with the service key."""
    return httpx.Client(
        base_url=stack.api_url, timeout=30,
        headers={"Authorization": f"Bearer {SERVICE_KEY}", "X-Molar-Org-Id": org},
    )


def upstream_calls(stack: LocalStack, **params: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = httpx.get(
        f"{stack.upstream_url}/_control/calls", params=params
    ).json()["calls"]
    return calls


def stack_db(stack: LocalStack) -> Any:
    """A SQLAlchemy engine on the stack's own database, for checks behind the API."""
    from broker.db import make_engine
    from broker.settings import Settings

    url = stack.env.get("MOLAR_LLM_DATABASE_URL") or ""
    settings = Settings(database_url=url, var_dir=Path(stack.env["MOLAR_LLM_VAR_DIR"]))
    return make_engine(settings.resolved_database_url, pool_size=2, max_overflow=2)


def wait_batch(client: httpx.Client, batch_id: str, timeout_s: float = 120) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch: dict[str, Any] = client.get(f"/v1/batches/{batch_id}").json()
        counts = batch["request_counts"]
        assert sum(v for k, v in counts.items() if k != "total") == counts["total"], counts
        if batch["status"] in ("completed", "cancelled"):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} not done after {timeout_s}s: {batch}")


def wait_job(client: httpx.Client, job_id: str, timeout_s: float = 60,
             statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled")) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {statuses} after {timeout_s}s: {job}")


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}

"""The broker (Redis) goes away and comes back: the API and the workers must ride it out.

Each test runs its own ``redis-server`` on a free port so it can be stopped without touching
the Redis that other test runs share.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from broker.devstack import LocalStack, free_port
from broker.models import Batch, Job
from tests.conftest import api, chat, need_service, stack_db, wait_job


class OwnRedis:
    """A throwaway Redis server that a test may stop and start again on the same port."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            cwd=self._workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        need_service("redis-server binary", FileNotFoundError("redis-server"))
    server = OwnRedis(tmp_path_factory.mktemp("own-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(make_stack, own_redis: OwnRedis) -> LocalStack:
    # Remote control off: with it on, Celery 5.7 ends a worker whose broker drops (see
    # tasks/app.py), and this stack's worker must ride out a broker restart.
    stack: LocalStack = make_stack("redis-pg", env={"MOLAR_LLM_BROKER_URL": own_redis.url,
                                                    "MOLAR_LLM_WORKER_REMOTE_CONTROL": "false"})
    return stack


def _rows(stack: LocalStack) -> tuple[int, int]:
    engine = stack_db(stack)
    with engine.connect() as conn:
        jobs = conn.scalar(select(func.count()).select_from(Job)) or 0
        batches = conn.scalar(select(func.count()).select_from(Batch)) or 0
    engine.dispose()
    return jobs, batches


def _assert_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "service_unavailable"


def test_a_submission_while_the_broker_is_down_is_503_and_leaves_no_rows(stack, own_redis):
    own_redis.start()
    with api(stack) as client:
        # A first submission leaves a pooled broker connection in the API, as in production.
        first = client.post("/v1/jobs", json={"capability": "planner", "request": chat("a")})
        assert first.status_code == 202, first.text
        before = _rows(stack)
        own_redis.stop()

        job = client.post("/v1/jobs", json={"capability": "planner", "request": chat("b")})
        _assert_unavailable(job)
        batch = client.post("/v1/batches", json={"items": [
            {"custom_id": f"i{n}", "capability": "planner", "request": chat(f"{n}")}
            for n in range(20)
        ]})
        _assert_unavailable(batch)
        ready = client.get("/readyz")

    assert _rows(stack) == before
    assert ready.status_code == 503
    assert ready.json()["checks"]["broker"].startswith("failed")


def test_a_worker_survives_a_broker_restart_with_jobs_in_flight(stack, own_redis):
    own_redis.start()
    worker = stack.start_worker("outage-worker", capabilities=["planner"], concurrency=8)
    slow = chat('<<fake:{"latency_ms": 3000}>> slow')
    with api(stack) as client:
        in_flight = client.post("/v1/jobs", json={"capability": "planner", "request": slow})
        assert in_flight.status_code == 202, in_flight.text
        wait_job(client, in_flight.json()["id"], statuses=("running",))

        own_redis.stop()
        time.sleep(2)
        own_redis.start()

        after = client.post("/v1/jobs", json={"capability": "planner", "request": chat("after")})
        assert after.status_code == 202, after.text
        try:
            done = wait_job(client, after.json()["id"], timeout_s=45)
        finally:
            log = (stack.log_dir / "outage-worker.log").read_text()
            assert worker.poll() is None, f"the worker exited: {log[-3000:]}"
    assert done["status"] == "succeeded", done

"""Flower beside a real worker: its HTTP API finds the worker, the tasks and the queues."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest
import redis
from celery.events.receiver import EventReceiver

from broker.devstack import free_port, wait_http
from broker.settings import Settings
from tasks.app import create_celery_app
from tests.conftest import api, chat, wait_job

FLOWER_USER = "ops"
FLOWER_PASSWORD = "flower-test-password"
SERVED = ["planner", "grounding_tier0"]
QUEUES = {f"llm.{cap}" for cap in (
    "planner", "grounding_tier0", "grounding_tier1_vlm", "export_generator", "export_healer",
    "passive_ux_vlm", "embeddings", "stagehand_planner", "stagehand_vlm")}


@pytest.fixture(scope="module")
def flower(make_stack):
    stack = make_stack("redis-pg")
    stack.molar("worker-text", "worker", "--capabilities", ",".join(SERVED), "--concurrency",
                "4", "--name", "llm-planner+grounding_tier0@%h")
    port = free_port()
    proc = stack.molar("flower", "flower", "--port", str(port), extra_env={
        "MOLAR_LLM_FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"})
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/api/workers", proc=proc, timeout_s=60, expect=401)
    client = httpx.Client(base_url=url, auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=30)
    yield stack, client
    client.close()


def poll(fetch, ready, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if ready(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_flower_finds_the_worker_the_tasks_by_capability_and_every_queue_length(flower):
    stack, client = flower
    with api(stack, org="org_flower") as broker:
        submitted = ([("planner", chat(f"plan {i}")) for i in range(3)]
                     + [("grounding_tier0", chat(f"ground {i}")) for i in range(2)]
                     + [("embeddings", {"input": f"text {i}"}) for i in range(4)])
        ids = [broker.post("/v1/jobs", json={"capability": cap, "request": body}).json()["id"]
               for cap, body in submitted]
        for job_id in ids[:5]:
            assert wait_job(broker, job_id)["status"] == "succeeded"

    workers = poll(lambda: client.get("/api/workers", params={"refresh": "1"}).json(),
                   lambda found: any(name.startswith("llm-planner") for name in found))
    name = next(name for name in workers if name.startswith("llm-planner+grounding_tier0@"))
    assert {q["name"] for q in workers[name]["active_queues"]} == {"llm.planner",
                                                                  "llm.grounding_tier0"}

    tasks = poll(lambda: client.get("/api/tasks").json(),
                 lambda found: sum(t["state"] == "SUCCESS" for t in found.values()) >= 5)
    done = [t for t in tasks.values() if t["state"] == "SUCCESS"]
    assert Counter(t["name"] for t in done) == {"llm.run.planner": 3,
                                                "llm.run.grounding_tier0": 2}
    assert {t["worker"] for t in done} == {name}
    # The message carries the job id and nothing else: no prompt text reaches Flower.
    for task in done:
        job_ids = re.findall(r"job_[0-9a-f]{32}", task["args"])
        assert len(job_ids) == 1 and job_ids[0] in ids
        assert re.fullmatch(r"[\[\](),' ]*", task["args"].replace(job_ids[0], "")), task["args"]

    lengths = {q["name"]: q["messages"]
               for q in client.get("/api/queues/length").json()["active_queues"]}
    assert set(lengths) >= QUEUES
    assert lengths["llm.embeddings"] == 4  # no worker serves it: it waits
    assert lengths["llm.planner"] == 0
    broker_tab = client.get("/broker")
    assert broker_tab.status_code == 200
    assert "llm.embeddings" in broker_tab.text and "llm.stagehand_vlm" in broker_tab.text


class CountingReceiver(EventReceiver):
    """Celery's event receiver, counting the messages the events came in."""

    messages = 0

    def _receive(self, body, message, *args, **kwargs):
        self.messages += 1
        return super()._receive(body, message, *args, **kwargs)


def test_task_events_all_arrive_in_fewer_messages_than_events(flower):
    stack, _ = flower
    settings = Settings(broker_url=stack.env["MOLAR_LLM_BROKER_URL"],
                        redis_key_prefix=stack.env.get("MOLAR_LLM_REDIS_KEY_PREFIX", ""))
    app = create_celery_app(settings)
    events: list[dict] = []
    plain = redis.Redis.from_url(stack.env["MOLAR_LLM_BROKER_URL"])

    def subscriptions() -> int:
        return sum(int(c.get("sub", 0)) + int(c.get("psub", 0)) for c in plain.client_list())

    before = subscriptions()
    with app.connection_for_read() as conn:
        receiver = CountingReceiver(conn, app=app, handlers={"*": events.append})
        listening = threading.Thread(target=receiver.capture,
                                     kwargs={"wakeup": False}, daemon=True)
        listening.start()
        # Kombu subscribes on its first read: wait for the subscription before submitting.
        assert poll(subscriptions, lambda n: n > before, timeout_s=15) > before
        with api(stack, org="org_events") as broker:
            ids = [broker.post("/v1/jobs", json={"capability": "planner",
                                                 "request": chat(f"event {i}")}).json()["id"]
                   for i in range(12)]
            for job_id in ids:
                assert wait_job(broker, job_id)["status"] == "succeeded"

        def task_ids() -> tuple[set[str], set[str]]:
            received = {e["uuid"] for e in list(events) if e["type"] == "task-received"
                        and any(job_id in e.get("args", "") for job_id in ids)}
            return received, {e["uuid"] for e in list(events) if e["type"] == "task-succeeded"}

        received, _ = poll(task_ids, lambda found: len(found[0]) == len(ids)
                           and found[0] <= found[1], timeout_s=30)
        receiver.should_stop = True
        listening.join(timeout=15)
    plain.close()
    task_events = [e for e in events if e["type"] in ("task-received", "task-started",
                                                      "task-succeeded")
                   and e["uuid"] in received]
    assert len(received) == len(ids)
    assert Counter(e["type"] for e in task_events) == {
        "task-received": 12, "task-started": 12, "task-succeeded": 12}
    # Batched (tasks/consumer.py): here 36 events came in 4-5 messages, all event kinds
    # counted; Celery's own flush on every turn of the event loop sent 23-24.
    assert receiver.messages <= len(task_events) // 3, receiver.messages


def test_flower_refuses_wrong_or_missing_credentials_and_control_operations(flower):
    _, client = flower
    base = str(client.base_url)
    assert httpx.get(f"{base}/api/workers").status_code == 401
    assert httpx.get(f"{base}/api/tasks", auth=(FLOWER_USER, "wrong-password")).status_code == 401
    assert httpx.get(f"{base}/", auth=(FLOWER_USER, "wrong-password")).status_code == 401
    applied = client.post("/api/task/async-apply/llm.run.planner", json={"args": ["job_x"]})
    assert applied.status_code == 403  # read-only unless --allow-control


def test_molar_llm_flower_will_not_start_without_credentials(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MOLAR_LLM_VAR_DIR": str(tmp_path),
           "MOLAR_LLM_FLOWER_BASIC_AUTH": ""}
    result = subprocess.run([sys.executable, "-m", "broker.cli", "flower", "--port",
                             str(free_port())], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "MOLAR_LLM_FLOWER_BASIC_AUTH" in result.stderr
    public = subprocess.run([sys.executable, "-m", "broker.cli", "flower", "--no-auth",
                             "--address", "0.0.0.0"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert public.returncode == 2
    assert "local use only" in public.stderr

"""Flower beside a real worker: its HTTP API finds the worker, the tasks and the queues."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from broker.devstack import free_port, wait_http
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

"""The metrics view, the Prometheus scrape and the JSON logs, against a scripted workload.

The fake upstream is told each call's latency and outcome, so the counts are known exactly
and the latencies have known lower bounds; percentiles are recomputed here from the attempt
and job rows, independently of the broker's own code.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, select

from broker.db import utcnow
from broker.devstack import free_port, wait_http
from broker.models import Attempt, Job
from tests.conftest import SERVICE_KEY, api, chat, redis_key, stack_db, wait_job

BACKENDS = ["embedded", "redis-pg"]
ORG = "org_metrics"
OTHER_ORG = "org_metrics_other"
SERVED = ["planner", "embeddings", "stagehand_planner"]
# Tests that start extra API processes run on one backend only, to keep the suite quick.
ONE_BACKEND = pytest.mark.parametrize("workload", ["redis-pg"], indirect=True)


def directive(**fields: object) -> str:
    return "<<fake:" + orjson.dumps(fields).decode() + ">>"


def planner_job(latency_ms: int, *, fail: bool = False, model: str = "gpt-4.1-mini") -> dict:
    step = {"latency_ms": latency_ms, **({"fail": [{"status": 400}]} if fail else {})}
    return {"capability": "planner", "request": chat(f"plan {directive(**step)}"),
            "model_routing": {"planner": {"provider_integration_id": "molar-managed",
                                          "model": model}}}


# What the workload is, and what it must add up to.
WORKLOAD = (
    [(ORG, planner_job(300)) for _ in range(4)]
    + [(ORG, planner_job(100, fail=True)) for _ in range(2)]
    + [(ORG, planner_job(150, model="gpt-4.1")) for _ in range(3)]
    + [(ORG, {"capability": "embeddings",
              "request": {"input": f"page text {directive(latency_ms=50)}"}})
       for _ in range(2)]
    + [(OTHER_ORG, planner_job(300))]
)
UNSERVED_JOBS = 3  # grounding_tier0 jobs nobody consumes: they wait on the queue


@pytest.fixture(scope="module", params=BACKENDS)
def workload(request, make_stack):
    """A stack that ran the workload; returns (stack, job ids, worker metrics port)."""
    stack = make_stack(request.param, env={"MOLAR_LLM_LOG_FORMAT": "json"})
    metrics_port = free_port()
    stack.molar("worker-metrics", "worker", "--capabilities", ",".join(SERVED),
                "--concurrency", "8", "--metrics-port", str(metrics_port),
                "--name", "worker-metrics@%h")
    job_ids = []
    for org, body in WORKLOAD:
        with api(stack, org=org) as client:
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            job_ids.append(response.json()["id"])
    with api(stack, org=ORG) as client:
        for i in range(UNSERVED_JOBS):
            client.post("/v1/jobs", json={"capability": "grounding_tier0",
                                          "request": chat(f"ground {i}")})
    for (org, _), job_id in zip(WORKLOAD, job_ids, strict=True):
        with api(stack, org=org) as client:
            wait_job(client, job_id, timeout_s=120)
    return stack, job_ids, metrics_port


def get_metrics(stack, window: str = "5m", org: str = ORG, **params: str) -> dict:
    with api(stack, org=org) as client:
        response = client.get("/api/v1/llm/metrics", params={"window": window, **params})
    assert response.status_code == 200, response.text
    return response.json()


def by_capability(body: dict) -> dict[str, dict]:
    return {entry["capability"]: entry for entry in body["capabilities"]}


def by_model(entry: dict) -> dict[str, dict]:
    return {model["model"]: model for model in entry["models"]}


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return {"p50": values[0], "p95": values[0], "p99": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98]}


def rows_of(stack, job_ids: list[str]) -> list:
    engine = stack_db(stack)
    with engine.connect() as conn:
        rows = conn.execute(
            select(Job.id, Job.route, Job.created_at, Job.started_at, Job.finished_at,
                   Attempt.latency_ms)
            .join(Attempt, Attempt.job_id == Job.id).where(Job.id.in_(job_ids))
        ).all()
    engine.dispose()
    return rows


def test_counts_and_error_rates_match_the_scripted_workload(workload):
    stack, _, _ = workload
    caps = by_capability(get_metrics(stack))

    planner = caps["planner"]
    assert (planner["requests"], planner["errors"], planner["succeeded"]) == (10, 2, 8)
    assert planner["error_rate"] == pytest.approx(0.2)
    assert (planner["attempts"], planner["attempt_errors"]) == (10, 2)
    models = by_model(planner)
    assert set(models) == {"gpt-4.1-mini", "gpt-4.1"}
    assert (models["gpt-4.1-mini"]["requests"], models["gpt-4.1-mini"]["errors"]) == (7, 2)
    assert models["gpt-4.1-mini"]["error_rate"] == pytest.approx(2 / 7, abs=1e-6)
    assert (models["gpt-4.1"]["requests"], models["gpt-4.1"]["errors"]) == (3, 0)
    assert caps["embeddings"]["requests"] == 2
    assert by_model(caps["embeddings"])["text-embedding-3-small"]["errors"] == 0
    assert caps["export_healer"]["requests"] == 0
    assert caps["export_healer"]["latency_ms"]["provider"]["p50"] is None
    assert set(caps) == {"planner", "grounding_tier0", "grounding_tier1_vlm",
                         "export_generator", "export_healer", "passive_ux_vlm", "embeddings",
                         "stagehand_planner", "stagehand_vlm"}


def test_latency_percentiles_match_the_rows_and_the_scripted_latencies(workload):
    stack, job_ids, _ = workload
    planner = by_model(by_capability(get_metrics(stack))["planner"])
    rows = [row for row in rows_of(stack, job_ids) if row.route["capability"] == "planner"]

    for model, floor_ms in (("gpt-4.1-mini", 100), ("gpt-4.1", 150)):
        mine = [row for row in rows if row.route["model"] == model]
        provider = [float(row.latency_ms) for row in mine]
        end_to_end = [(row.finished_at - row.created_at).total_seconds() * 1000 for row in mine]
        queue_wait = [(row.started_at - row.created_at).total_seconds() * 1000 for row in mine]
        shown = planner[model]["latency_ms"]
        for kind, values in (("provider", provider), ("end_to_end", end_to_end),
                             ("queue_wait", queue_wait)):
            assert shown[kind]["count"] == len(values)
            for key, expected in percentiles(values).items():
                assert shown[kind][key] == pytest.approx(expected, abs=0.01), (model, kind, key)
        assert shown["provider"]["p50"] >= floor_ms
        assert shown["end_to_end"]["p50"] >= shown["provider"]["p50"]
    # Five of the seven gpt-4.1-mini calls were scripted at 300 ms.
    assert planner["gpt-4.1-mini"]["latency_ms"]["provider"]["p50"] >= 300


def test_an_org_filter_counts_only_that_orgs_jobs(workload):
    stack, _, _ = workload
    other = by_capability(get_metrics(stack, org_id=OTHER_ORG))
    assert other["planner"]["requests"] == 1
    assert other["embeddings"]["requests"] == 0
    assert other["grounding_tier0"]["waiting"] == 0
    assert get_metrics(stack, org_id=OTHER_ORG)["org_id"] == OTHER_ORG


def test_jobs_that_finished_before_the_window_count_only_in_longer_windows(workload):
    stack, _, _ = workload
    finished = utcnow() - timedelta(hours=2)
    engine = stack_db(stack)
    with engine.begin() as conn:
        conn.execute(insert(Job).values(
            id=f"job_old_{stack.api_url[-5:]}", org_id=ORG, capability="export_healer",
            status="succeeded", request=chat("old"), attempts=1,
            route={"capability": "export_healer", "provider_integration_id": "molar-managed",
                   "model": "gpt-4.1", "provider": "openai", "source": "default"},
            created_at=finished - timedelta(seconds=2), started_at=finished - timedelta(seconds=1),
            finished_at=finished,
        ))
    engine.dispose()
    assert by_capability(get_metrics(stack, "5m"))["export_healer"]["requests"] == 0
    assert by_capability(get_metrics(stack, "1h"))["export_healer"]["requests"] == 0
    day = by_capability(get_metrics(stack, "24h"))["export_healer"]
    assert day["requests"] == 1
    assert day["latency_ms"]["end_to_end"]["p50"] == pytest.approx(2000, abs=0.01)
    assert day["latency_ms"]["queue_wait"]["p50"] == pytest.approx(1000, abs=0.01)


def test_queue_depth_and_waiting_jobs_show_the_unserved_capability(workload):
    stack, _, _ = workload
    ground = by_capability(get_metrics(stack))["grounding_tier0"]
    assert ground["queue_depth"] == UNSERVED_JOBS
    assert ground["waiting"] == UNSERVED_JOBS
    assert ground["queue"] == "llm.grounding_tier0"
    if stack.env.get("MOLAR_LLM_BROKER_URL"):
        broker = redis.Redis.from_url(stack.env["MOLAR_LLM_BROKER_URL"])
        assert broker.llen(redis_key(stack, "llm.grounding_tier0")) == UNSERVED_JOBS


def test_a_running_job_shows_in_flight(workload):
    stack, _, _ = workload
    body = {"capability": "stagehand_planner",
            "request": chat(f"slow step {directive(latency_ms=4000)}")}
    with api(stack, org=ORG) as client:
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        wait_job(client, job_id, statuses=("running",))
        live = by_capability(get_metrics(stack))["stagehand_planner"]
        assert live["in_flight"] == 1
        assert by_model(live)["gpt-4.1-mini"]["in_flight"] == 1
        assert wait_job(client, job_id)["status"] == "succeeded"
    assert by_capability(get_metrics(stack))["stagehand_planner"]["in_flight"] == 0


@ONE_BACKEND
def test_a_second_api_replica_gives_the_same_figures(workload):
    stack, _, _ = workload
    port = free_port()
    proc = stack.molar("api-replica", "serve", "--port", str(port))
    wait_http(f"http://127.0.0.1:{port}/readyz", proc=proc, timeout_s=60)
    first = get_metrics(stack, "24h")
    replica = httpx.get(f"http://127.0.0.1:{port}/api/v1/llm/metrics", params={"window": "24h"},
                        headers={"Authorization": f"Bearer {SERVICE_KEY}",
                                 "X-Molar-Org-Id": ORG}, timeout=30).json()
    stack.kill("api-replica")
    assert replica["capabilities"] == first["capabilities"]


def test_the_metrics_view_needs_credentials_and_a_known_window(workload):
    stack, _, _ = workload
    assert httpx.get(f"{stack.api_url}/api/v1/llm/metrics").status_code == 401
    with api(stack) as client:
        bad = client.get("/api/v1/llm/metrics", params={"window": "7d"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "window"


# -- Prometheus -------------------------------------------------------------------------------


def scrape(url: str, **headers: str) -> dict[str, list]:
    response = httpx.get(url, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    families = text_string_to_metric_families(response.text)
    return {family.name: family.samples for family in families}


def value(samples: list, name: str, **labels: str) -> float:
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, f"no sample {name} {labels}"
    return sum(found)


def test_worker_series_carry_the_workload(workload):
    _, _, port = workload
    families = scrape(f"http://127.0.0.1:{port}/metrics")
    mini = {"capability": "planner", "model": "gpt-4.1-mini", "billing_kind": "hosted"}

    requests = families["molar_llm_requests"]
    assert value(requests, "molar_llm_requests_total", **mini, outcome="succeeded") == 5
    assert value(requests, "molar_llm_requests_total", **mini, outcome="failed") == 2
    assert value(requests, "molar_llm_requests_total", capability="planner", model="gpt-4.1",
                 outcome="succeeded") == 3
    assert value(families["molar_llm_errors"], "molar_llm_errors_total", **mini,
                 code="provider_error") == 2
    latency = families["molar_llm_provider_latency_seconds"]
    assert value(latency, "molar_llm_provider_latency_seconds_count", **mini,
                 outcome="succeeded") == 5
    assert value(latency, "molar_llm_provider_latency_seconds_sum", **mini,
                 outcome="succeeded") >= 5 * 0.3
    assert value(latency, "molar_llm_provider_latency_seconds_bucket", **mini,
                 outcome="succeeded", le="0.25") == 0
    assert value(families["molar_llm_job_duration_seconds"],
                 "molar_llm_job_duration_seconds_count", **mini, outcome="failed") == 2
    assert value(families["molar_llm_queue_wait_seconds"],
                 "molar_llm_queue_wait_seconds_count", capability="planner") == 10
    tokens = families["molar_llm_tokens"]
    assert value(tokens, "molar_llm_tokens_total", **mini, kind="input") > 0
    assert value(tokens, "molar_llm_tokens_total", **mini, kind="output") > 0
    assert value(families["molar_llm_cost_usd"], "molar_llm_cost_usd_total", **mini) > 0
    assert value(families["molar_llm_jobs_finished"], "molar_llm_jobs_finished_total",
                 capability="embeddings", outcome="succeeded") == 2
    # Declared from the start, so dashboards and alerts find them before the first event.
    for name in ("molar_llm_retries", "molar_llm_spend_cap_refusals", "molar_llm_jobs_in_flight"):
        assert name in families


def test_api_series_carry_queue_depth_and_requests_and_nothing_private(workload):
    stack, _, _ = workload
    response = httpx.get(f"{stack.api_url}/metrics",
                         headers={"Authorization": f"Bearer {SERVICE_KEY}"}, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f.samples for f in text_string_to_metric_families(response.text)}
    assert value(families["molar_llm_queue_depth"], "molar_llm_queue_depth",
                 capability="grounding_tier0") == UNSERVED_JOBS
    assert value(families["molar_llm_queue_depth"], "molar_llm_queue_depth",
                 capability="planner") == 0
    assert value(families["molar_llm_http_requests"], "molar_llm_http_requests_total",
                 method="POST", route="/v1/jobs", status="202") >= len(WORKLOAD)
    assert "molar_llm_spend_cap_refusals" in families
    for private in (ORG, OTHER_ORG, SERVICE_KEY, stack.upstream_key, "job_0", "job_1", "job_a"):
        assert private not in response.text
    assert httpx.get(f"{stack.api_url}/metrics").status_code == 401


# -- logs ------------------------------------------------------------------------------------


def json_lines(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path} is empty"
    return [orjson.loads(line) for line in lines]  # every line must be JSON


def test_json_logs_carry_one_line_per_state_change_with_the_job_fields(workload):
    stack, job_ids, _ = workload
    worker = json_lines(stack.log_dir / "worker-metrics.log")
    api_lines = json_lines(stack.log_dir / "api.log")
    failed_job = job_ids[4]  # the first scripted failure

    mine = [line for line in api_lines + worker if line.get("job_id") == failed_job]
    assert [line["job_status"] for line in mine] == ["queued", "running", "failed"]
    for line in mine:
        assert line["org_id"] == ORG
        assert line["capability"] == "planner"
        assert line["route"] == "molar-managed/gpt-4.1-mini"
        assert isinstance(line["attempt"], int)
    _, running, failed = mine
    assert mine[0]["attempt"] == 0
    assert running["attempt"] == failed["attempt"] == 1
    assert failed["duration_ms"] >= 100
    assert failed["level"] == "warning"
    assert failed["code"] == "provider_error"
    succeeded = [line for line in worker
                 if line.get("job_id") == job_ids[0] and line.get("job_status") == "succeeded"]
    assert len(succeeded) == 1
    assert succeeded[0]["duration_ms"] >= 300
    text = "\n".join(orjson.dumps(line).decode() for line in worker + api_lines)
    for secret in (SERVICE_KEY, stack.upstream_key):
        assert secret not in text


# -- readiness ---------------------------------------------------------------------------------


@ONE_BACKEND
def test_readyz_names_the_broker_when_it_is_down_and_the_view_degrades(workload):
    stack, _, _ = workload
    port = free_port()
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    proc = stack.molar("api-nobroker", "serve", "--port", str(port),
                       extra_env={"MOLAR_LLM_BROKER_URL": dead_broker})
    url = f"http://127.0.0.1:{port}"
    # Up, then asked once: each probe waits out the broker's connect timeout.
    wait_http(f"{url}/healthz", proc=proc, timeout_s=60)
    assert httpx.get(f"{url}/readyz", timeout=30).json() == {"status": "not_ready"}
    ready_response = httpx.get(f"{url}/readyz", timeout=30,
                               headers={"Authorization": f"Bearer {SERVICE_KEY}"})
    assert ready_response.status_code == 503
    ready = ready_response.json()
    view = httpx.get(f"{url}/api/v1/llm/metrics", timeout=60,
                     headers={"Authorization": f"Bearer {SERVICE_KEY}",
                              "X-Molar-Org-Id": ORG}).json()
    stack.kill("api-nobroker")
    assert ready["status"] == "not_ready"
    assert ready["checks"]["database"] == "ok"
    assert ready["checks"]["broker"].startswith("failed")
    assert view["broker"] == "unavailable"
    assert by_capability(view)["planner"]["queue_depth"] is None
    assert by_capability(view)["planner"]["requests"] == 10


@ONE_BACKEND
def test_readyz_names_the_database_when_it_is_down(workload):
    stack, _, _ = workload
    port = free_port()
    dead_db = f"postgresql://postgres@127.0.0.1:{free_port()}/molar"
    proc = stack.molar("api-nodb", "serve", "--port", str(port),
                       extra_env={"MOLAR_LLM_DATABASE_URL": dead_db})
    wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc, timeout_s=60)
    ready_response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30,
                               headers={"Authorization": f"Bearer {SERVICE_KEY}"})
    assert ready_response.status_code == 503
    ready = ready_response.json()
    stack.kill("api-nodb")
    assert ready["checks"]["database"].startswith("failed")
    assert ready["checks"]["broker"] == "ok"


def test_multiprocess_mode_renders_series_written_by_another_process(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    write = ("from broker import prometheus as p; "
             "p.REQUESTS.labels('planner', 'gpt-4.1-mini', 'hosted', 'succeeded').inc(3); "
             "p.IN_FLIGHT.labels('planner').inc()")
    subprocess.run([sys.executable, "-c", write], env=env, check=True, timeout=60)
    read = "import sys; from broker import prometheus as p; sys.stdout.buffer.write(p.render({}))"
    text = subprocess.run([sys.executable, "-c", read], env=env, check=True, timeout=60,
                          capture_output=True).stdout.decode()
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    assert value(families["molar_llm_requests"], "molar_llm_requests_total",
                 capability="planner", outcome="succeeded") == 3
    assert value(families["molar_llm_jobs_in_flight"], "molar_llm_jobs_in_flight",
                 capability="planner") == 1

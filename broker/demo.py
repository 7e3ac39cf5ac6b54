"""``molar-llm demo``: a Cartographer-style batch through a real local stack, with a report.

With nothing configured it runs on the embedded default (SQLite for data and broker) in
``./var/demo``; with ``MOLAR_LLM_DATABASE_URL`` and ``MOLAR_LLM_BROKER_URL`` set it runs the
same on Redis and PostgreSQL. Exits 0 only when every job succeeded.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from broker.client import BrokerClient
from broker.devstack import LocalStack
from broker.settings import get_settings

# A 1x1 PNG, enough for a vision content part.
PIXEL_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
MIX = (("planner", 0.25), ("grounding_tier0", 0.2), ("grounding_tier1_vlm", 0.2),
       ("export_generator", 0.2), ("embeddings", 0.15))
DEMO_ORG = "org_demo"


def demo_items(total: int) -> Iterator[dict[str, Any]]:
    """Items shaped like a crawl run's: plan, ground, look, export, embed."""
    counts = [int(total * share) for _, share in MIX]
    counts[0] += total - sum(counts)
    for (capability, _), count in zip(MIX, counts, strict=True):
        for i in range(count):
            yield {"custom_id": f"{capability}-{i:05d}", "capability": capability,
                   "request": _request(capability, i)}


def _request(capability: str, i: int) -> dict[str, Any]:
    page = f"https://shop.example.com/catalog/page-{i}"
    if capability == "embeddings":
        return {"input": [f"{page} product card {i}", f"{page} footer links"]}
    if capability == "planner":
        text = f"Crawl state: visited {page}. Propose the next three links to explore."
    elif capability == "grounding_tier0":
        text = (f"DOM: <main><button id='buy-{i}' class='cta'>Add to cart</button></main>\n"
                "Return a stable selector for the 'Add to cart' button.")
    elif capability == "export_generator":
        text = (f"Write a Playwright test: open {page}, click 'Add to cart', "
                "assert the cart badge shows 1.")
    else:
        return {"messages": [{"role": "user", "content": [
            {"type": "text", "text": f"Screenshot of {page}: where is the checkout button?"},
            {"type": "image_url", "image_url": {"url": PIXEL_PNG}},
        ]}], "max_tokens": 64}
    return {"messages": [{"role": "system", "content": "You are Cartographer's crawl agent."},
                         {"role": "user", "content": text}], "max_tokens": 128}


def run_demo(*, items: int = 240, latency_ms: float = 40.0, workers: int = 1,
             concurrency: int = 64) -> int:
    # A pipe or CI log has no width; give the report room instead of truncating it.
    console = Console(width=None if sys.stdout.isatty() else 110)
    if items < 1:
        console.print("[red]--items must be at least 1[/red]")
        return 2
    settings = get_settings()
    var_dir = Path.cwd() / "var" / "demo"
    env: dict[str, str] = {}
    if settings.is_embedded:
        shutil.rmtree(var_dir, ignore_errors=True)
        env["MOLAR_LLM_VAR_DIR"] = str(var_dir)
        where = f"embedded default (SQLite in {var_dir})"
    else:
        where = "configured database and broker"
    with LocalStack(var_dir / "logs", env=env, upstream_latency_ms=latency_ms) as stack:
        console.print(f"[bold]molar-llm demo[/bold] on the {where}; logs in {stack.log_dir}")
        if not settings.is_embedded:
            subprocess.run([sys.executable, "-m", "broker.cli", "migrate"], env=stack.env,
                           check=True)
        stack.start_upstream()
        api_url = stack.start_api()
        for n in range(workers):
            stack.start_worker(f"worker-{n}", concurrency=concurrency)
        console.print(f"fake upstream {stack.upstream_url} (latency {latency_ms:g} ms), "
                      f"API {api_url}, {workers} worker(s) x {concurrency} calls in flight")
        with BrokerClient(api_url, service_key=settings.service_key.get_secret_value(),
                          org_id=DEMO_ORG) as client:
            _wait_for_workers(client, console)
            batch = client.submit_batch(demo_items(items), run_id="demo-run")
            console.print(f"submitted {batch['id']} with {items} items")
            final = client.wait_batch(batch["id"], progress=True, poll_s=0.25, timeout_s=600)
            lines = list(client.iter_results(batch["id"]))
    console.print(report_table(lines))
    counts = final["request_counts"]
    ok = counts["succeeded"] == counts["total"] == len(lines)
    console.print(f"batch {final['status']}: {counts['succeeded']}/{counts['total']} succeeded"
                  + ("" if ok else " [red]- not every job succeeded[/red]"))
    return 0 if ok else 1


def _wait_for_workers(client: BrokerClient, console: Console) -> None:
    """One warm-up job, so worker start-up time does not count as job latency."""
    with console.status("waiting for the worker to come up"):
        job = client.submit_job("planner", {"messages": [{"role": "user", "content": "ping"}]},
                                run_id="demo-warmup")
        client.wait_job(job["id"], timeout_s=120, poll_s=0.1)


def report_table(lines: list[dict[str, Any]]) -> Table:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        groups[line["capability"]].append(line)
    table = Table(title="per-capability results")
    for column in ("capability", "jobs", "succeeded", "p50 ms", "p95 ms", "tokens in",
                   "tokens out", "cost USD"):
        table.add_column(column, justify="left" if column == "capability" else "right")
    for capability, group in sorted(groups.items()):
        latencies = [_latency_ms(line) for line in group if line["finished_at"]]
        usage = [line["usage"] for line in group if line.get("usage")]
        table.add_row(
            capability, str(len(group)),
            str(sum(line["status"] == "succeeded" for line in group)),
            f"{_percentile(latencies, 50):.0f}", f"{_percentile(latencies, 95):.0f}",
            str(sum(u["input_tokens"] for u in usage)),
            str(sum(u["output_tokens"] for u in usage)),
            f"{sum(Decimal(u['cost_usd']) for u in usage):.6f}",
        )
    return table


def _latency_ms(line: dict[str, Any]) -> float:
    created = datetime.fromisoformat(line["created_at"])
    finished = datetime.fromisoformat(line["finished_at"])
    return (finished - created).total_seconds() * 1000


def _percentile(values: list[float], pct: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]

"""Overhead of the OpenAI-compatible path: broker vs LiteLLM's proxy, against one fake upstream.

Starts a fake upstream (0 ms latency), the broker (API + one worker process, Redis +
PostgreSQL, metering on) and LiteLLM's proxy (one worker process, no database) pointed at the
same upstream, then drives each with ``wrk`` at 1, 16 and 64 concurrent connections,
interleaved, repeated, and reports p50/p99 latency minus the direct-to-upstream latency at the
same level, plus requests per second. LiteLLM is installed into its own venv
(``bench/.venv-litellm``), never into the project's dependencies.

    python -m bench.overhead --seconds 10 --repeats 3 --out docs/benchmarks-overhead.md

Needs ``wrk`` (``apt-get install wrk``), PostgreSQL on 127.0.0.1:5432 and Redis on :6379.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

from broker.devstack import LocalStack, free_port, wait_http

log = logging.getLogger("bench.overhead")
ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LITELLM_PACKAGES = ("litellm[proxy]==1.108.7", "httptools", "opentelemetry-sdk")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/14"
SERVICE_KEY = "bench-service-key-0123456789abcdef"
# Both sides authenticate every call: LiteLLM against its master key, the broker its service key.
LITELLM_MASTER_KEY = f"sk-bench-{secrets.token_hex(16)}"
LEVELS = (1, 16, 64)
BENCH_CAP_USD = "100000"
TARGETS = ("direct", "broker", "litellm")
MODEL = "gpt-4.1-mini"
CHAT_BODY = {"model": MODEL, "max_tokens": 16,
             "messages": [{"role": "user", "content": "Name the primary navigation links."}]}
WRK_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True)
class Sample:
    target: str
    callers: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_request: float


def ensure_litellm() -> Path:
    """LiteLLM's proxy in a venv of its own, created on first use."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        return binary
    log.info("installing %s into %s", " ".join(LITELLM_PACKAGES), LITELLM_VENV)
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", *LITELLM_PACKAGES],
                   check=True)
    return binary


@contextmanager
def fresh_database() -> Iterator[str]:
    name = f"molar_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_broker(stack: LocalStack, worker_threads: int) -> None:
    migrate = stack.molar("migrate", "migrate")
    if migrate.wait(timeout=120) != 0:
        raise RuntimeError("migration failed; see " + str(stack.log_dir / "migrate.log"))
    stack.start_upstream()
    stack.start_api()
    stack.start_worker("worker", concurrency=worker_threads)


def start_litellm(stack: LocalStack, workdir: Path) -> str:
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {stack.upstream_url}/v1\n"
        f"      api_key: {stack.upstream_key}\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOLAR_", "DATABASE_URL"))}
    log_file = open(stack.log_dir / "litellm.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(ensure_litellm()), "--config", str(config), "--port", str(port),
         "--num_workers", "1"],
        env={**env, "LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": LITELLM_MASTER_KEY},
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log_file.close()
    stack.procs["litellm"] = proc
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health/liveliness", proc=proc, timeout_s=180)
    return url


def wrk_script(path: Path, headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(CHAT_BODY))}",
             'wrk.headers["Content-Type"] = "application/json"']
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(url: str, script: Path, callers: int, seconds: float) -> tuple[float, float, float,
                                                                            int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{callers}", f"-d{seconds:g}s", "--latency", "--timeout", "30s",
         "-s", str(script), url], capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _percentile(out, "50%")
    p99 = _percentile(out, "99%")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return rps, p50, p99, errors


def _percentile(out: str, label: str) -> float:
    match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no {label} latency:\n{out}")
    return float(match.group(1)) * WRK_UNITS_MS[match.group(2)]


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_s(roots: list[int]) -> float:
    """User plus system CPU seconds of the process trees under ``roots``."""
    total = 0
    for pid in (p for root in roots for p in process_tree(root)):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def prime(url: str, headers: dict[str, str]) -> None:
    """One call that may wait for a worker to boot, so no measured run does."""
    response = httpx.post(url, json=CHAT_BODY, headers=headers, timeout=180)
    response.raise_for_status()


def measure(urls: dict[str, str], scripts: dict[str, Path], pids: dict[str, list[int]], *,
            seconds: float, repeats: int) -> list[Sample]:
    samples: list[Sample] = []
    for target in TARGETS:  # warm pools, caches and JITs before anything is recorded
        run_wrk(urls[target], scripts[target], 16, 3)
    for repeat in range(repeats):
        for callers in LEVELS:
            for target in TARGETS:
                before_s = cpu_s(pids[target])
                rps, p50, p99, errors = run_wrk(urls[target], scripts[target], callers, seconds)
                cpu_ms = (cpu_s(pids[target]) - before_s) * 1000 / max(rps * seconds, 1)
                samples.append(Sample(target, callers, rps, p50, p99, errors, cpu_ms))
                log.info("run %d %s c=%d rps=%.1f p50=%.2fms p99=%.2fms errors=%d cpu=%.1fms",
                         repeat + 1, target, callers, rps, p50, p99, errors, cpu_ms)
    return samples


def summarise(samples: list[Sample]) -> dict[tuple[str, int], dict[str, float]]:
    """Medians over repeats; overhead is the target's latency minus direct's in the same run."""
    table: dict[tuple[str, int], dict[str, float]] = {}
    for callers in LEVELS:
        direct = [s for s in samples if s.target == "direct" and s.callers == callers]
        for target in TARGETS:
            runs = [s for s in samples if s.target == target and s.callers == callers]
            table[(target, callers)] = {
                "rps": statistics.median(s.rps for s in runs),
                "p50_ms": statistics.median(s.p50_ms for s in runs),
                "p99_ms": statistics.median(s.p99_ms for s in runs),
                "p50_overhead_ms": statistics.median(
                    s.p50_ms - d.p50_ms for s, d in zip(runs, direct, strict=True)),
                "p99_overhead_ms": statistics.median(
                    s.p99_ms - d.p99_ms for s, d in zip(runs, direct, strict=True)),
                "errors": sum(s.errors for s in runs),
                "cpu_ms": statistics.median(s.cpu_ms_per_request for s in runs),
            }
    return table


def report(table: dict[tuple[str, int], dict[str, float]], *, seconds: float, repeats: int,
           worker_threads: int) -> str:
    rows = []
    verdicts = []
    for callers in LEVELS:
        b, lt, d = table[("broker", callers)], table[("litellm", callers)], table[("direct",
                                                                                   callers)]
        rows.append(
            f"| {callers} | {d['rps']:.0f} | {b['rps']:.0f} | {lt['rps']:.0f} | "
            f"{b['rps'] / max(lt['rps'], 0.01):.2f}x | {b['p50_overhead_ms']:.1f} / "
            f"{b['p99_overhead_ms']:.1f} | {lt['p50_overhead_ms']:.1f} / "
            f"{lt['p99_overhead_ms']:.1f} | {b['cpu_ms']:.1f} / {lt['cpu_ms']:.1f} | "
            f"{int(b['errors'])} / {int(lt['errors'])} |")
        met = (b["p50_overhead_ms"] < lt["p50_overhead_ms"] / 2
               and b["p99_overhead_ms"] < lt["p99_overhead_ms"] / 2
               and b["rps"] >= 2 * lt["rps"])
        verdicts.append(f"- {callers} caller(s): target {'met' if met else 'NOT met'}")
    load = os.getloadavg()
    return "\n".join([
        "# Overhead of the OpenAI-compatible path: broker vs LiteLLM proxy",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m bench.overhead "
        f"--seconds {seconds:g} --repeats {repeats}` on {platform.node()} "
        f"({os.cpu_count()} cores, load average before the run {load[0]:.1f}).",
        "",
        "- Upstream: the fake upstream (uvicorn, uvloop, httptools), 0 ms latency, same process "
        "for all three targets. Request: one small chat completion, `max_tokens` 16.",
        "- Broker: `molar-llm serve` (one API process) + `molar-llm worker` (one process, "
        f"{worker_threads} threads), Redis broker, PostgreSQL database, metering on (usage "
        "event, attempt and job row written per call) and spend admission on (the org has a "
        f"${BENCH_CAP_USD} cap: every call holds and settles its cost against it); capability "
        f"`grounding_tier0` routed to `{MODEL}`.",
        "- LiteLLM proxy 1.108.7 (`litellm[proxy]` + httptools + opentelemetry-sdk, its own "
        "venv), `--num_workers 1`, no database, no cache, master key set (it refuses to start "
        "without one).",
        "- Load: `wrk -t1 -cN`, one run per target and level, interleaved, each "
        f"{seconds:g} s; medians of {repeats} repetitions. Overhead = the target's latency "
        "percentile minus the direct-to-upstream percentile of the same repetition.",
        "- CPU ms per request: user + system CPU of the target's processes (broker: API and "
        "worker; not PostgreSQL or Redis) during its runs, divided by the requests served.",
        "- The machine has 2 cores shared with other work: absolute figures move between runs; "
        "compare the columns of one run.",
        "",
        "| callers | direct rps | broker rps | LiteLLM rps | broker / LiteLLM | "
        "broker overhead p50 / p99 ms | LiteLLM overhead p50 / p99 ms | CPU ms per request "
        "broker / LiteLLM | errors broker / LiteLLM |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Target (p50 and p99 overhead under half of LiteLLM's, rps at least twice LiteLLM's):",
        *verdicts,
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker-threads", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-overhead.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ensure_litellm()

    with tempfile.TemporaryDirectory(prefix="molar-bench-") as tmp, fresh_database() as db:
        work = Path(tmp)
        env = {"MOLAR_LLM_DATABASE_URL": db, "MOLAR_LLM_BROKER_URL": REDIS_URL,
               "MOLAR_LLM_REDIS_KEY_PREFIX": f"bench{secrets.token_hex(3)}:",
               "MOLAR_LLM_SERVICE_KEY": SERVICE_KEY, "MOLAR_LLM_LOG_LEVEL": "WARNING",
               "MOLAR_LLM_VAR_DIR": str(work / "var")}
        with LocalStack(work / "logs", env=env) as stack:
            start_broker(stack, args.worker_threads)
            litellm_url = start_litellm(stack, work)
            urls = {"direct": f"{stack.upstream_url}/v1/chat/completions",
                    "broker": f"{stack.api_url}/v1/chat/completions",
                    "litellm": f"{litellm_url}/v1/chat/completions"}
            headers = {
                "direct": {"Authorization": f"Bearer {stack.upstream_key}"},
                "broker": {"Authorization": f"Bearer {SERVICE_KEY}",
                           "X-Molar-Org-Id": "org_bench", "X-Molar-Capability": "grounding_tier0"},
                "litellm": {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"},
            }
            # A cap far above what the run spends: every call is admitted by the conditional
            # update on the org's spend row, as a capped production org's would be.
            httpx.put(f"{stack.api_url}/v1/orgs/org_bench/settings",
                      json={"spend_cap_usd": BENCH_CAP_USD},
                      headers=headers["broker"], timeout=30).raise_for_status()
            for target in TARGETS:
                prime(urls[target], headers[target])
            scripts = {t: wrk_script(work / f"{t}.lua", headers[t]) for t in TARGETS}
            pids = {"direct": [stack.procs["fake-upstream"].pid],
                    "broker": [stack.procs["api"].pid, stack.procs["worker"].pid],
                    "litellm": [stack.procs["litellm"].pid]}
            samples = measure(urls, scripts, pids, seconds=args.seconds, repeats=args.repeats)
    table = summarise(samples)
    text = report(table, seconds=args.seconds, repeats=args.repeats,
                  worker_threads=args.worker_threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    sys.stdout.write(text)
    sys.stdout.write(json.dumps([s.__dict__ for s in samples]) + "\n")


if __name__ == "__main__":
    main()

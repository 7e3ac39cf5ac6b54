"""Throughput: N jobs through the broker against a bare Celery task, same Redis, same run.

    .venv/bin/python -m bench.throughput --jobs 5000 --latencies 0,200 --repeat 3

Both sides use the same worker layout (``--layouts 1x64,2x32``: processes x threads, 64
calls in flight either way), Redis on loopback and the fake upstream; the broker side adds
PostgreSQL, metering and the job API. Runs are interleaved so machine noise hits both alike;
medians and ratios go to stdout. ``--drain 50000`` also samples API and worker memory while
a 50,000-item batch drains.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from broker.allocator import jemalloc_loaded
from broker.devstack import LocalStack

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
SERVICE_KEY = "bench-service-key-0123456789"
# The same OpenAI chat call the bare Celery task makes.
SAME_CALL = {"planner": {"provider_integration_id": "molar-managed", "model": "gpt-4.1-mini"}}


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB."""
    total_kb = 0
    pids = [pid, *_children(pid)]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total_kb / 1024


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process and its children."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    kids = [int(x) for x in out.split()]
    return kids + [g for k in kids for g in _children(k)]


class BrokerSide:
    """A broker stack on Redis + a fresh PostgreSQL database."""

    def __init__(self, workdir: Path, latency_ms: float, processes: int = 1, threads: int = 64,
                 spare_threads: int = 0):
        self.db_name = f"molar_bench_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        redis.Redis.from_url(REDIS_URL).flushdb()
        env = {
            "MOLAR_LLM_DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0] + "/" + self.db_name,
            "MOLAR_LLM_BROKER_URL": REDIS_URL,
            "MOLAR_LLM_SERVICE_KEY": SERVICE_KEY,
            "MOLAR_LLM_VAR_DIR": str(workdir / "var"),
            "MOLAR_LLM_LOG_LEVEL": "WARNING",
        }
        self.stack = LocalStack(workdir / "logs", env=env, upstream_latency_ms=latency_ms)
        assert self.stack.molar("migrate", "migrate").wait(60) == 0
        self.stack.start_upstream()
        self.stack.start_api()
        self.workers = [self.stack.start_worker(f"worker{n}", concurrency=threads,
                                                spare_threads=spare_threads)
                        for n in range(processes)]
        self.worker = self.workers[0]
        self.http = httpx.Client(base_url=self.stack.api_url, timeout=120, headers={
            "Authorization": f"Bearer {SERVICE_KEY}", "X-Molar-Org-Id": "org_bench"})
        self.run(64)  # warm up connections, pools and the worker

    def run(self, jobs: int) -> float:
        """Submit one batch of ``jobs`` and wait for all; returns jobs per second."""
        items = [{"custom_id": f"j{i}", "capability": "planner", "request": {
            "messages": [{"role": "user", "content": f"bench job {i}"}]}} for i in range(jobs)]
        started = time.perf_counter()
        batch = self.http.post("/v1/batches", json={"items": items, "model_routing": SAME_CALL})
        batch.raise_for_status()
        batch_id = batch.json()["id"]
        while True:
            state = self.http.get(f"/v1/batches/{batch_id}").json()
            if state["status"] == "completed":
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        assert state["request_counts"]["succeeded"] == jobs, state
        return jobs / elapsed

    def close(self) -> None:
        self.http.close()
        self.stack.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')


class BareSide:
    """Bare Celery on the same Redis (another database number) and the same upstream."""

    def __init__(self, workdir: Path, upstream_url: str, upstream_key: str, processes: int = 1,
                 threads: int = 64):
        self.url = REDIS_URL.rsplit("/", 1)[0] + "/14"
        redis.Redis.from_url(self.url).flushdb()
        os.environ.update(BARE_BROKER_URL=self.url, BARE_UPSTREAM_URL=upstream_url,
                          BARE_UPSTREAM_KEY=upstream_key)
        log = open(workdir / "logs" / "bare-worker.log", "ab")  # noqa: SIM115
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.bare_celery", "worker", "-P",
             "threads", "-c", str(threads), "-Q", "bare", "-n", f"bare{n}@%h", "--loglevel",
             "WARNING", "--without-heartbeat", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        ) for n in range(processes)]
        from bench.bare_celery import app, call_upstream

        self.app, self.task = app, call_upstream
        self.run(64)

    def run(self, jobs: int) -> float:
        started = time.perf_counter()
        results = [self.task.apply_async(args=(i,)) for i in range(jobs)]
        for result in results:
            result.get(timeout=300)
        return jobs / (time.perf_counter() - started)

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(30)


def measure(latency_ms: float, jobs: int, repeat: int, workdir: Path, processes: int = 1,
            threads: int = 64, spare_threads: int = 0) -> dict[str, Any]:
    where = workdir / f"lat{int(latency_ms)}-{processes}x{threads}+{spare_threads}"
    broker = BrokerSide(where, latency_ms, processes, threads, spare_threads)
    bare = BareSide(where, broker.stack.upstream_url, broker.stack.upstream_key, processes,
                    threads)
    ours: list[float] = []
    theirs: list[float] = []
    broker_pids = [*(w.pid for w in broker.workers), broker.stack.procs["api"].pid]
    cpu_ms = {"broker": 0.0, "bare": 0.0}
    try:
        for _ in range(repeat):
            before = sum(cpu_s(pid) for pid in broker_pids)
            ours.append(broker.run(jobs))
            cpu_ms["broker"] += (sum(cpu_s(pid) for pid in broker_pids) - before) * 1000
            before = sum(cpu_s(p.pid) for p in bare.procs) + time.process_time()
            theirs.append(bare.run(jobs))
            cpu_ms["bare"] += (sum(cpu_s(p.pid) for p in bare.procs) + time.process_time()
                               - before) * 1000
            print(f"  {processes}x{threads}+{spare_threads} latency {latency_ms:g} ms: "
                  f"broker {ours[-1]:.0f} jobs/s, bare Celery {theirs[-1]:.0f} jobs/s",
                  flush=True)
    finally:
        bare.close()
        broker.close()
    return {"latency_ms": latency_ms, "jobs": jobs,
            "layout": f"{processes}x{threads}+{spare_threads}",
            "broker": ours, "bare": theirs,
            "ratio": statistics.median(ours) / statistics.median(theirs),
            # Broker: API and worker processes; bare: worker and the submitting client.
            "cpu_ms_per_job": {k: v / (jobs * repeat) for k, v in cpu_ms.items()}}


def drain_memory(items: int, workdir: Path, rounds: int = 1) -> dict[str, Any]:
    """Sample API and worker memory while large batches drain, one after another on the same
    processes (``rounds``), so that a worker whose memory only warms up shows a plateau."""
    broker = BrokerSide(workdir / "drain", 0)
    api_pid = broker.stack.procs["api"].pid
    worker_pid = broker.worker.pid
    samples: list[tuple[float, float, float, int]] = []
    ends: list[tuple[float, float, float, int]] = []
    submit_s: list[float] = []
    try:
        before = (rss_mb(api_pid), rss_mb(worker_pid))
        allocators = {name: allocator_of(pid) for name, pid in
                      (("api", api_pid), ("worker", worker_pid))}
        started = time.perf_counter()
        for round_no in range(rounds):
            payload = {"model_routing": SAME_CALL, "items": [
                {"custom_id": f"r{round_no}j{i}", "capability": "planner", "request": {
                    "messages": [{"role": "user", "content": f"drain job {round_no}.{i}"}]}}
                for i in range(items)]}
            submitted = time.perf_counter()
            batch_id = broker.http.post("/v1/batches", json=payload).json()["id"]
            submit_s.append(time.perf_counter() - submitted)
            del payload
            while True:
                state = broker.http.get(f"/v1/batches/{batch_id}").json()
                done = (round_no * items + state["request_counts"]["succeeded"]
                        + state["request_counts"]["failed"])
                samples.append((time.perf_counter() - started, rss_mb(api_pid),
                                rss_mb(worker_pid), done))
                if state["status"] == "completed":
                    break
                time.sleep(2)
            ends.append(samples[-1])
        elapsed = time.perf_counter() - started
    finally:
        broker.close()
    return {"items": items, "rounds": rounds, "submit_s": submit_s, "drain_s": elapsed,
            "before": before, "allocators": allocators, "samples": samples, "round_ends": ends}


def allocator_of(pid: int) -> str:
    """Which malloc the process runs on (``MOLAR_LLM_ALLOCATOR``, broker/allocator.py)."""
    return "jemalloc" if jemalloc_loaded(Path(f"/proc/{pid}/maps")) else "system"


def _result_line(result: dict[str, Any]) -> str:
    cpu = {k: round(v, 2) for k, v in result["cpu_ms_per_job"].items()}
    return (f"RESULT layout={result['layout']} latency={result['latency_ms']:g}ms "
            f"jobs={result['jobs']} broker_median={statistics.median(result['broker']):.0f} "
            f"bare_median={statistics.median(result['bare']):.0f} ratio={result['ratio']:.2f} "
            f"broker_runs={[round(x) for x in result['broker']]} "
            f"bare_runs={[round(x) for x in result['bare']]} cpu_ms_per_job={cpu}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--latencies", default="0,200")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--layouts", default="1x64",
                        help="worker processes x threads per side, comma-separated")
    parser.add_argument("--spare-threads", type=int, default=0,
                        help="broker workers' threads beyond the calls in flight "
                             "(molar-llm worker --spare-threads); bare Celery has none")
    parser.add_argument("--drain", type=int, default=0, help="items of the memory drain run")
    parser.add_argument("--drain-rounds", type=int, default=1,
                        help="batches of --drain items drained one after another")
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    for processes, threads in layouts:
        for latency in [float(x) for x in args.latencies.split(",") if x]:
            result = measure(latency, args.jobs, args.repeat, args.workdir, processes, threads,
                             args.spare_threads)
            print(_result_line(result), flush=True)
    if args.drain:
        drain = drain_memory(args.drain, args.workdir, args.drain_rounds)
        print(f"DRAIN items={drain['items']} rounds={drain['rounds']} "
              f"submit_s={[round(x, 1) for x in drain['submit_s']]} "
              f"drain_s={drain['drain_s']:.1f} before_mb={drain['before']} "
              f"allocators={drain['allocators']}")
        samples = drain["samples"]
        step = max(len(samples) // (12 * drain["rounds"]), 1)
        for t, api_mb, worker_mb, done in samples[::step]:
            print(f"  t={t:6.1f}s done={done:6d} api_rss={api_mb:6.1f}MB "
                  f"worker_rss={worker_mb:6.1f}MB")
        for number, (t, api_mb, worker_mb, done) in enumerate(drain["round_ends"], 1):
            print(f"  end of round {number} t={t:.1f}s done={done} api_rss={api_mb:.1f}MB "
                  f"worker_rss={worker_mb:.1f}MB")


if __name__ == "__main__":
    main()

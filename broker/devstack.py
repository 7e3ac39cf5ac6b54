"""Start a local broker stack as real processes: fake upstream, API and workers.

Used by ``molar-llm demo``, the benchmarks and the end-to-end tests, so all three exercise
the same processes a deployment runs.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from broker.capabilities import CAPABILITIES


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, *, timeout_s: float = 30, proc: subprocess.Popen[bytes] | None = None,
              expect: int = 200) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == expect:
                return
            last = f"status {response.status_code}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s}s ({last})")


@dataclass
class LocalStack:
    """Processes sharing one environment; stopped in reverse order on exit."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    upstream_latency_ms: float = 0.0
    upstream_key: str = field(default_factory=lambda: f"fake-platform-{secrets.token_hex(8)}")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    api_url: str = ""
    upstream_url: str = ""

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **self.env}

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def molar(self, name: str, *args: str, extra_env: Mapping[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", *args], env={**self.env, **(extra_env or {})},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_upstream(self) -> str:
        port = free_port()
        proc = self.molar("fake-upstream", "fake-upstream", "--port", str(port), "--latency-ms",
                          str(self.upstream_latency_ms), "--api-key", self.upstream_key)
        self.upstream_url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.upstream_url}/_control/health", proc=proc)
        self.env.update({
            "MOLAR_LLM_MANAGED_OPENAI_API_KEY": self.upstream_key,
            "MOLAR_LLM_MANAGED_OPENAI_BASE_URL": f"{self.upstream_url}/v1",
            "MOLAR_LLM_MANAGED_ANTHROPIC_API_KEY": self.upstream_key,
            "MOLAR_LLM_MANAGED_ANTHROPIC_BASE_URL": self.upstream_url,
            "MOLAR_LLM_MANAGED_OPENAI_COMPATIBLE_API_KEY": self.upstream_key,
            "MOLAR_LLM_MANAGED_OPENAI_COMPATIBLE_BASE_URL": f"{self.upstream_url}/v1",
        })
        return self.upstream_url

    def start_api(self, port: int | None = None) -> str:
        port = port or free_port()
        proc = self.molar("api", "serve", "--port", str(port))
        self.api_url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.api_url}/readyz", proc=proc, timeout_s=60)
        self.env["MOLAR_LLM_BASE_URL"] = self.api_url
        return self.api_url

    def start_worker(self, name: str = "worker", capabilities: Iterable[str] = CAPABILITIES,
                     concurrency: int = 64, metrics_port: int | None = None,
                     spare_threads: int = 0) -> subprocess.Popen[bytes]:
        caps = ",".join(capabilities)
        extra = ["--metrics-port", str(metrics_port)] if metrics_port else []
        if spare_threads:
            extra += ["--spare-threads", str(spare_threads)]
        return self.molar(name, "worker", "--capabilities", caps, "--concurrency",
                          str(concurrency), "--name", f"{name}-{secrets.token_hex(3)}@%h",
                          *extra)

    def kill(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.kill(name)

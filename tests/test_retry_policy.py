"""The retry policy as a pure function, its configuration, and the provider's deadline.

The provider tests run against small real HTTP servers on localhost (a gzip answer, a body
that trickles in past the deadline), not patched methods.
"""

from __future__ import annotations

import gzip
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import orjson
import pytest

from broker.settings import Settings
from tasks.retry_policy import RetryPolicies, RetryPolicy, decide
from workers.errors import (
    PermanentProviderError,
    RetryableProviderError,
    classify_status,
)
from workers.providers.base import Credential
from workers.providers.openai_compat import OpenAICompatibleProvider, retry_after_s

POLICY = RetryPolicy(max_attempts=4, base_backoff_s=1.0, max_backoff_s=5.0, jitter_ratio=0.2,
                     attempt_deadline_s=10.0, max_retry_after_s=30.0)


def rate_limited(hint_s: float | None) -> RetryableProviderError:
    return RetryableProviderError("slow down", code="provider_rate_limited", status=429,
                                  retry_after_s=hint_s)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
def test_transient_statuses_are_retryable(status):
    assert classify_status(status) is RetryableProviderError


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_caller_errors_are_permanent(status):
    assert classify_status(status) is PermanentProviderError


def test_backoff_doubles_up_to_the_ceiling_within_the_jitter():
    rng = random.Random(7)
    for failures, raw in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        for _ in range(50):
            assert raw * 0.8 <= POLICY.backoff_s(failures, rng) <= raw * 1.2


def test_a_retry_after_hint_sets_the_delay_and_is_never_shortened():
    rng = random.Random(1)
    delays = [decide(POLICY, rate_limited(3.0), 1, rng).delay_s for _ in range(50)]
    assert all(3.0 <= d <= 3.6 for d in delays)


def test_a_hint_above_the_ceiling_gives_up_as_provider_rate_limited():
    decision = decide(POLICY, rate_limited(31.0), 1, random.Random())
    assert not decision.retry
    assert decision.error["code"] == "provider_rate_limited"
    assert decision.error["provider_status"] == 429
    assert decision.error["retryable"] is True


def test_permanent_errors_and_exhausted_attempts_give_up():
    bad = PermanentProviderError("no", code="provider_error", status=400)
    assert not decide(POLICY, bad, 1, random.Random()).retry
    exhausted = decide(POLICY, rate_limited(None), 4, random.Random())
    assert not exhausted.retry
    assert exhausted.error["attempts"] == 4
    assert "gave up after 4 attempts" in exhausted.error["message"]
    assert decide(POLICY, rate_limited(None), 3, random.Random()).retry


def test_heal_and_export_get_more_attempts_and_overrides_layer_by_capability():
    settings = Settings(retry_policies={"*": {"base_backoff_s": 0.1},
                                        "export_healer": {"max_attempts": 12}})
    policies = RetryPolicies.from_settings(settings)
    assert policies.for_capability("export_generator").max_attempts > \
        policies.for_capability("planner").max_attempts
    assert policies.for_capability("export_healer").max_attempts == 12
    assert policies.for_capability("planner").base_backoff_s == 0.1
    assert policies.for_capability("planner").attempt_deadline_s == settings.attempt_deadline_s


@pytest.mark.parametrize(("overrides", "named"), [
    ({"planer": {"max_attempts": 2}}, "planer"),
    ({"*": {"retries": 2}}, "retries"),
    ({"planner": {"attempt_deadline_s": 10_000}}, "attempt_deadline_s"),
    ({"planner": {"max_attempts": 0}}, "max_attempts"),
], ids=["unknown-capability", "unknown-field", "deadline-over-task-limit", "zero-attempts"])
def test_bad_policies_are_refused_naming_what_is_wrong(overrides, named):
    with pytest.raises(ValueError, match=named):
        RetryPolicies.from_settings(Settings(retry_policies=overrides))


def test_retry_after_ms_wins_over_retry_after_seconds():
    assert retry_after_s(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert retry_after_s(httpx.Headers({"retry-after": "2"})) == 2.0
    assert retry_after_s(httpx.Headers({})) is None


# -- the provider's deadline over real sockets -------------------------------------------

ANSWER = orjson.dumps({"id": "x", "choices": [], "usage": {"prompt_tokens": 3,
                                                             "completion_tokens": 4}})


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.startswith("/gzip"):
            body = gzip.compress(ANSWER)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        # Trickle: a byte every 0.3 s, so no single read ever times out.
        self.send_response(200)
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        for byte in ANSWER:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:  # the client gave up, as it should
                return
            time.sleep(0.3)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _provider() -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(connect_timeout_s=2, read_timeout_s=30, max_connections=4)


def test_a_compressed_answer_is_decoded(server):
    provider = _provider()
    response = provider.call("chat", {"messages": []}, model="m", deadline_s=5,
                             credential=Credential("i", "openai", f"{server}/gzip", "k" * 10))
    provider.close()
    assert response.body["id"] == "x"
    assert response.usage is not None and response.usage.output_tokens == 4


def test_a_body_trickling_past_the_deadline_ends_the_attempt_on_time(server):
    provider = _provider()
    started = time.monotonic()
    with pytest.raises(RetryableProviderError) as caught:
        provider.call("chat", {"messages": []}, model="m", deadline_s=1.0,
                      credential=Credential("i", "openai", f"{server}/trickle", "k" * 10))
    elapsed_s = time.monotonic() - started
    provider.close()
    assert caught.value.code == "provider_timeout"
    assert 1.0 <= elapsed_s <= 2.0

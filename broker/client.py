"""A small Python client for pipelines: submit jobs and batches, wait, iterate results.

    client = BrokerClient.from_env(org_id="org_123")
    batch = client.submit_batch(items)
    client.wait_batch(batch["id"], progress=True)
    for line in client.iter_results(batch["id"]):
        ...

Errors come back as the broker's own typed errors (:mod:`broker.errors`), so a caller can
``except SpendCapExceeded`` or ``except NotFound``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import httpx
import orjson

from broker import errors

_BY_STATUS: dict[int, type[errors.BrokerError]] = {
    400: errors.InvalidRequest,
    401: errors.Unauthenticated,
    402: errors.SpendCapExceeded,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    409: errors.Conflict,
    422: errors.InvalidRequest,
    503: errors.ServiceUnavailable,
}
#: How long a submission may take to be accepted. Longer than ``timeout_s``: giving up on a
#: submission leaves the caller not knowing whether its jobs exist, and a retry runs them twice.
SUBMIT_TIMEOUT_S = 600.0
TERMINAL_JOB = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL_BATCH = frozenset({"completed", "cancelled"})


class BrokerClient:
    def __init__(
        self,
        base_url: str,
        *,
        service_key: str | None = None,
        org_id: str | None = None,
        bearer_token: str | None = None,
        timeout_s: float = 30.0,
    ):
        headers = {"Authorization": f"Bearer {bearer_token or service_key}"}
        if org_id:
            headers["X-Molar-Org-Id"] = org_id
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)

    @classmethod
    def from_env(cls, *, org_id: str, **kwargs: Any) -> BrokerClient:
        """Read ``MOLAR_LLM_BASE_URL`` and ``MOLAR_LLM_SERVICE_KEY``."""
        return cls(
            os.environ.get("MOLAR_LLM_BASE_URL", "http://127.0.0.1:8787"),
            service_key=os.environ.get("MOLAR_LLM_SERVICE_KEY", "dev-molar-llm-service-key"),
            org_id=org_id,
            **kwargs,
        )

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType]) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit_job(self, capability: str, request: dict[str, Any], *,
                   idempotency_key: str | None = None, **fields: Any) -> dict[str, Any]:
        """Submit one job; with ``idempotency_key`` a resubmission returns the original."""
        return self._json("POST", "/v1/jobs", {"capability": capability, "request": request,
                                                **fields}, idempotency_key=idempotency_key,
                          timeout_s=SUBMIT_TIMEOUT_S)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def submit_batch(self, items: Iterable[dict[str, Any]], *,
                     idempotency_key: str | None = None, **fields: Any) -> dict[str, Any]:
        return self._json("POST", "/v1/batches", {"items": list(items), **fields},
                          idempotency_key=idempotency_key, timeout_s=SUBMIT_TIMEOUT_S)

    def retry_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/retry")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def retry_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/batches/{batch_id}/retry")

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/batches/{batch_id}/cancel")

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/batches/{batch_id}")

    def wait_job(self, job_id: str, *, timeout_s: float = 300, poll_s: float = 0.2
                 ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if job["status"] in TERMINAL_JOB:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s}s")
            time.sleep(poll_s)

    def wait_batch(
        self, batch_id: str, *, timeout_s: float = 3600, poll_s: float = 0.5,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Poll until the batch is done, optionally drawing a progress bar on stderr."""
        deadline = time.monotonic() + timeout_s
        bar = _ProgressBar(batch_id) if progress else None
        try:
            while True:
                batch = self.get_batch(batch_id)
                if bar:
                    bar.update(batch["request_counts"])
                if batch["status"] in TERMINAL_BATCH:
                    return batch
                if time.monotonic() > deadline:
                    raise TimeoutError(f"batch {batch_id} not done after {timeout_s}s")
                time.sleep(poll_s)
        finally:
            if bar:
                bar.close()

    def iter_results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """Stream the batch's result lines without holding them all in memory."""
        with self._http.stream("GET", f"/v1/batches/{batch_id}/results") as response:
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            for line in response.iter_lines():
                if line:
                    yield orjson.loads(line)

    def put_org_settings(self, org_id: str, **fields: Any) -> dict[str, Any]:
        return self._json("PUT", f"/v1/orgs/{org_id}/settings", fields)

    def routing(self) -> dict[str, Any]:
        return self._json("GET", "/v1/routing")

    def _json(self, method: str, path: str, body: Any = None, *,
              idempotency_key: str | None = None, timeout_s: float | None = None
              ) -> dict[str, Any]:
        content = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else {}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        timeout = self._http.timeout if timeout_s is None else httpx.Timeout(
            timeout_s, connect=self._http.timeout.connect
        )
        try:
            response = self._http.request(method, path, content=content, headers=headers,
                                          timeout=timeout)
        except httpx.TransportError as exc:
            raise errors.ServiceUnavailable(
                f"cannot reach the broker at {self._http.base_url}: {type(exc).__name__}"
            ) from exc
        if response.status_code >= 400:
            raise _error(response)
        data: dict[str, Any] = response.json()
        return data


def _error(response: httpx.Response) -> errors.BrokerError:
    try:
        body = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        body = {"message": response.text or response.reason_phrase}
    cls = _BY_STATUS.get(response.status_code, errors.BrokerError)
    error = cls(str(body.get("message")), param=body.get("param"), code=body.get("code"))
    error.status_code = response.status_code
    return error


class _ProgressBar:
    def __init__(self, batch_id: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), transient=False,
        )
        self._task = self._progress.add_task(batch_id, total=None, detail="")
        self._progress.start()

    def update(self, counts: dict[str, int]) -> None:
        done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
        detail = (f"running {counts['running']}  queued {counts['queued']}  "
                  f"failed {counts['failed']}")
        self._progress.update(self._task, total=counts["total"], completed=done, detail=detail)

    def close(self) -> None:
        self._progress.stop()

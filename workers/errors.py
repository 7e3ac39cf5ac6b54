"""Errors of a provider call, sorted by what the job should do next.

    ProviderError                 root; carries status, redacted message and our code
    ├── RetryableProviderError    connection errors, timeouts, 408/409/429/5xx/529
    └── PermanentProviderError    400/401/403/404/422 and the broker's own refusals

The retry policy is ``isinstance(exc, RetryableProviderError)`` and nothing more.
"""

from __future__ import annotations

from typing import Any

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


class ProviderError(Exception):
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retry_after_s = retry_after_s

    def to_error(self) -> dict[str, Any]:
        """The job's ``error`` field."""
        return {
            "code": self.code,
            "message": self.message,
            "provider_status": self.status,
            "retryable": self.retryable,
        }


class RetryableProviderError(ProviderError):
    retryable = True


class PermanentProviderError(ProviderError):
    retryable = False


def classify_status(status: int) -> type[ProviderError]:
    if status in RETRYABLE_STATUSES or status >= 500:
        return RetryableProviderError
    return PermanentProviderError

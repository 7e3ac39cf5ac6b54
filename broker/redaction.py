"""The one redaction step: every text bound for a job row, a log line or a metric label.

:func:`redact` removes given secrets from a text. :data:`LIVE_SECRETS` is the process's
registry of the secrets it holds (platform keys, the service key, the JWT secret, the
encryption keys and every stored key it has resolved), so the logging filter installed by
the command line and any metric label can be cleaned without knowing where a secret came
from. It is process-wide for the same reason logging is: every thread logs through it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"
# Shorter strings are not treated as secrets: replacing them would mangle ordinary text.
MIN_SECRET_LENGTH = 8


def redact(text: str, secrets: Iterable[str]) -> str:
    live = {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}
    # Longest first, so a secret that contains another is replaced whole.
    for secret in sorted(live, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class SecretRegistry:
    """A thread-safe set of the secrets one process holds; it only grows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()

    def add(self, *secrets: str) -> None:
        fresh = {s for s in secrets if len(s) >= MIN_SECRET_LENGTH} - self._secrets
        if fresh:
            with self._lock:
                self._secrets = self._secrets | fresh

    def snapshot(self) -> frozenset[str]:
        return self._secrets

    def redact(self, text: str, *extra: str) -> str:
        return redact(text, [*self._secrets, *extra])


LIVE_SECRETS = SecretRegistry()


class RedactingFilter(logging.Filter):
    """Cleans a record's message, arguments, extras and traceback before any handler formats it.

    Installed on handlers (not loggers) so records propagated from every logger pass it.
    """

    def __init__(self, registry: SecretRegistry = LIVE_SECRETS) -> None:
        super().__init__()
        self._registry = registry

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._registry.snapshot():
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # Arguments that do not fit the format: the handler reports it, with the raw
            # format string only, and the arguments are dropped so they cannot leak.
            record.msg = self._registry.redact(str(record.msg))
            record.args = None
            return True
        record.msg = self._registry.redact(message)
        record.args = None
        for key, value in vars(record).items():
            if key not in _CLEAN_ATTRS and isinstance(value, str):
                setattr(record, key, self._registry.redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._registry.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self._registry.redact(record.stack_info)
        return True


# Attributes logging itself fills with non-secret values, or handled above.
_CLEAN_ATTRS = frozenset({
    "msg", "name", "levelname", "pathname", "filename", "module", "funcName", "threadName",
    "processName", "exc_text", "stack_info", "taskName",
})


def redact_label(value: Any) -> str:
    """A metric label value with every live secret removed."""
    return LIVE_SECRETS.redact(str(value))

"""Remove live secrets from any text before it reaches a job row, a log line or a metric."""

from __future__ import annotations

from collections.abc import Iterable

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

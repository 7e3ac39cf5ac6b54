"""Remove live secrets from any text before it reaches a job row, a log line or a metric.

The step itself lives in :mod:`broker.redaction` so the API, the workers and the logging
filter share one implementation and one registry of live secrets.
"""

from __future__ import annotations

from broker.redaction import LIVE_SECRETS, MIN_SECRET_LENGTH, REDACTED, redact

__all__ = ["LIVE_SECRETS", "MIN_SECRET_LENGTH", "REDACTED", "redact"]

"""The interface every provider client implements, and the values that cross it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

CallKind = Literal["chat", "embedding"]


@dataclass(frozen=True)
class Credential:
    """A resolved credential. ``repr`` never shows the key."""

    integration_id: str
    provider: str
    base_url: str
    api_key: str = field(repr=False)


@dataclass(frozen=True)
class TokenUsage:
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class ProviderResponse:
    body: dict[str, Any]
    usage: TokenUsage | None
    status: int
    latency_ms: float


class Provider(Protocol):
    name: str

    def call(
        self,
        kind: CallKind,
        request: dict[str, Any],
        *,
        model: str,
        credential: Credential,
        deadline_s: float,
    ) -> ProviderResponse:
        """Send one request; raise :class:`workers.errors.ProviderError` on failure."""
        ...

    def close(self) -> None: ...

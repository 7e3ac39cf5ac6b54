"""The model catalog: provider, limits and dated prices of every model the broker may route to."""

from __future__ import annotations

import tomllib
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.errors import ConfigurationError

PROVIDERS = ("openai", "anthropic", "openai_compatible")
Provider = Literal["openai", "anthropic", "openai_compatible"]
MILLION = Decimal(1_000_000)


class Price(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    effective_from: date
    input: Decimal = Field(ge=0)
    cached_input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)


class ModelInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    provider: Provider
    kind: Literal["chat", "embedding"]
    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(ge=0)
    modalities: tuple[str, ...] = ("text",)
    prices: tuple[Price, ...] = Field(min_length=1)

    @field_validator("prices")
    @classmethod
    def _sorted(cls, prices: tuple[Price, ...]) -> tuple[Price, ...]:
        return tuple(sorted(prices, key=lambda p: p.effective_from))

    def price_at(self, when: datetime) -> Price:
        """The price in force at ``when`` (UTC); the earliest one for calls before it existed."""
        day = when.astimezone(UTC).date()
        current = self.prices[0]
        for price in self.prices:
            if price.effective_from <= day:
                current = price
        return current


def cost_of(
    model: ModelInfo, when: datetime, *, input_tokens: int, cached_input_tokens: int,
    output_tokens: int,
) -> Decimal:
    """USD cost of one call. ``input_tokens`` includes the cached ones, as OpenAI reports it."""
    price = model.price_at(when)
    uncached = max(input_tokens - cached_input_tokens, 0)
    total = (
        uncached * price.input
        + cached_input_tokens * price.cached_input
        + output_tokens * price.output
    )
    return total / MILLION


class Catalog:
    def __init__(self, models: dict[str, ModelInfo]):
        self.models = models

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def get(self, name: str) -> ModelInfo:
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(
                f"unknown model {name!r}; the catalog has: {', '.join(sorted(self.models))}"
            ) from None


def load_catalog(path: Path) -> Catalog:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read the model catalog {path}: {exc}") from exc
    models: dict[str, ModelInfo] = {}
    for name, entry in raw.get("models", {}).items():
        try:
            models[name] = ModelInfo(name=name, **entry)
        except ValidationError as exc:
            raise ConfigurationError(f"model {name!r} in {path} is invalid: {exc}") from exc
    if not models:
        raise ConfigurationError(f"the model catalog {path} lists no [models.*] entries")
    return Catalog(models)


@lru_cache(maxsize=8)
def cached_catalog(path: Path) -> Catalog:
    return load_catalog(path)

"""Turning a provider's token counts into ledger rows: tokens, meters and cost in USD."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from broker.catalog import ModelInfo, cost_of

METER_INPUT = "debugger_tokens_input"
METER_OUTPUT = "debugger_tokens_output"
# A rough tokens-per-character ratio, used only when a provider reports no usage at all.
CHARS_PER_TOKEN = 4
IMAGE_TOKENS_ESTIMATE = 85


@dataclass(frozen=True)
class MeteredUsage:
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    estimated: bool

    @property
    def meters(self) -> dict[str, int]:
        return {METER_INPUT: self.input_tokens, METER_OUTPUT: self.output_tokens}

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": str(self.cost_usd),
            "estimated": self.estimated,
        }


def meter(
    model: ModelInfo,
    when: datetime,
    *,
    input_tokens: int,
    cached_input_tokens: int,
    output_tokens: int,
    estimated: bool = False,
) -> MeteredUsage:
    cached = min(cached_input_tokens, input_tokens)
    return MeteredUsage(
        input_tokens=input_tokens,
        cached_input_tokens=cached,
        output_tokens=output_tokens,
        cost_usd=cost_of(
            model, when, input_tokens=input_tokens, cached_input_tokens=cached,
            output_tokens=output_tokens,
        ),
        estimated=estimated,
    )


def estimate_input_tokens(request: dict[str, Any]) -> int:
    """Upper-leaning estimate of a request's input tokens from its size."""
    chars = 0
    images = 0
    if "messages" in request:
        for message in request.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "image_url":
                        images += 1
                    elif isinstance(part, dict):
                        chars += len(str(part.get("text") or ""))
            chars += 16
    else:
        chars = len(str(request.get("input") or ""))
    return math.ceil(chars / CHARS_PER_TOKEN) + images * IMAGE_TOKENS_ESTIMATE


def estimate_output_tokens(response: dict[str, Any]) -> int:
    chars = 0
    for choice in response.get("choices") or []:
        message = choice.get("message") or {}
        chars += len(str(message.get("content") or ""))
        chars += len(str(message.get("tool_calls") or ""))
    return math.ceil(chars / CHARS_PER_TOKEN)

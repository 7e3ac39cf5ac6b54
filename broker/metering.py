"""Turning a provider's token counts into ledger rows: tokens, meters and cost in USD."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from broker.catalog import ModelInfo, cost_of

METER_INPUT = "debugger_tokens_input"
METER_OUTPUT = "debugger_tokens_output"
# A rough tokens-per-character ratio, used only when a provider reports no usage at all.
CHARS_PER_TOKEN = 4
IMAGE_TOKENS_ESTIMATE = 85
# The ledger keeps ten decimal places (models.Money); every cost is rounded to them once, here.
COST_QUANTUM_USD = Decimal("1e-10")
# Upper bounds for the spend reservation. Byte-level BPE tokenizers never emit more tokens
# than the text has UTF-8 bytes, so bytes bound text tokens; no provider bills one image
# above this many tokens (Anthropic's largest image is about 1,600).
IMAGE_TOKENS_BOUND = 1600
# A price change may land while a call is in flight: bound with the dearer of now and later.
PRICE_LOOKAHEAD = timedelta(days=1)


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
            "cost_usd": money(self.cost_usd),
            "estimated": self.estimated,
        }


def money(amount_usd: Decimal) -> str:
    """A decimal string with at least two and at most ten decimal places."""
    text = format(amount_usd.quantize(COST_QUANTUM_USD, ROUND_HALF_UP), "f")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"


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
        ).quantize(COST_QUANTUM_USD, ROUND_HALF_UP),
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


def estimate_usage(
    model: ModelInfo, when: datetime, request: dict[str, Any], response: dict[str, Any]
) -> MeteredUsage:
    """Usage of a reply that reported none: a flagged estimate, never zero tokens.

    Each side is held to the reservation's bound, so an estimate never outgrows what the
    spend cap admitted.
    """
    input_tokens = min(estimate_input_tokens(request), input_token_bound(request))
    output_tokens = estimate_output_tokens(response)
    if model.kind == "embedding":
        output_tokens = 0
    output_tokens = min(output_tokens, output_token_bound(model, request))
    return meter(model, when, input_tokens=max(input_tokens, 1), cached_input_tokens=0,
                 output_tokens=output_tokens, estimated=True)


def input_token_bound(request: dict[str, Any]) -> int:
    """Most input tokens a request can be billed: its JSON bytes, images at the image bound."""
    return max(_json_bytes(request), 1)


def _json_bytes(value: Any) -> int:
    if isinstance(value, dict):
        if value.get("type") == "image_url":
            return IMAGE_TOKENS_BOUND
        return 2 + sum(len(str(k).encode()) + 4 + _json_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return 2 + sum(_json_bytes(item) + 1 for item in value)
    if isinstance(value, str):
        return len(value.encode()) + 2
    return len(str(value))


def output_token_bound(model: ModelInfo, request: dict[str, Any]) -> int:
    """Most output tokens: ``n`` choices of ``max_completion_tokens``/``max_tokens``, at most
    the model's own limit; the model's limit when the request names none."""
    if model.kind == "embedding":
        return 0
    limit = model.max_output_tokens
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limit = min(value, limit) if limit > 0 else value
            break
    choices = request.get("n")
    n = choices if isinstance(choices, int) and not isinstance(choices, bool) else 1
    return limit * max(n, 1)


def cost_bound(model: ModelInfo, when: datetime, request: dict[str, Any]) -> Decimal:
    """Upper bound of a call's cost in USD: the amount a hosted call reserves."""
    tokens = {"input_tokens": input_token_bound(request), "cached_input_tokens": 0,
              "output_tokens": output_token_bound(model, request)}
    return max(cost_of(model, when, **tokens), cost_of(model, when + PRICE_LOOKAHEAD, **tokens))

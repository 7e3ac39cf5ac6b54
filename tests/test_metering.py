"""Prices, costs and the reservation bounds, with exact expected amounts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.catalog import ModelInfo, load_catalog
from broker.metering import (
    cost_bound,
    estimate_usage,
    input_token_bound,
    meter,
    money,
    output_token_bound,
)
from workers.fake_upstream import prompt_tokens

CATALOG_TOML = """
[models."mid-month"]
provider = "openai"
kind = "chat"
context_window = 100000
max_output_tokens = 1000
prices = [
  { effective_from = 2026-03-16, input = "2.00", cached_input = "0.50", output = "8.00" },
  { effective_from = 2026-03-01, input = "1.00", cached_input = "0.25", output = "4.00" },
]

[models."embed"]
provider = "openai"
kind = "embedding"
context_window = 8191
max_output_tokens = 0
prices = [{ effective_from = 2024-01-01, input = "0.13", cached_input = "0.13", output = "0" }]
"""
BEFORE_CHANGE = datetime(2026, 3, 15, 23, 59, 59, 999999, tzinfo=UTC)
AT_CHANGE = datetime(2026, 3, 16, tzinfo=UTC)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelInfo]:
    path: Path = tmp_path_factory.mktemp("catalog") / "catalog.toml"
    path.write_text(CATALOG_TOML)
    return load_catalog(path).models


def cost(model: ModelInfo, when: datetime) -> Decimal:
    return meter(model, when, input_tokens=1000, cached_input_tokens=400,
                 output_tokens=250).cost_usd


@pytest.mark.parametrize(("when", "expected"), [
    # 600 uncached, 400 cached, 250 output tokens.
    pytest.param(BEFORE_CHANGE, Decimal("0.0017"), id="last-instant-before-the-change"),
    pytest.param(AT_CHANGE, Decimal("0.0034"), id="first-instant-of-the-new-price"),
    pytest.param(datetime(2026, 3, 16, 1, 0, tzinfo=timezone(timedelta(hours=2))),
                 Decimal("0.0017"), id="16th-at-utc+2-is-still-the-15th-in-utc"),
    pytest.param(datetime(2026, 2, 1, tzinfo=UTC), Decimal("0.0017"),
                 id="before-any-price-the-earliest-applies"),
])
def test_a_price_change_mid_month_prices_each_call_at_the_price_of_its_moment(
    models, when, expected
):
    assert cost(models["mid-month"], when) == expected


def test_a_month_with_a_price_change_totals_each_call_at_its_own_price(models):
    model = models["mid-month"]
    calls = [datetime(2026, 3, day, 12, tzinfo=UTC) for day in (2, 15, 16, 31)]
    assert sum((cost(model, when) for when in calls), Decimal(0)) == Decimal("0.0102")


def test_cached_tokens_cost_the_cached_rate_and_never_more_than_the_input(models):
    model = models["mid-month"]
    usage = meter(model, AT_CHANGE, input_tokens=10, cached_input_tokens=25, output_tokens=0)
    assert usage.cached_input_tokens == 10
    assert usage.cost_usd == Decimal("0.000005")  # 10 tokens at $0.50/M


def test_embeddings_cost_their_input_only(models):
    usage = meter(models["embed"], AT_CHANGE, input_tokens=7, cached_input_tokens=0,
                  output_tokens=0)
    assert usage.cost_usd == Decimal("0.00000091")
    assert usage.meters == {"debugger_tokens_input": 7, "debugger_tokens_output": 0}
    assert usage.to_dict()["cost_usd"] == "0.00000091"


def test_costs_are_kept_to_ten_decimal_places(models):
    usage = meter(models["embed"], AT_CHANGE, input_tokens=1, cached_input_tokens=0,
                  output_tokens=0)
    assert usage.cost_usd == Decimal("0.00000013")
    assert usage.cost_usd.as_tuple().exponent == -10


@pytest.mark.parametrize(("amount", "text"), [
    pytest.param(Decimal(0), "0.00", id="zero"),
    pytest.param(Decimal("25.5"), "25.50", id="cents"),
    pytest.param(Decimal("1E-7"), "0.0000001", id="no-exponent"),
    pytest.param(Decimal("0.00000000004"), "0.00", id="below-the-ledger-precision"),
    pytest.param(Decimal("0.00000000005"), "0.0000000001", id="half-rounds-up"),
])
def test_money_is_plain_decimal_text(amount, text):
    assert money(amount) == text


def test_the_reservation_bound_takes_the_dearer_of_now_and_the_next_day(models):
    model = models["mid-month"]
    request = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100}
    bound_tokens = input_token_bound(request)
    # Before the change, a call still running at midnight would cost the new price.
    assert cost_bound(model, BEFORE_CHANGE, request) == (
        bound_tokens * Decimal("2.00") + 100 * Decimal("8.00")) / Decimal(1_000_000)


@pytest.mark.parametrize(("request_body", "expected"), [
    pytest.param({"max_tokens": 50}, 50, id="max_tokens"),
    pytest.param({"max_completion_tokens": 70, "max_tokens": 50}, 70,
                 id="max_completion_tokens-wins"),
    pytest.param({"max_tokens": 50, "n": 3}, 150, id="n-choices"),
    pytest.param({"max_tokens": 5000}, 1000, id="capped-by-the-model"),
    pytest.param({}, 1000, id="model-limit-when-absent"),
    pytest.param({"max_tokens": True}, 1000, id="a-boolean-is-not-a-limit"),
])
def test_output_bound(models, request_body, expected):
    assert output_token_bound(models["mid-month"], request_body) == expected


def test_embeddings_have_no_output_bound(models):
    assert output_token_bound(models["embed"], {"input": "x", "max_tokens": 9}) == 0


TEXT = st.text(st.characters(codec="utf-8"), max_size=300)


@given(texts=st.lists(TEXT, min_size=1, max_size=5), images=st.integers(0, 3))
def test_the_input_bound_is_never_below_what_the_upstream_bills(texts, images):
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * images
    messages = [{"role": "user", "content": text} for text in texts]
    messages.append({"role": "user", "content": [{"type": "text", "text": "see"}, *parts]})
    assert input_token_bound({"messages": messages}) >= prompt_tokens(messages)


def test_an_estimate_is_flagged_never_zero_and_within_the_bound(models):
    model = models["mid-month"]
    request = {"messages": [{"role": "user", "content": ""}], "max_tokens": 3}
    reply = {"choices": [{"message": {"content": "a long answer " * 20}}]}
    usage = estimate_usage(model, AT_CHANGE, request, reply)
    assert usage.estimated
    assert usage.input_tokens == 4  # the 16 characters of message overhead
    assert usage.output_tokens == 3  # held to max_tokens, which the provider enforced
    assert usage.cost_usd == (4 * Decimal(2) + 3 * Decimal(8)) / Decimal(1_000_000)

"""Request bodies of the job API. Field names are the HTTP contract in DESIGN.md."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

CUSTOM_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobSubmission(_Strict):
    capability: str
    request: dict[str, Any]
    run_id: str | None = Field(default=None, min_length=1, max_length=128)
    model_routing: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class BatchItem(_Strict):
    custom_id: str = Field(pattern=CUSTOM_ID_PATTERN)
    capability: str
    request: dict[str, Any]


class BatchSubmission(_Strict):
    items: list[BatchItem] = Field(min_length=1)
    run_id: str | None = Field(default=None, min_length=1, max_length=128)
    model_routing: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class OrgSettingsUpdate(_Strict):
    """Fields left out keep their stored value; ``spend_cap_usd: null`` removes the cap."""

    model_routing: dict[str, Any] | None = None
    spend_cap_usd: Decimal | None = Field(default=None, ge=0, max_digits=20, decimal_places=6)

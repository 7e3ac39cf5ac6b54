"""Metering: the acting org's usage ledger, and an org's hosted spend against its cap."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from broker.api.auth import CurrentPrincipal, Principal, State, check_org_path
from broker.api.responses import JSON
from broker.errors import NotFound
from broker.metering import money
from broker.spend import SpendSnapshot, next_period_start
from broker.usage import parse_query

router = APIRouter(tags=["usage"])
OrgPath = Annotated[str, Depends(check_org_path)]


@router.get("/v1/usage")
def usage(
    principal: CurrentPrincipal,
    state: State,
    start: str | None = None,
    end: str | None = None,
    group_by: Annotated[list[str] | None, Query()] = None,
) -> Any:
    query = parse_query(start, end, group_by)
    return JSON(state.usage.summarize(principal.org_id, query))


@router.get("/v1/orgs/{org}/spend")
def spend(org: OrgPath, principal: CurrentPrincipal, state: State) -> Any:
    _may_read(principal, org)
    return JSON(spend_view(state.spend.snapshot(org)))


def _may_read(principal: Principal, org: str) -> None:
    # The service key may read any org; any other principal only its own, and another org
    # looks absent rather than forbidden, so org ids cannot be probed.
    if not principal.is_service and principal.org_id != org:
        raise NotFound(f"no org {org!r} for this credential", param="org")


def spend_view(snap: SpendSnapshot) -> dict[str, Any]:
    remaining = snap.remaining_usd
    return {
        "object": "llm.org_spend",
        "org_id": snap.org_id,
        "period_start": snap.period_start.isoformat(),
        "period_end": next_period_start(snap.period_start).isoformat(),
        "cap_usd": money(snap.cap_usd) if snap.cap_usd is not None else None,
        "spent_usd": money(snap.spent_usd),
        "reserved_usd": money(snap.reserved_usd),
        "remaining_usd": money(remaining) if remaining is not None else None,
    }

"""Org administration (service key only) and the acting org's resolved routing table."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from broker.api.auth import AdminPrincipal, CurrentPrincipal, State, check_org_path
from broker.api.guards import NoRawCredentials
from broker.api.responses import JSON
from broker.schemas import OrgSettingsUpdate

router = APIRouter(tags=["orgs"])
OrgPath = Annotated[str, Depends(check_org_path)]


@router.get("/v1/orgs/{org}/settings")
def get_settings(org: OrgPath, _: AdminPrincipal, state: State) -> Any:
    return JSON(state.orgs.get_settings(org))


@router.put("/v1/orgs/{org}/settings")
def put_settings(
    _guard: NoRawCredentials, org: OrgPath, body: OrgSettingsUpdate, _: AdminPrincipal,
    state: State,
) -> Any:
    return JSON(state.orgs.put_settings(org, body))


@router.get("/v1/routing")
def routing(principal: CurrentPrincipal, state: State) -> Any:
    table = state.orgs.routing_table(principal.org_id)
    return JSON({
        "object": "llm.routing",
        "org_id": principal.org_id,
        "routes": {cap: route.to_dict() for cap, route in table.items()},
    })

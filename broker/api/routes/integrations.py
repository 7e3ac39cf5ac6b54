"""BYOK integrations of an org (service key only): the key goes in, never comes out."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from broker.api.auth import AdminPrincipal, State, check_org_path
from broker.api.responses import JSON
from broker.integrations import IntegrationCreate, IntegrationUpdate

router = APIRouter(prefix="/v1/orgs/{org}/integrations", tags=["integrations"])
OrgPath = Annotated[str, Depends(check_org_path)]


@router.post("", status_code=201)
def create(org: OrgPath, body: IntegrationCreate, _: AdminPrincipal, state: State) -> Any:
    return JSON(state.integrations.create(org, body), status_code=201)


@router.get("")
def list_all(org: OrgPath, _: AdminPrincipal, state: State) -> Any:
    return JSON(state.integrations.list_all(org))


@router.get("/{integration_id}")
def show(org: OrgPath, integration_id: str, _: AdminPrincipal, state: State) -> Any:
    return JSON(state.integrations.get(org, integration_id))


@router.put("/{integration_id}")
def update(
    org: OrgPath, integration_id: str, body: IntegrationUpdate, _: AdminPrincipal, state: State
) -> Any:
    return JSON(state.integrations.update(org, integration_id, body))


@router.delete("/{integration_id}")
def delete(org: OrgPath, integration_id: str, _: AdminPrincipal, state: State) -> Any:
    return JSON(state.integrations.delete(org, integration_id))

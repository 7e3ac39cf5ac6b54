"""Who is calling and for which org: FastAPI dependencies used by every protected route."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Header, Request

from broker.api.state import AppState
from broker.errors import InvalidRequest, PermissionDenied, Unauthenticated

ORG_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


@dataclass(frozen=True)
class Principal:
    org_id: str
    kind: Literal["service", "bff"]

    @property
    def is_service(self) -> bool:
        return self.kind == "service"


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.broker
    return state


def authenticate(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_molar_org_id: Annotated[str | None, Header()] = None,
) -> Principal:
    state = app_state(request)
    token = _bearer(authorization)
    expected = state.settings.service_key.get_secret_value().encode()
    if not hmac.compare_digest(token.encode(), expected):
        raise Unauthenticated("the bearer token is not a valid service key")
    if not x_molar_org_id:
        raise InvalidRequest(
            "X-Molar-Org-Id header is required with the service key: it names the acting org",
            param="X-Molar-Org-Id",
        )
    if not ORG_ID_PATTERN.match(x_molar_org_id):
        raise InvalidRequest(
            "X-Molar-Org-Id must be 1-128 characters of letters, digits, '_', '.', ':' or '-'",
            param="X-Molar-Org-Id",
        )
    return Principal(org_id=x_molar_org_id, kind="service")


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated(
            "missing Authorization header; send 'Authorization: Bearer <service key>'",
            code="missing_credentials",
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def require_admin(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    if not principal.is_service:
        raise PermissionDenied("this endpoint needs the service key")
    return principal


def check_org_path(org: str) -> str:
    if not ORG_ID_PATTERN.match(org):
        raise InvalidRequest("org in the path must be a valid org id", param="org")
    return org


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
State = Annotated[AppState, Depends(app_state)]

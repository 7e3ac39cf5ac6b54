"""Who is calling and for which org: FastAPI dependencies used by every protected route."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Annotated, Literal

import jwt
from fastapi import Depends, Header, Request

from broker.api.state import AppState
from broker.errors import InvalidRequest, PermissionDenied, Unauthenticated

ORG_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
BFF_AUDIENCE = "cartographer-bff"
BFF_ALGORITHMS = ["HS256"]


@dataclass(frozen=True)
class Principal:
    org_id: str
    kind: Literal["service", "bff"]

    @property
    def is_service(self) -> bool:
        return self.kind == "service"


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.broker
    return state


# The dependencies below are coroutines although they never await: FastAPI runs a plain
# function dependency on its thread pool, one hop per dependency per request.
async def app_state(request: Request) -> AppState:
    return state_of(request)


async def authenticate(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_molar_org_id: Annotated[str | None, Header()] = None,
) -> Principal:
    """The service key (constant-time compare) with X-Molar-Org-Id, or a BFF JWT."""
    state = state_of(request)
    token = _bearer(authorization)
    expected = state.settings.service_key.get_secret_value().encode()
    if hmac.compare_digest(token.encode(), expected):
        return Principal(org_id=_header_org(x_molar_org_id), kind="service")
    if token.count(".") == 2:
        return _bff_principal(token, state.settings.bff_jwt_secret.get_secret_value())
    raise Unauthenticated("the bearer token is neither the service key nor a BFF JWT")


def _header_org(x_molar_org_id: str | None) -> str:
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
    return x_molar_org_id


def _bff_principal(token: str, secret: str) -> Principal:
    """A BFF JWT acts for the org in its ``org_id`` claim; X-Molar-Org-Id cannot widen it."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=BFF_ALGORITHMS, audience=BFF_AUDIENCE,
            options={"require": ["exp", "aud", "org_id"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("the BFF JWT has expired; get a fresh one",
                              code="token_expired") from None
    except jwt.InvalidAudienceError:
        raise Unauthenticated(f"the BFF JWT's aud must be {BFF_AUDIENCE!r}",
                              code="invalid_token") from None
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthenticated(f"the BFF JWT lacks the {exc.claim!r} claim",
                              code="invalid_token") from None
    except jwt.InvalidTokenError as exc:
        raise Unauthenticated(f"the BFF JWT is not valid ({type(exc).__name__}); it must be "
                              "HS256-signed with BFF_JWT_SECRET", code="invalid_token") from None
    org_id = claims.get("org_id")
    if not isinstance(org_id, str) or not ORG_ID_PATTERN.match(org_id):
        raise Unauthenticated("the BFF JWT's org_id claim must be a valid org id",
                              code="invalid_token")
    return Principal(org_id=org_id, kind="bff")


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated(
            "missing Authorization header; send 'Authorization: Bearer <service key or BFF "
            "JWT>'",
            code="missing_credentials",
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    return token.strip()


async def require_admin(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    if not principal.is_service:
        raise PermissionDenied("this endpoint needs the service key")
    return principal


async def check_org_path(org: str) -> str:
    if not ORG_ID_PATTERN.match(org):
        raise InvalidRequest("org in the path must be a valid org id", param="org")
    return org


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
State = Annotated[AppState, Depends(app_state)]

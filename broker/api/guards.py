"""Request guards that run before authentication: raw provider credentials are refused."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from broker.api.auth import state_of
from broker.raw_credentials import check_submission


async def reject_raw_credentials(request: Request) -> None:
    """SEC-05: 400 ``raw_credentials_rejected`` naming where a provider key was found.

    It runs before authentication, so a caller who sends a provider key as its bearer token
    learns what to do instead of only that the token is wrong.
    """
    body = await request.body()
    try:
        # FastAPI has parsed the body already and Starlette caches it: no second parse.
        payload = await request.json() if body else None
    except ValueError:
        return  # the body validation answers with invalid_json
    our_token = state_of(request).settings.service_key.get_secret_value()
    check_submission(payload, request.headers, our_token, raw=body)


NoRawCredentials = Annotated[None, Depends(reject_raw_credentials)]

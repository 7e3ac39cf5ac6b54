"""Checks on the OpenAI request body inside a job, beyond what the schemas express."""

from __future__ import annotations

from typing import Any

import orjson

from broker.capabilities import EMBEDDING_CAPABILITIES, is_capability, unknown_capability_message
from broker.errors import InvalidRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def check_capability(capability: str, *, param: str) -> None:
    if not is_capability(capability):
        raise InvalidRequest(unknown_capability_message(capability), param=param)


def check_request(capability: str, request: dict[str, Any], *, param: str) -> None:
    """Refuse a request the capability's provider call could never accept."""
    if capability in EMBEDDING_CAPABILITIES:
        _check_embeddings(request, param)
    else:
        _check_chat(request, param)
    check_storable(request, param=param)


def check_storable(value: object, *, param: str) -> None:
    """Refuse JSON the database cannot hold: the JSON columns are written with orjson."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise InvalidRequest(
            f"{param} holds a value that cannot be stored ({exc}); integers must fit in 64 "
            "bits and strings must be valid Unicode",
            param=param,
        ) from None


def check_text(value: str | None, *, param: str) -> None:
    """Refuse text a SQL text column cannot hold (PostgreSQL refuses NUL bytes)."""
    if value is not None and ("\x00" in value or not _is_unicode(value)):
        raise InvalidRequest(
            f"{param} must be valid Unicode text without NUL characters", param=param
        )


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _check_chat(request: dict[str, Any], param: str) -> None:
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            f"{param}.messages is required: a non-empty list of chat messages "
            '(e.g. [{"role": "user", "content": "..."}])',
            param=f"{param}.messages",
        )
    for index, message in enumerate(messages):
        where = f"{param}.messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object with role and content", param=where)
        if message.get("role") not in ROLES:
            raise InvalidRequest(
                f"{where}.role must be one of {', '.join(sorted(ROLES))}; "
                f"got {message.get('role')!r}",
                param=f"{where}.role",
            )


def _check_embeddings(request: dict[str, Any], param: str) -> None:
    value = request.get("input")
    if isinstance(value, str) and value:
        return
    if isinstance(value, list) and value:
        return
    raise InvalidRequest(
        f"{param}.input is required for the embeddings capability: a string, a list of "
        "strings, or token arrays",
        param=f"{param}.input",
    )

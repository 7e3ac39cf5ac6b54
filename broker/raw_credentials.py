"""SEC-05: a submission carries integration ids, never a provider key.

:func:`find_raw_credential` walks a submission and its headers and names the first place a
credential shows up: a key-like field name anywhere in the body, a provider auth header, an
``Authorization`` that holds a provider key instead of ours, or a provider-key-shaped string
in a routing field. Prompts themselves may mention keys and are not scanned for key shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from broker.errors import RawCredentialsRejected

# Field names that hold a credential, compared lower-cased with '-' read as '_'.
KEY_FIELD_NAMES = frozenset({
    "api_key", "apikey", "x_api_key", "openai_api_key", "anthropic_api_key",
    "provider_api_key", "secret_key", "access_token", "auth_token", "bearer_token",
    "authorization", "client_secret",
})
# Headers provider SDKs authenticate with; ours is Authorization with our own token.
PROVIDER_AUTH_HEADERS = ("x-api-key", "api-key", "x-goog-api-key", "anthropic-api-key")
# Shapes of provider keys: OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), Google, Groq, xAI.
KEY_SHAPE = re.compile(
    r"(?<![A-Za-z0-9])(sk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}|AIza[0-9A-Za-z_-]{30,}"
    r"|gsk_[A-Za-z0-9]{20,}|xai-[A-Za-z0-9]{20,})"
)
ROUTING_FIELDS = ("model_routing",)
MAX_DEPTH = 64


def looks_like_provider_key(value: str) -> bool:
    return KEY_SHAPE.search(value) is not None


def check_submission(body: Any, headers: Mapping[str, str], our_token: str | None) -> None:
    """Raise :class:`RawCredentialsRejected` naming where a raw credential was found."""
    where = _in_headers(headers, our_token) or _in_body(body)
    if where is None:
        return
    place, param = where
    raise RawCredentialsRejected(
        f"a raw provider credential was found in {place}; the broker never accepts provider "
        "keys with a submission. Store the key once with POST /v1/orgs/{org}/integrations "
        "and route with its id ('byok-...') or 'molar-managed'",
        param=param,
    )


def _in_headers(headers: Mapping[str, str], our_token: str | None) -> tuple[str, str] | None:
    for name in PROVIDER_AUTH_HEADERS:
        if headers.get(name):
            return f"the {name} header", name
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    token = token.strip() or scheme
    if token and token != our_token and looks_like_provider_key(token):
        return "the Authorization header (it holds a provider key, not ours)", "Authorization"
    return None


def _in_body(body: Any) -> tuple[str, str] | None:
    if not isinstance(body, Mapping):
        return None
    found = _key_field(body, "", 0)
    if found is not None:
        return f"field {found}", found
    for name in ROUTING_FIELDS:
        shaped = _key_shaped(body.get(name), name, 0)
        if shaped is not None:
            return f"{shaped} (a provider key where an integration id belongs)", shaped
    return None


def _key_field(value: Any, path: str, depth: int) -> str | None:
    """The path of the first field whose name says credential and whose value is a string."""
    if depth > MAX_DEPTH:
        return None
    for key, child, child_path in _children(value, path):
        if (isinstance(key, str) and isinstance(child, str) and child
                and key.lower().replace("-", "_") in KEY_FIELD_NAMES):
            return child_path
        found = _key_field(child, child_path, depth + 1)
        if found is not None:
            return found
    return None


def _key_shaped(value: Any, path: str, depth: int) -> str | None:
    if isinstance(value, str):
        return path if looks_like_provider_key(value) else None
    if depth > MAX_DEPTH:
        return None
    for _, child, child_path in _children(value, path):
        found = _key_shaped(child, child_path, depth + 1)
        if found is not None:
            return found
    return None


def _children(value: Any, path: str) -> list[tuple[object, Any, str]]:
    if isinstance(value, Mapping):
        return [(k, v, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
    if isinstance(value, list):
        return [(i, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return []

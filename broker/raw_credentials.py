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


def check_submission(
    body: Any, headers: Mapping[str, str], our_token: str | None, *, raw: bytes | None = None
) -> None:
    """Raise :class:`RawCredentialsRejected` naming where a raw credential was found.

    ``raw`` is the undecoded body: when given, the field walk runs only if a credential-like
    name could be in it at all, which keeps a 50,000-item batch cheap.
    """
    where = _in_headers(headers, our_token) or _in_body(body, raw)
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


def _in_body(body: Any, raw: bytes | None) -> tuple[str, str] | None:
    if not isinstance(body, Mapping):
        return None
    if raw is None or _may_name_a_key(raw):
        parts = _key_field(body, 0)
        if parts is not None:
            path = _path(parts)
            return f"field {path}", path
    for name in ROUTING_FIELDS:
        parts = _key_shaped(body.get(name), 0)
        if parts is not None:
            path = _path([name, *parts])
            return f"{path} (a provider key where an integration id belongs)", path
    return None


def _may_name_a_key(raw: bytes) -> bool:
    # A JSON escape could spell a name in pieces, so any escape means a full walk.
    lowered = raw.lower()
    return b"\\u" in lowered or any(name in lowered for name in _RAW_NAMES)


_RAW_NAMES = tuple(
    {n.encode() for n in KEY_FIELD_NAMES} | {n.replace("_", "-").encode() for n in KEY_FIELD_NAMES}
)
Parts = list[str | int]


def _key_field(value: Any, depth: int) -> Parts | None:
    """The path of the first field whose name says credential and whose value is a string."""
    if depth > MAX_DEPTH:
        return None
    if isinstance(value, Mapping):
        for key, child in value.items():
            if isinstance(child, str):
                if child and str(key).lower().replace("-", "_") in KEY_FIELD_NAMES:
                    return [str(key)]
            elif isinstance(child, Mapping | list):
                found = _key_field(child, depth + 1)
                if found is not None:
                    return [str(key), *found]
    elif isinstance(value, list):
        for index, child in enumerate(value):
            if isinstance(child, Mapping | list):
                found = _key_field(child, depth + 1)
                if found is not None:
                    return [index, *found]
    return None


def _key_shaped(value: Any, depth: int) -> Parts | None:
    if isinstance(value, str):
        return [] if looks_like_provider_key(value) else None
    if depth > MAX_DEPTH:
        return None
    children: list[tuple[str | int, Any]] = []
    if isinstance(value, Mapping):
        children = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        children = list(enumerate(value))
    for step, child in children:
        found = _key_shaped(child, depth + 1)
        if found is not None:
            return [step, *found]
    return None


def _path(parts: Parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text

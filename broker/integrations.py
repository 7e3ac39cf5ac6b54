"""The integration store: BYOK credentials an org keeps on the server, encrypted at rest.

The API writes and lists integrations (the key goes in, only a hint of it comes out); the
workers look a key up and decrypt it at call time; ``molar-llm rotate-keys`` re-encrypts
them all under the newest encryption key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from broker.crypto import CredentialCipher
from broker.db import as_utc, make_engine, make_sessionmaker, transaction, utcnow
from broker.errors import Conflict, InvalidRequest, NotFound
from broker.models import Integration
from broker.redaction import LIVE_SECRETS, MIN_SECRET_LENGTH
from broker.routing import BYOK_PATTERN, MANAGED_INTEGRATION
from broker.settings import Settings

log = logging.getLogger(__name__)

Provider = Literal["openai", "anthropic", "openai_compatible"]
PROVIDERS: tuple[str, ...] = ("openai", "anthropic", "openai_compatible")
# A stored integration without a base URL talks to the provider's public API.
PUBLIC_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
}
MAX_KEY_CHARS = 4096
HINT_CHARS = 4


class IntegrationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    provider: str
    base_url: str | None = None
    api_key: str


class IntegrationUpdate(BaseModel):
    """Fields left out keep their stored value; ``base_url: null`` returns to the public URL."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = None
    base_url: str | None = None


@dataclass(frozen=True)
class StoredCredential:
    """A decrypted credential as a worker needs it. ``repr`` never shows the key."""

    integration_id: str
    provider: str
    base_url: str
    api_key: str = field(repr=False)


class IntegrationService:
    def __init__(self, sessions: sessionmaker[Session], cipher: CredentialCipher):
        self._sessions = sessions
        self._cipher = cipher

    def create(self, org_id: str, body: IntegrationCreate) -> dict[str, Any]:
        check_integration_id(body.id)
        provider = check_provider(body.provider)
        base_url = check_base_url(body.base_url, provider)
        api_key = check_api_key(body.api_key)
        now = utcnow()
        row = Integration(
            org_id=org_id, id=body.id, provider=provider, base_url=base_url,
            key_ciphertext=self._cipher.encrypt(api_key), key_hint=api_key[-HINT_CHARS:],
            created_at=now, updated_at=now,
        )
        try:
            with transaction(self._sessions) as session:
                session.add(row)
        except IntegrityError:
            raise Conflict(
                f"integration {body.id!r} already exists in this org; change it with "
                f"PUT /v1/orgs/{org_id}/integrations/{body.id} or delete it first",
                param="id", code="integration_exists",
            ) from None
        log.info("integration %s stored org=%s provider=%s", body.id, org_id, provider)
        return integration_view(row)

    def list_all(self, org_id: str) -> dict[str, Any]:
        with self._sessions() as session:
            rows = session.scalars(
                select(Integration).where(Integration.org_id == org_id).order_by(Integration.id)
            ).all()
        return {"object": "list", "data": [integration_view(row) for row in rows]}

    def get(self, org_id: str, integration_id: str) -> dict[str, Any]:
        with self._sessions() as session:
            return integration_view(_own(session, org_id, integration_id))

    def update(self, org_id: str, integration_id: str, body: IntegrationUpdate) -> dict[str, Any]:
        fields = body.model_fields_set
        if not fields:
            raise InvalidRequest(
                "nothing to change: send api_key to rotate the key, base_url to move it",
                param="body",
            )
        api_key = check_api_key(body.api_key) if "api_key" in fields else None
        with transaction(self._sessions) as session:
            row = _own(session, org_id, integration_id, for_update=True)
            if "base_url" in fields:
                row.base_url = check_base_url(body.base_url, row.provider)
            if api_key is not None:
                row.key_ciphertext = self._cipher.encrypt(api_key)
                row.key_hint = api_key[-HINT_CHARS:]
            row.updated_at = utcnow()
        log.info("integration %s updated org=%s fields=%s", integration_id, org_id,
                 ",".join(sorted(fields)))
        return integration_view(row)

    def delete(self, org_id: str, integration_id: str) -> dict[str, Any]:
        with transaction(self._sessions) as session:
            session.delete(_own(session, org_id, integration_id, for_update=True))
        log.info("integration %s deleted org=%s", integration_id, org_id)
        return {"id": integration_id, "object": "llm.integration.deleted", "deleted": True}

    def lookup(self, org_id: str, integration_id: str) -> StoredCredential | None:
        """The decrypted credential, or None when the org has no such integration."""
        with self._sessions() as session:
            row = session.get(Integration, (org_id, integration_id))
        if row is None:
            return None
        api_key = self._cipher.decrypt(
            row.key_ciphertext, what=f"integration {integration_id!r} of org {org_id!r}"
        )
        # From here on the logging filter and the job error redaction know this key.
        LIVE_SECRETS.add(api_key)
        base_url = row.base_url or PUBLIC_BASE_URLS[row.provider]
        return StoredCredential(integration_id, row.provider, base_url, api_key)

    def rotate_all(self) -> int:
        """Re-encrypt every stored key under the newest encryption key, in one transaction."""
        with transaction(self._sessions) as session:
            rows = session.scalars(select(Integration).with_for_update()).all()
            for row in rows:
                row.key_ciphertext = self._cipher.rotate(
                    row.key_ciphertext, what=f"integration {row.id!r} of org {row.org_id!r}"
                )
        log.info("re-encrypted %d stored credential(s) under the newest key", len(rows))
        return len(rows)


def _own(
    session: Session, org_id: str, integration_id: str, *, for_update: bool = False
) -> Integration:
    row = session.get(Integration, (org_id, integration_id), with_for_update=for_update)
    if row is None:
        raise NotFound(
            f"no integration {integration_id!r} in this org; list them with "
            f"GET /v1/orgs/{org_id}/integrations",
            param="integration_id", code="integration_not_found",
        )
    return row


def integration_view(row: Integration) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "llm.integration",
        "org_id": row.org_id,
        "provider": row.provider,
        "base_url": row.base_url or PUBLIC_BASE_URLS.get(row.provider),
        "key_hint": f"...{row.key_hint}",
        "created_at": as_utc(row.created_at).isoformat(),  # type: ignore[union-attr]
        "updated_at": as_utc(row.updated_at).isoformat(),  # type: ignore[union-attr]
    }


def check_integration_id(value: str) -> None:
    if value == MANAGED_INTEGRATION:
        raise InvalidRequest(
            f"id {MANAGED_INTEGRATION!r} is reserved for the platform's keys; store your own "
            "key under an id starting with 'byok-', e.g. 'byok-openai-prod'",
            param="id", code="integration_id_reserved",
        )
    if not BYOK_PATTERN.match(value):
        raise InvalidRequest(
            "id must start with 'byok-' followed by 1-64 letters, digits, '_', '.' or '-' "
            "(e.g. 'byok-openai-prod')",
            param="id",
        )


def check_provider(value: str) -> str:
    if value not in PROVIDERS:
        raise InvalidRequest(
            f"provider {value[:40]!r} is not supported; expected one of: {', '.join(PROVIDERS)}",
            param="provider",
        )
    return value


def check_base_url(value: str | None, provider: str) -> str | None:
    if value is None:
        if provider == "openai_compatible":
            raise InvalidRequest(
                "base_url is required for provider 'openai_compatible': give the server's "
                "OpenAI-style root, e.g. 'http://litellm.internal:4000/v1'",
                param="base_url",
            )
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(value) > 2048:
        raise InvalidRequest(
            "base_url must be an http(s) URL with a host, at most 2048 characters, "
            "e.g. 'https://api.openai.com/v1'",
            param="base_url",
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise InvalidRequest(
            "base_url must not carry credentials, a query or a fragment; put the key in "
            "api_key, which is stored encrypted",
            param="base_url", code="raw_credentials_rejected",
        )
    return value.rstrip("/")


def check_api_key(value: str | None) -> str:
    if value is None or not MIN_SECRET_LENGTH <= len(value) <= MAX_KEY_CHARS:
        raise InvalidRequest(
            f"api_key must be the provider key, {MIN_SECRET_LENGTH}-{MAX_KEY_CHARS} characters",
            param="api_key",
        )
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise InvalidRequest(
            "api_key must not contain spaces or control characters; paste the key alone, "
            "without 'Bearer ' or a trailing newline",
            param="api_key",
        )
    LIVE_SECRETS.add(value)
    return value


def rotate_stored_keys(settings: Settings) -> int:
    """``molar-llm rotate-keys``: every stored key re-encrypted under the newest key."""
    from broker.migrate import ensure_embedded_schema

    ensure_embedded_schema(settings)
    engine = make_engine(settings.resolved_database_url, pool_size=1, max_overflow=0)
    try:
        cipher = CredentialCipher(settings.encryption_keys.get_secret_value())
        return IntegrationService(make_sessionmaker(engine), cipher).rotate_all()
    finally:
        engine.dispose()

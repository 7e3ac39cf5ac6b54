"""Idempotent submission: a resubmitted job or batch with the same ``Idempotency-Key`` is a no-op.

The key row is written first, in the same transaction as the job rows, under a unique
constraint on ``(org_id, key)``: of concurrent identical submissions one commits and the others
fail on the constraint, roll back everything they wrote, and answer with the winner's resource.
Same key and same body -> the original (200); same key, different body -> 409. Keys live at
least ``MOLAR_LLM_IDEMPOTENCY_TTL_S`` (24 hours); the scheduler deletes expired ones.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from broker.db import as_utc, transaction, utcnow
from broker.errors import Conflict, InvalidRequest
from broker.models import IdempotencyKey

log = logging.getLogger(__name__)
HEADER = "Idempotency-Key"
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")

#: Called inside the submission's transaction with the id of what it creates.
Recorder = Callable[[Session, str], None]


@dataclass(frozen=True)
class IdempotencyClaim:
    org_id: str
    key: str
    kind: str
    body_sha256: str


def make_claim(org_id: str, key: str, kind: str, body: BaseModel) -> IdempotencyClaim:
    if not KEY_PATTERN.match(key):
        raise InvalidRequest(
            f"{HEADER} must be 1-255 printable ASCII characters without spaces "
            "(a UUID works well)",
            param=HEADER,
        )
    canonical = orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(kind.encode() + b"\0" + canonical).hexdigest()
    return IdempotencyClaim(org_id, key, kind, digest)


class IdempotentSubmissions:
    """Wraps a create call so that a key makes it happen at most once per org."""

    def __init__(self, sessions: sessionmaker[Session], *, ttl_s: int):
        self._sessions = sessions
        self._ttl = timedelta(seconds=ttl_s)

    def submit(
        self,
        claim: IdempotencyClaim,
        create: Callable[[Recorder], dict[str, Any]],
        read: Callable[[str], dict[str, Any]],
    ) -> tuple[dict[str, Any], int]:
        """``(view, 202)`` when created now, ``(original view, 200)`` for a repeat."""
        existing = self._existing(claim)
        if existing is not None:
            return read(existing), 200
        try:
            return create(lambda session, resource_id: self._record(session, claim,
                                                                    resource_id)), 202
        except IntegrityError:
            existing = self._existing(claim)
            if existing is None:
                raise
            log.info("idempotent %s replayed org=%s %s=%s", claim.kind, claim.org_id,
                     claim.kind, existing)
            return read(existing), 200

    def _record(self, session: Session, claim: IdempotencyClaim, resource_id: str) -> None:
        now = utcnow()
        session.add(IdempotencyKey(
            org_id=claim.org_id, key=claim.key, kind=claim.kind,
            body_sha256=claim.body_sha256, resource_id=resource_id, created_at=now,
            expires_at=now + self._ttl,
        ))
        # Hit the unique constraint now, before any job row is written.
        session.flush()

    def _existing(self, claim: IdempotencyClaim) -> str | None:
        """The resource id a live key points at; 409 when the key was used for another body."""
        with self._sessions() as session:
            row = session.scalars(
                select(IdempotencyKey).where(IdempotencyKey.org_id == claim.org_id,
                                             IdempotencyKey.key == claim.key)
            ).one_or_none()
        if row is None:
            return None
        expires_at = as_utc(row.expires_at)
        if expires_at is not None and expires_at < utcnow():
            with transaction(self._sessions) as session:
                session.execute(delete(IdempotencyKey).where(IdempotencyKey.id == row.id))
            return None
        if row.kind != claim.kind or row.body_sha256 != claim.body_sha256:
            raise Conflict(
                f"{HEADER} {claim.key!r} was already used with a different request body "
                f"(for {row.kind} {row.resource_id}); use a new key for a new submission",
                param=HEADER, code="idempotency_key_reused",
            )
        return row.resource_id

"""Org settings (stored routing and spend cap) and the resolved routing table of an org."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, sessionmaker

from broker.capabilities import CAPABILITIES
from broker.db import as_utc, transaction, utcnow
from broker.models import OrgSettings
from broker.routing import Deployment, Route, resolve_routes, validate_routing
from broker.schemas import OrgSettingsUpdate


class OrgService:
    def __init__(self, sessions: sessionmaker[Session], deployment: Deployment):
        self._sessions = sessions
        self._deployment = deployment

    def stored_routing(self, session: Session, org_id: str) -> dict[str, dict[str, str]]:
        routing = session.connection().execute(_READ_ROUTING, {"b_org_id": org_id}).scalar()
        return dict(routing or {})

    def get_settings(self, org_id: str) -> dict[str, Any]:
        with self._sessions() as session:
            row = session.get(OrgSettings, org_id)
        return settings_view(org_id, row)

    def put_settings(self, org_id: str, update: OrgSettingsUpdate) -> dict[str, Any]:
        fields = update.model_fields_set
        routing = None
        if "model_routing" in fields:
            routing = validate_routing(
                update.model_routing, self._deployment.catalog, param="model_routing"
            )
        with transaction(self._sessions) as session:
            row = session.get(OrgSettings, org_id, with_for_update=True)
            if row is None:
                row = OrgSettings(org_id=org_id, model_routing={}, spend_cap_usd=None)
                session.add(row)
            if routing is not None:
                row.model_routing = routing
            if "spend_cap_usd" in fields:
                row.spend_cap_usd = update.spend_cap_usd
            row.updated_at = utcnow()
        return settings_view(org_id, row)

    def routing_table(
        self, org_id: str, submission_routing: dict[str, dict[str, str]] | None = None
    ) -> dict[str, Route]:
        with self._sessions() as session:
            org_routing = self.stored_routing(session, org_id)
        return resolve_routes(
            CAPABILITIES, catalog=self._deployment.catalog, defaults=self._deployment.defaults,
            org_routing=org_routing, submission_routing=submission_routing,
        )


def settings_view(org_id: str, row: OrgSettings | None) -> dict[str, Any]:
    cap: Decimal | None = row.spend_cap_usd if row else None
    updated_at = as_utc(row.updated_at) if row else None
    return {
        "object": "llm.org_settings",
        "org_id": org_id,
        "model_routing": dict(row.model_routing or {}) if row else {},
        "spend_cap_usd": str(cap) if cap is not None else None,
        "updated_at": updated_at.isoformat() if updated_at else None,
    }


# Read on every submission: built once, run on the connection (no ORM statement handling).
_READ_ROUTING = select(OrgSettings.model_routing).where(
    OrgSettings.org_id == bindparam("b_org_id"))

"""Resolve a route's integration id to a credential, on the worker, at call time.

``molar-managed`` uses the platform's key for the route's provider from the deployment's
environment. Stored ``byok-*`` credentials are looked up through ``byok_lookup``, the seam
the integration store plugs into (:func:`store_lookup`); their provider and base URL are the
integration's, not the model catalog's.
"""

from __future__ import annotations

from collections.abc import Callable

from broker.crypto import UndecryptableCredential
from broker.integrations import IntegrationService
from broker.redaction import LIVE_SECRETS
from broker.routing import MANAGED_INTEGRATION
from broker.settings import Settings
from workers.errors import PermanentProviderError
from workers.providers.base import Credential

ByokLookup = Callable[[str, str], Credential | None]


class IntegrationNotFound(PermanentProviderError):
    def __init__(self, integration_id: str):
        super().__init__(
            f"integration {integration_id!r} does not exist for this org; store it with "
            "POST /v1/orgs/{org}/integrations or route the capability elsewhere",
            code="integration_not_found",
        )


class CredentialResolver:
    def __init__(self, settings: Settings, byok_lookup: ByokLookup | None = None):
        self._settings = settings
        self._byok_lookup = byok_lookup

    def resolve(self, org_id: str, integration_id: str, provider: str) -> Credential:
        if integration_id == MANAGED_INTEGRATION:
            api_key, base_url = self._settings.managed_credential(provider)
            if not api_key:
                raise PermanentProviderError(
                    f"no platform key is configured for provider {provider!r}; set "
                    f"MOLAR_LLM_MANAGED_{provider.upper()}_API_KEY on the workers",
                    code="managed_key_missing",
                )
            return Credential(integration_id, provider, base_url, api_key)
        credential = self._byok_lookup(org_id, integration_id) if self._byok_lookup else None
        if credential is None:
            raise IntegrationNotFound(integration_id)
        return credential

    def live_secrets(self) -> list[str]:
        """Secrets the redaction step must know about besides the one used in a call."""
        return [
            *LIVE_SECRETS.snapshot(),
            *[
                self._settings.managed_credential(p)[0]
                for p in ("openai", "anthropic", "openai_compatible")
            ],
        ]


def store_lookup(store: IntegrationService) -> ByokLookup:
    """The ``byok_lookup`` backed by the integration store: decrypts at call time."""

    def lookup(org_id: str, integration_id: str) -> Credential | None:
        try:
            stored = store.lookup(org_id, integration_id)
        except UndecryptableCredential as exc:
            raise PermanentProviderError(exc.message, code="credential_undecryptable") from None
        if stored is None:
            return None
        return Credential(stored.integration_id, stored.provider, stored.base_url,
                          stored.api_key)

    return lookup

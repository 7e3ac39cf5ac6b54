"""Route resolution: which integration and model serve a capability for an org.

Precedence, first match wins: the submission's ``model_routing``, the org's stored
settings, the deployment defaults file. This module is plain Python with no I/O beyond
reading the deployment files, so other services can import :func:`resolve_routes`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from broker.capabilities import CAPABILITIES, EMBEDDING_CAPABILITIES, unknown_capability_message
from broker.catalog import Catalog, cached_catalog
from broker.errors import ConfigurationError, InvalidRequest

MANAGED_INTEGRATION = "molar-managed"
BYOK_PATTERN = re.compile(r"^byok-[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
Source = Literal["submission", "org", "default"]


@dataclass(frozen=True)
class Route:
    capability: str
    provider_integration_id: str
    model: str
    provider: str
    source: Source

    @property
    def billing_kind(self) -> str:
        return "hosted" if self.provider_integration_id == MANAGED_INTEGRATION else "byok"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def is_integration_id(value: object) -> bool:
    return isinstance(value, str) and (
        value == MANAGED_INTEGRATION or BYOK_PATTERN.match(value) is not None
    )


def validate_routing(routing: object, catalog: Catalog, *, param: str) -> dict[str, dict[str, str]]:
    """Check a ``model_routing`` mapping and return it normalised; errors name the field."""
    if routing is None:
        return {}
    if not isinstance(routing, Mapping):
        raise InvalidRequest(
            f"{param} must be an object mapping capability keys to "
            '{"provider_integration_id", "model"}',
            param=param,
        )
    clean: dict[str, dict[str, str]] = {}
    for capability, entry in routing.items():
        where = f"{param}.{capability}"
        if capability not in CAPABILITIES:
            raise InvalidRequest(unknown_capability_message(capability), param=where)
        if not isinstance(entry, Mapping):
            raise InvalidRequest(
                f'{where} must be an object {{"provider_integration_id", "model"}}', param=where
            )
        extra = set(entry) - {"provider_integration_id", "model"}
        if extra:
            raise InvalidRequest(
                f"{where} has unknown field(s) {sorted(extra)}; allowed: "
                "provider_integration_id, model",
                param=f"{where}.{sorted(extra)[0]}",
            )
        clean[capability] = _validate_entry(capability, entry, catalog, where)
    return clean


def _validate_entry(
    capability: str, entry: Mapping[str, Any], catalog: Catalog, where: str
) -> dict[str, str]:
    integration = entry.get("provider_integration_id")
    model = entry.get("model")
    if not is_integration_id(integration):
        raise InvalidRequest(
            f"{where}.provider_integration_id must be 'molar-managed' or a stored integration "
            f"id starting with 'byok-'; got {_shown(integration)}",
            param=f"{where}.provider_integration_id",
        )
    if not isinstance(model, str) or model not in catalog:
        raise InvalidRequest(
            f"{where}.model {_shown(model)} is not in the model catalog; known models: "
            f"{', '.join(sorted(catalog.models))}",
            param=f"{where}.model",
        )
    wanted = "embedding" if capability in EMBEDDING_CAPABILITIES else "chat"
    if catalog.get(model).kind != wanted:
        raise InvalidRequest(
            f"{where}.model {model!r} is a {catalog.get(model).kind} model, but capability "
            f"{capability!r} needs a {wanted} model",
            param=f"{where}.model",
        )
    assert isinstance(integration, str)
    return {"provider_integration_id": integration, "model": model}


def _shown(value: object) -> str:
    # Never echo a long string back: it may be a credential pasted into the wrong field.
    if isinstance(value, str) and len(value) > 24:
        return f"a {len(value)}-character string"
    return repr(value)


def resolve_routes(
    capabilities: Iterable[str],
    *,
    catalog: Catalog,
    defaults: Mapping[str, Mapping[str, str]],
    org_routing: Mapping[str, Mapping[str, str]] | None = None,
    submission_routing: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Route]:
    """Resolve each capability to a :class:`Route`; inputs must already be validated."""
    layers: tuple[tuple[Source, Mapping[str, Mapping[str, str]]], ...] = (
        ("submission", submission_routing or {}),
        ("org", org_routing or {}),
        ("default", defaults),
    )
    routes: dict[str, Route] = {}
    for capability in capabilities:
        for source, layer in layers:
            entry = layer.get(capability)
            if entry:
                model = entry["model"]
                routes[capability] = Route(
                    capability=capability,
                    provider_integration_id=entry["provider_integration_id"],
                    model=model,
                    provider=catalog.get(model).provider,
                    source=source,
                )
                break
        else:
            raise ConfigurationError(f"no default route for capability {capability!r}")
    return routes


def load_routing_defaults(path: Path, catalog: Catalog) -> dict[str, dict[str, str]]:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read the routing defaults {path}: {exc}") from exc
    try:
        routes = validate_routing(raw.get("routes", {}), catalog, param="routes")
    except InvalidRequest as exc:
        raise ConfigurationError(f"{path}: {exc.message}") from exc
    missing = [cap for cap in CAPABILITIES if cap not in routes]
    if missing:
        raise ConfigurationError(
            f"{path} has no default route for: {', '.join(missing)}; every capability needs one"
        )
    return routes


@dataclass(frozen=True)
class Deployment:
    """The deployment files, loaded once per process."""

    catalog: Catalog
    defaults: dict[str, dict[str, str]]


@lru_cache(maxsize=8)
def load_deployment(catalog_file: Path, routing_defaults_file: Path) -> Deployment:
    catalog = cached_catalog(catalog_file)
    return Deployment(catalog, load_routing_defaults(routing_defaults_file, catalog))

"""Start-up refusal: a production process will not run on development or weak secrets.

``molar-llm serve`` and ``molar-llm worker`` call :func:`refuse_unsafe_secrets` before they
start; the message names every variable at fault and how to fix it. Every process also
registers the secrets it holds with the redaction registry here.
"""

from __future__ import annotations

from broker.crypto import ENV_VAR as ENCRYPTION_KEYS_VAR
from broker.crypto import parse_keys
from broker.errors import ConfigurationError
from broker.redaction import LIVE_SECRETS
from broker.settings import (
    DEV_ENCRYPTION_KEY,
    DEV_JWT_SECRET,
    DEV_SERVICE_KEY,
    Settings,
)

MIN_SERVICE_KEY_CHARS = 32
MIN_JWT_SECRET_CHARS = 32
MANAGED_PROVIDERS = ("openai", "anthropic", "openai_compatible")


class UnsafeSecrets(ConfigurationError):
    """The deployment's secrets are not fit for production."""


def secret_problems(settings: Settings) -> list[str]:
    """What is wrong with the secrets, one line per variable; empty when they are fine."""
    problems: list[str] = []
    production = settings.env == "production"
    service_key = settings.service_key.get_secret_value()
    jwt_secret = settings.bff_jwt_secret.get_secret_value()
    if production and service_key == DEV_SERVICE_KEY:
        problems.append("MOLAR_LLM_SERVICE_KEY holds the development default")
    elif production and len(service_key) < MIN_SERVICE_KEY_CHARS:
        problems.append(f"MOLAR_LLM_SERVICE_KEY is shorter than {MIN_SERVICE_KEY_CHARS} "
                        "characters")
    if production and jwt_secret == DEV_JWT_SECRET:
        problems.append("BFF_JWT_SECRET holds the development default")
    elif production and len(jwt_secret) < MIN_JWT_SECRET_CHARS:
        problems.append(f"BFF_JWT_SECRET is shorter than {MIN_JWT_SECRET_CHARS} characters")
    problems.extend(_encryption_key_problems(settings, production))
    return problems


def _encryption_key_problems(settings: Settings, production: bool) -> list[str]:
    raw = settings.encryption_keys.get_secret_value()
    try:
        keys = parse_keys(raw)
    except ConfigurationError as exc:
        return [exc.message]
    if production and DEV_ENCRYPTION_KEY in keys:
        return [f"{ENCRYPTION_KEYS_VAR} lists the development key"]
    return []


def refuse_unsafe_secrets(settings: Settings) -> None:
    problems = secret_problems(settings)
    if problems:
        raise UnsafeSecrets(
            f"refusing to start (MOLAR_LLM_ENV={settings.env}): " + "; ".join(problems)
            + ". Generate secrets with 'openssl rand -hex 32' and Fernet keys with "
            "'python -c \"from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())\"'"
        )


def register_process_secrets(settings: Settings) -> None:
    """Teach the redaction registry every secret this process's settings hold."""
    LIVE_SECRETS.add(
        settings.service_key.get_secret_value(),
        settings.bff_jwt_secret.get_secret_value(),
        *[key.strip() for key in settings.encryption_keys.get_secret_value().split(",")],
        *[settings.managed_credential(provider)[0] for provider in MANAGED_PROVIDERS],
    )

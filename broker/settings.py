"""Typed deployment settings, read once from the environment (see the README's table)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SERVICE_KEY = "dev-molar-llm-service-key"
DEV_JWT_SECRET = "dev-bff-jwt-secret-change-me-in-production-0000"
# A valid Fernet key that is public by construction: refused in production.
DEV_ENCRYPTION_KEY = "ZGV2LW1vbGFyLWxsbS1lbmNyeXB0aW9uLWtleS0wMDA="

DEFAULTS_DIR = Path(__file__).parent / "defaults"


def _default_var_dir() -> Path:
    return Path.cwd() / "var"


class Settings(BaseSettings):
    """Every knob the broker reads. Environment variables are ``MOLAR_LLM_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="MOLAR_LLM_", extra="ignore", populate_by_name=True
    )

    env: Literal["development", "production"] = "development"
    var_dir: Path = Field(default_factory=_default_var_dir)
    database_url: str = ""
    broker_url: str = ""

    service_key: SecretStr = SecretStr(DEV_SERVICE_KEY)
    bff_jwt_secret: SecretStr = Field(
        default=SecretStr(DEV_JWT_SECRET),
        validation_alias=AliasChoices("BFF_JWT_SECRET", "MOLAR_LLM_BFF_JWT_SECRET"),
    )
    encryption_keys: SecretStr = SecretStr(DEV_ENCRYPTION_KEY)

    managed_openai_api_key: SecretStr = SecretStr("")
    managed_openai_base_url: str = "https://api.openai.com/v1"
    managed_anthropic_api_key: SecretStr = SecretStr("")
    managed_anthropic_base_url: str = "https://api.anthropic.com"
    managed_openai_compatible_api_key: SecretStr = SecretStr("")
    managed_openai_compatible_base_url: str = "http://127.0.0.1:4000/v1"

    catalog_file: Path = DEFAULTS_DIR / "catalog.toml"
    routing_defaults_file: Path = DEFAULTS_DIR / "routing.toml"

    # Queue behaviour. The task limit must stay well below the visibility timeout so a
    # slow job is killed before the broker hands its message to a second worker.
    # Prefix for every Redis key and channel the broker uses, so deployments (and test
    # runs) can share one Redis server.
    redis_key_prefix: str = ""
    # Celery remote control (Flower's inspect views); see tasks/app.py for its cost.
    worker_remote_control: bool = True
    visibility_timeout_s: int = 1800
    task_time_limit_s: int = 300
    attempt_deadline_s: float = 120.0
    provider_connect_timeout_s: float = 5.0
    provider_read_timeout_s: float = 120.0
    provider_max_connections: int = 256

    # Reliability (docs/reliability.md). Retry policies are JSON: {"<capability>" or "*":
    # {"max_attempts", "base_backoff_s", "max_backoff_s", "jitter_ratio", "attempt_deadline_s",
    # "max_retry_after_s"}}, over the built-in defaults in tasks/retry_policy.py.
    retry_policies: dict[str, dict[str, float]] = Field(default_factory=dict)
    lease_margin_s: float = Field(default=30.0, gt=0)
    # Transactions a worker process runs at once for its jobs' writes. One commits the
    # largest batches (fewest statements per job); more help only with a slow database link.
    worker_commit_writers: int = Field(default=1, ge=1, le=16)
    scheduler_interval_s: float = Field(default=1.0, gt=0)
    scheduler_resend_s: float = Field(default=60.0, gt=0)
    idempotency_ttl_s: int = Field(default=86_400, ge=86_400)

    max_batch_items: int = 50_000
    # Flower's basic auth, "user:password[,user2:password2]"; `molar-llm flower` needs it.
    flower_basic_auth: SecretStr = SecretStr("")
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _limits_nest(self) -> Settings:
        if self.attempt_deadline_s >= self.task_time_limit_s:
            raise ValueError(
                "MOLAR_LLM_ATTEMPT_DEADLINE_S must be below MOLAR_LLM_TASK_TIME_LIMIT_S"
            )
        if self.task_time_limit_s * 2 > self.visibility_timeout_s:
            raise ValueError(
                "MOLAR_LLM_TASK_TIME_LIMIT_S must be at most half of "
                "MOLAR_LLM_VISIBILITY_TIMEOUT_S, or the broker redelivers running jobs"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir / 'molar-llm.sqlite'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.var_dir / 'molar-llm-broker.sqlite'}"

    @property
    def is_embedded(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    def managed_credential(self, provider: str) -> tuple[str, str]:
        """(api_key, base_url) of the platform account for ``provider``."""
        field = provider.replace("-", "_")
        key: SecretStr = getattr(self, f"managed_{field}_api_key")
        base_url: str = getattr(self, f"managed_{field}_base_url")
        return key.get_secret_value(), base_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings. Tests start fresh processes instead of mutating this."""
    return Settings()

"""Apply the Alembic migrations shipped inside the package."""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

from broker.db import normalize_url
from broker.settings import Settings

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic's config is ConfigParser-backed: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    if database_url.startswith("sqlite:///"):
        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)
    log.info("database migrated to %s", revision)


def ensure_embedded_schema(settings: Settings) -> None:
    """The embedded default migrates itself; a shared database is migrated by an operator."""
    if not settings.is_embedded:
        return
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    # API and workers may start together: one migrates, the others wait for it.
    with open(settings.var_dir / ".migrate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        upgrade(settings.resolved_database_url)

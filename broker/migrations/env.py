"""Alembic environment: the URL comes from the caller's Config, the metadata from our models."""

from alembic import context

from broker.db import make_engine
from broker.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "broker.migrate sets sqlalchemy.url"
    engine = make_engine(url, pool_size=1, max_overflow=0)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()

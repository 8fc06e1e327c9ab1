"""Alembic environment: migrates the connection nurture hands over, or the configured database."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from nurture.models import Base

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        from nurture.db import make_engine
        from nurture.settings import load_settings

        with make_engine(load_settings().database_url).begin() as connection:
            _migrate(connection)
    else:
        _migrate(connection)


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()

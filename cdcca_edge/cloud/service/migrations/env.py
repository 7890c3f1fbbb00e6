"""Alembic environment: ``store.open_db`` hands over an open connection (never a URL from
an ini file), so the same migrations run on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import context

from cdcca_edge.cloud.service.store import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copy
with context.begin_transaction():
    context.run_migrations()

"""Alembic migrations of the service's schema (run by ``store.open_db``; ``cdcca-edge
cloud migrate`` runs them alone)."""

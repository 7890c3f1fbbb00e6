"""The task queue's schema (procrastinate), on PostgreSQL only: the scale-out service's
round jobs live in the same database as its state. Nothing on SQLite (the embedded
default runs rounds in a thread).

Revision ID: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    from procrastinate.schema import SchemaManager

    # procrastinate's whole schema as of the pinned version; a later procrastinate adds a
    # revision that runs its sql/migrations/*.sql in between
    op.execute(SchemaManager.get_schema())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TABLE IF EXISTS procrastinate_events, procrastinate_periodic_defers, "
                   "procrastinate_jobs, procrastinate_workers CASCADE")

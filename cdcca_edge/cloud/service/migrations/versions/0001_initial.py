"""The first schema: cohorts, versions, enrollment tokens, devices, uploads, deltas.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cohorts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("artifact_format", sa.String(16), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("teacher_dir", sa.String(4096)),
        sa.Column("student_dir", sa.String(4096)),
        sa.Column("sign_key", sa.String(4096)),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cohort_id", sa.Integer, sa.ForeignKey("cohorts.id"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("identity", sa.String(64), nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("artifact_size", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.UniqueConstraint("cohort_id", "number"),
        sa.UniqueConstraint("cohort_id", "identity"),
    )
    op.create_table(
        "enroll_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cohort_id", sa.Integer, sa.ForeignKey("cohorts.id"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("uses_left", sa.Integer, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("cohort_id", sa.Integer, sa.ForeignKey("cohorts.id"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("enrolled", sa.Float, nullable=False),
        sa.Column("identity", sa.String(64)),
        sa.Column("healthy", sa.Boolean),
        sa.Column("status_time", sa.Float),
    )
    op.create_table(
        "uploads",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("device_id", sa.String(32), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("cohort_id", sa.Integer, sa.ForeignKey("cohorts.id"), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("artifact_identity", sa.String(64), nullable=False),
        sa.Column("n_samples", sa.Integer, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("round_version", sa.Integer),
        sa.UniqueConstraint("device_id", "sha256"),
    )
    # the quota check counts a device's recent uploads; rounds list a cohort's new ones
    op.create_index("ix_uploads_device_created", "uploads", ["device_id", "created"])
    op.create_index("ix_uploads_cohort_round", "uploads", ["cohort_id", "round_version"])
    op.create_table(
        "deltas",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cohort_id", sa.Integer, sa.ForeignKey("cohorts.id"), nullable=False),
        sa.Column("from_version", sa.Integer, nullable=False),
        sa.Column("to_version", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.UniqueConstraint("cohort_id", "from_version", "to_version"),
    )


def downgrade() -> None:
    for table in ("deltas", "uploads", "devices", "enroll_tokens", "versions", "cohorts"):
        op.drop_table(table)

"""spend periods and reservations (issue 4: metering and spend caps)

Revision ID: 0004
Revises: 0001
Create Date: 2026-12-03 16:55:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spend_periods",
        sa.Column("org_id", sa.String(length=128), nullable=False),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("spent_usd_e10", sa.BigInteger(), nullable=False),
        sa.Column("reserved_usd_e10", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("org_id", "period_start", name=op.f("pk_spend_periods")),
    )
    op.create_table(
        "spend_reservations",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("org_id", sa.String(length=128), nullable=False),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("estimate_usd_e10", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd_e10", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("job_id", "attempt", name=op.f("pk_spend_reservations")),
    )
    with op.batch_alter_table("spend_reservations", schema=None) as batch_op:
        batch_op.create_index("ix_spend_reservations_org_state", ["org_id", "state"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("spend_reservations", schema=None) as batch_op:
        batch_op.drop_index("ix_spend_reservations_org_state")
    op.drop_table("spend_reservations")
    op.drop_table("spend_periods")

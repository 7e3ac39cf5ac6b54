"""integrations: BYOK credentials, the key stored as a Fernet token

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-03 16:50:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "integrations",
        sa.Column("org_id", sa.String(length=128), nullable=False),
        sa.Column("id", sa.String(length=72), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("base_url", sa.String(length=2048), nullable=True),
        sa.Column("key_ciphertext", sa.Text(), nullable=False),
        sa.Column("key_hint", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("org_id", "id", name=op.f("pk_integrations")),
    )


def downgrade() -> None:
    op.drop_table("integrations")

"""indexes for the metrics view: jobs and attempts by finish time

Revision ID: 0007
Revises: 0001
"""

from alembic import op

revision = "0007"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
    op.create_index("ix_attempts_finished_at", "attempts", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_attempts_finished_at", table_name="attempts")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")

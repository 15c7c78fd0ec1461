"""Per-key limits: api_keys.rps, max_jobs, max_waiters (NULL: the default from settings),
and an index to count a key's jobs by status at every submit

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rps", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("max_jobs", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_waiters", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_owner_status", "jobs", ["owner_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_status", table_name="jobs")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("max_waiters")
        batch_op.drop_column("max_jobs")
        batch_op.drop_column("rps")

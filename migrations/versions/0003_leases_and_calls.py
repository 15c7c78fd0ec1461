"""jobs: leases lost to dead workers (poison detection), the backend being called, and the
indexes that find a conversation's previous job and the jobs waiting for one

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        # server_default fills existing rows without a table rewrite on Postgres >= 11.
        batch_op.add_column(
            sa.Column("lost_leases", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("calling_backend", sa.String(length=128), nullable=True))
        batch_op.create_index("ix_jobs_calling_backend", ["calling_backend"], unique=False)
        batch_op.create_index(
            "ix_jobs_conversation_answer", ["conversation_id", "answer_seq"], unique=False
        )
        batch_op.create_index("ix_jobs_after_job", ["after_job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_after_job")
        batch_op.drop_index("ix_jobs_conversation_answer")
        batch_op.drop_index("ix_jobs_calling_backend")
        batch_op.drop_column("calling_backend")
        batch_op.drop_column("lost_leases")

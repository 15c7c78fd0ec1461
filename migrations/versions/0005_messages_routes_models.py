"""Whole chat messages (tool calls, tool results, content parts) in turns, the route a job
runs down (the request's model), and what the probes learn of a backend (the models it
serves, its last answered call)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
OLD_ROLES = "role IN ('system', 'user', 'assistant')"
ROLES = "role IN ('system', 'developer', 'user', 'assistant', 'tool')"


def upgrade() -> None:
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("message", JSON, nullable=True))
        batch_op.drop_constraint("ck_turns_role", type_="check")
        batch_op.create_check_constraint("ck_turns_role", ROLES)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("route", sa.String(length=255), nullable=True))
    with op.batch_alter_table("backends", schema=None) as batch_op:
        batch_op.add_column(sa.Column("served_models", JSON, nullable=True))
        batch_op.add_column(sa.Column("model_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("last_answer_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backends", schema=None) as batch_op:
        batch_op.drop_column("last_answer_at")
        batch_op.drop_column("model_error")
        batch_op.drop_column("served_models")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("route")
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_constraint("ck_turns_role", type_="check")
        batch_op.create_check_constraint("ck_turns_role", OLD_ROLES)
        batch_op.drop_column("message")

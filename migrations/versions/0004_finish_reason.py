"""Keep, with each answer, why the LLM stopped (its `finish_reason`).

An answer the model cut off at its token limit ("length") or that the provider's
filter cut ("content_filter") was stored, shown and served from the cache as if it
were whole. Now the reason is kept and shown, and such an answer is no cache source.
Records from before keep none (NULL): whole or not, nobody can tell now.

Adding a nullable column without a default rewrites nothing, on either database.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("qn_a", sa.Column("finish_reason", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("qn_a") as batch:
        batch.drop_column("finish_reason")

"""Keep, with each record, when it counts as abandoned if still pending.

It was judged by each reader's own QNA_LLM_DEADLINE_S: a process allowed less time
(a `qna history` without the server's settings, a server deployed with a shorter
deadline) closed other processes' asks as abandoned while they were still being
answered, and let another request with the same Idempotency-Key ask the LLM again.
The asker now stores its own limit. Records from before keep none (NULL) and are
judged as before.

Adding a nullable column without a default rewrites nothing, on either database.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("qn_a", sa.Column("abandon_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("qn_a") as batch:
        batch.drop_column("abandon_at")

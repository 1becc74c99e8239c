"""Index the failures, newest first: on PostgreSQL, `qna history --status failed` and
`GET /questions?status=failed` read them without reading the whole history.

Partial, so it holds only failed records. Building it reads the table once, and
PostgreSQL holds off writes to it meanwhile (about a second per million records).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    failed = sa.text("status = 'failed'")
    op.create_index(
        "ix_qn_a_failed_created_at_id",
        "qn_a",
        ["created_at", "id"],
        postgresql_where=failed,
        sqlite_where=failed,
    )


def downgrade() -> None:
    op.drop_index("ix_qn_a_failed_created_at_id", table_name="qn_a")

"""Index the pending records by (created_at, id), as the history pages them.

The pending records' index held `created_at` alone. PostgreSQL read a page of
`qna history --status pending` (or `failed`, whose abandoned part is pending records)
from it all the same; SQLite did not: it needs the whole of the page's order,
`created_at DESC, id DESC`, from one index, so it read the entire history through
the history's own index, filtering (160 ms a page at 300,000 records, and growing).

Partial, so it holds only pending records: few. Building it reads the table once,
and PostgreSQL holds off writes to it meanwhile (about a second per million records).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    op.create_index(
        "ix_qn_a_pending_created_at_id",
        "qn_a",
        ["created_at", "id"],
        postgresql_where=_PENDING,
        sqlite_where=_PENDING,
    )
    op.drop_index("ix_qn_a_pending_created_at", table_name="qn_a")


def downgrade() -> None:
    op.create_index(
        "ix_qn_a_pending_created_at",
        "qn_a",
        ["created_at"],
        postgresql_where=_PENDING,
        sqlite_where=_PENDING,
    )
    op.drop_index("ix_qn_a_pending_created_at_id", table_name="qn_a")

"""Create the qn_a table: every question, its answer or its failure.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "qn_a",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("question_key", sa.String(length=64), nullable=False),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("response_model", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error_kind", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source_id", sa.Uuid(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'answered', 'failed')", name=op.f("ck_qn_a_status")
        ),
        sa.ForeignKeyConstraint(
            ["source_id"], ["qn_a.id"], name=op.f("fk_qn_a_source_id_qn_a"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_qn_a")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_qn_a_idempotency_key")),
    )
    op.create_index("ix_qn_a_created_at_id", "qn_a", ["created_at", "id"])
    cacheable = sa.text("status = 'answered' AND source_id IS NULL")
    op.create_index(
        "ix_qn_a_question_key_model_created_at",
        "qn_a",
        ["question_key", "model", "created_at"],
        postgresql_where=cacheable,
        sqlite_where=cacheable,
    )
    pending = sa.text("status = 'pending'")
    op.create_index(
        "ix_qn_a_pending_created_at",
        "qn_a",
        ["created_at"],
        postgresql_where=pending,
        sqlite_where=pending,
    )


def downgrade() -> None:
    op.drop_table("qn_a")

"""Alembic environment: runs on the connection the application hands over.

`qna db upgrade` and application start-up call Alembic in code with
`config.attributes["connection"]` set. There is no alembic.ini: to write a new
migration, call Alembic from Python with qna's own configuration and DATABASE_URL,
e.g. `from alembic import command; from qna.adapters.sqlalchemy.migrate import
alembic_config; command.revision(alembic_config(), "what it does", autogenerate=True)`.
No `fileConfig()` here: it would replace the application's logging set-up.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from qna.adapters.sqlalchemy.database import create_engine
from qna.adapters.sqlalchemy.migrate import migrating
from qna.adapters.sqlalchemy.tables import metadata

target_metadata = metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("Set DATABASE_URL to run the alembic command directly.")
    engine = create_engine(url)
    try:
        with migrating(engine) as connection:  # qna's lock, SQLite's foreign keys kept
            run_migrations(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("Offline (--sql) migrations are not supported; run them online.")
run_migrations_online()

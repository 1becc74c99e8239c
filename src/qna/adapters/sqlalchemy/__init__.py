"""Storage of QnA records in PostgreSQL or SQLite through SQLAlchemy 2 and Alembic."""

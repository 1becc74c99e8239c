"""Implementations of the application's ports: OpenAI for the LLM, SQLAlchemy for storage."""

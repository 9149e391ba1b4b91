"""Alembic migrations of the flywheel schema (run them with ``flywheel db upgrade``)."""

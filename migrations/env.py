"""Alembic environment: online migrations over the connection flywheel hands in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from flywheel.db.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from flywheel.db.engine import create_db_engine
    from flywheel.settings import get_settings

    engine = create_db_engine(get_settings(), pool_size=1)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("flywheel migrations run online only: use `flywheel db upgrade`")
run_migrations_online()

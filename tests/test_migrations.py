"""Alembic migrations on real PostgreSQL: round trip to base and back, no drift from the models."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from flywheel.db import migrate
from flywheel.db.engine import create_db_engine
from flywheel.db.models import Base
from flywheel.settings import Settings

TABLES = {
    "api_keys",
    "model_versions",
    "evaluation_runs",
    "signals",
    "failure_clusters",
    "failure_cases",
    "case_signals",
    "case_routes",
    "review_items",
    "review_audit",
    "cycles",
    "training_rounds",
    "training_round_cases",
    "checkpoints",
    "regression_scenarios",
}


@pytest.fixture
def empty_engine(create_database: Callable[[], str]) -> Iterator[Engine]:
    engine = create_db_engine(Settings(database_url=create_database()), pool_size=1)
    yield engine
    engine.dispose()


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_to_base_and_back(empty_engine: Engine) -> None:
    assert migrate.current_revision(empty_engine) is None

    migrate.upgrade(empty_engine)
    assert migrate.current_revision(empty_engine) == migrate.head_revision()
    assert _tables(empty_engine) == TABLES

    migrate.downgrade(empty_engine, "base")
    assert migrate.current_revision(empty_engine) is None
    assert _tables(empty_engine) == set()

    migrate.upgrade(empty_engine)
    assert _tables(empty_engine) == TABLES


def test_migrations_match_the_models(empty_engine: Engine) -> None:
    migrate.upgrade(empty_engine)
    with empty_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_upgrade_is_idempotent(empty_engine: Engine) -> None:
    migrate.upgrade(empty_engine)
    migrate.upgrade(empty_engine)
    assert migrate.current_revision(empty_engine) == migrate.head_revision()


def test_autogenerate_finds_nothing_to_do_at_head(empty_engine: Engine, tmp_path: Path) -> None:
    migrate.upgrade(empty_engine)

    path = migrate.autogenerate_revision(empty_engine, "no change", version_path=tmp_path)

    text = path.read_text()
    assert path.parent == tmp_path
    assert f"down_revision: str | None = {migrate.head_revision()!r}" in text
    assert "op." not in text  # the models add nothing the migrations lack

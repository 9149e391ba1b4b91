"""The services a command needs, opened from the settings: each exits with a one-line
reason (2 for bad settings, 1 for an unreachable service) instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from flywheel.cli.output import fail
from flywheel.settings import Settings, get_settings

if TYPE_CHECKING:  # the vector store's client loads only for commands that use it
    from qdrant_client import QdrantClient

    from retrieval.store import QdrantConfig


@contextmanager
def database(settings: Settings | None = None) -> Iterator[Engine]:
    """An engine whose database answers, disposed on exit.

    Exits 2 on a bad URL and 1 when the database is unreachable.
    """
    from flywheel.db.engine import create_db_engine

    try:
        engine = create_db_engine(settings or get_settings(), pool_size=2)
    except ValueError as exc:
        fail(str(exc))
    try:
        try:
            engine.connect().close()
        except OperationalError as exc:
            fail(f"database unreachable: {str(exc.orig).strip().splitlines()[0]}", code=1)
        yield engine
    finally:
        engine.dispose()


@contextmanager
def qdrant() -> Iterator[tuple[QdrantClient, QdrantConfig]]:
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    from retrieval.store import open_qdrant, qdrant_config

    config = qdrant_config(get_settings())
    where = config.url or config.path
    try:
        client = open_qdrant(config)
    except (RuntimeError, OSError, ValueError) as exc:
        fail(f"cannot open Qdrant ({where}): {str(exc).splitlines()[0]}", code=1)
    try:
        yield client, config
    except (ResponseHandlingException, UnexpectedResponse) as exc:  # unreachable, 401, 5xx
        fail(f"Qdrant ({where}) did not answer: {str(exc).splitlines()[0]}", code=1)
    finally:
        client.close()

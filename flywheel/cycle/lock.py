"""One cycle at a time: a PostgreSQL advisory lock held for the whole cycle.

The lock belongs to a dedicated connection: a second ``flywheel cycle`` (any process, any
host on that database) is refused while it is held, and a cycle whose process dies releases
it with its connection, so the next run can resume what the dead one left.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, func, select

CYCLE_LOCK = 0x666C7977  # "flyw": the advisory lock key of the cycle


class CycleBusyError(RuntimeError):
    """Another cycle holds the lock."""


@contextmanager
def cycle_lock(engine: Engine) -> Iterator[None]:
    """Hold the cycle lock for the ``with`` block; raise :class:`CycleBusyError` if taken."""
    with engine.connect() as connection:
        taken = connection.scalar(select(func.pg_try_advisory_lock(CYCLE_LOCK)))
        connection.commit()
        if not taken:
            raise CycleBusyError("another cycle is running (the cycle lock is held)")
        try:
            yield
        finally:
            connection.scalar(select(func.pg_advisory_unlock(CYCLE_LOCK)))
            connection.commit()

"""Per-key request limits: a sliding window per API key.

The limit is the key's own (``api_keys.rate_limit``) or the process default
(``FLYWHEEL_RATE_LIMIT``), in the ``limits`` notation: ``"100/second;3000/minute"``
(every part must hold). With ``FLYWHEEL_REDIS_URL`` set, every API process counts in
Redis, so the limit holds across processes and hosts; without it, each process counts
for itself (the embedded default runs one).

If Redis does not answer, requests pass (and a warning is logged): a broken counter must
not turn into an outage of the ingest path, which does not otherwise need Redis.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

if TYPE_CHECKING:
    from redis.asyncio import ConnectionPool

_log = logging.getLogger(__name__)

UNLIMITED = "off"
"""The value of a limit that turns limiting off."""


def parse_rate_limit(text: str) -> tuple[RateLimitItem, ...]:
    """The parts of a limit (``"100/second;3000/minute"``); ``()`` for ``"off"``.

    Raises ``ValueError`` saying what a limit looks like.
    """
    return _parse(text.strip().lower())


def normalized_rate_limit(text: str) -> str:
    """A limit as stored and configured: checked, lower case, no surrounding blanks; raises
    ``ValueError`` as :func:`parse_rate_limit` does."""
    parse_rate_limit(text)
    return text.strip().lower()


@lru_cache(maxsize=256)
def _parse(text: str) -> tuple[RateLimitItem, ...]:
    if text == UNLIMITED:
        return ()
    try:
        return tuple(parse_many(text))
    except ValueError:
        raise ValueError(
            f"invalid rate limit {text!r}: write requests per period, e.g. '600/minute' or "
            f"'100/second;3000/minute', or {UNLIMITED!r}"
        ) from None


@dataclass(frozen=True, slots=True)
class Exceeded:
    """A refused request: which limit, and when a request will pass again."""

    limit: str
    retry_after: int
    """Whole seconds (at least 1) until the window has room again."""


class KeyRateLimiter:
    """Counts each key's requests against its limit. Build one per process with
    :func:`build_rate_limiter`; :meth:`aclose` at shutdown."""

    def __init__(self, *, default: str, redis_url: str | None) -> None:
        self._default = default
        self._pool: ConnectionPool | None = None
        if redis_url is None:
            storage: MemoryStorage | RedisStorage = MemoryStorage()
        else:
            from redis.asyncio import ConnectionPool

            self._pool = ConnectionPool.from_url(
                redis_url, socket_connect_timeout=1, socket_timeout=1
            )
            # Our own pool, so that shutdown can close its connections.
            client_options: dict[str, Any] = {"connection_pool": self._pool}
            storage = RedisStorage(
                "async+" + redis_url,
                implementation="redispy",
                key_prefix="flywheel:rate",
                wrap_exceptions=True,
                **client_options,
            )
        self._limiter = SlidingWindowCounterRateLimiter(storage)

    async def hit(self, *, key_prefix: str, key_limit: str | None) -> Exceeded | None:
        """Count one request of the key; ``None`` if it may proceed."""
        limit = key_limit or self._default
        try:
            for item in parse_rate_limit(limit):
                if not await self._limiter.hit(item, key_prefix):
                    stats = await self._limiter.get_window_stats(item, key_prefix)
                    wait = max(1, math.ceil(stats.reset_time - time.time()))
                    return Exceeded(limit=str(item), retry_after=wait)
        except StorageError as exc:
            _log.warning("rate limit counter unavailable, request let through: %s", exc)
        return None

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()


def build_rate_limiter(*, default: str, redis_url: str | None) -> KeyRateLimiter:
    """The process's limiter: counted in Redis when ``redis_url`` is set, else in memory."""
    parse_rate_limit(default)
    return KeyRateLimiter(default=default, redis_url=redis_url)

"""Process settings, read from ``FLYWHEEL_*`` environment variables (and ``.env``).

Settings are built by :func:`get_settings`, never at import, so tests and commands can
set the environment first and then ask for them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything a flywheel process needs to find its services."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", env_file=".env", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL. Unset: a PostgreSQL started in-process under FLYWHEEL_HOME.",
    )
    qdrant_url: str | None = Field(
        default=None,
        description="Qdrant server URL. Unset: qdrant-client local mode under FLYWHEEL_HOME.",
    )
    qdrant_api_key: str | None = Field(
        default=None, description="API key of the Qdrant server, if it asks for one."
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL for the Celery broker. Unset: Celery runs tasks eagerly in-process.",
    )
    task_visibility_timeout: int = Field(
        default=3600,
        gt=0,
        description=(
            "Seconds a task taken by a worker that died with it waits in Redis before another "
            "worker gets it; keep it above the longest task."
        ),
    )
    home: Path = Field(
        default=Path("~/.flywheel"),
        description="Directory for the embedded services' data (PostgreSQL, Qdrant) and artefacts.",
    )
    max_request_bytes: int = Field(
        default=16 * 1024 * 1024,
        gt=0,
        description="Largest HTTP request body the API accepts; larger ones get 413.",
    )
    db_pool_size: int = Field(default=10, gt=0, description="Connections the API keeps open.")
    rate_limit: str = Field(
        default="100/second;3000/minute",
        description=(
            "Requests one API key may make (every part must hold; a key's own limit, set with "
            "`flywheel keys create --rate-limit`, replaces it); 'off' turns limiting off. "
            "Counted in Redis when FLYWHEEL_REDIS_URL is set, else per API process."
        ),
    )

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str) -> str:
        from flywheel.auth.rate_limit import normalized_rate_limit

        return normalized_rate_limit(value)

    @property
    def qdrant_path(self) -> Path:
        """Where qdrant-client local mode keeps its collections."""
        return self.home / "qdrant"

    @property
    def pgdata_path(self) -> Path:
        """Where the embedded PostgreSQL keeps its data directory."""
        return self.home / "pgdata"


def prefect_environment(settings: Settings) -> None:
    """Prefect's home under ``$FLYWHEEL_HOME/prefect`` (its ephemeral API's database) and its
    analytics off, unless set; call before Prefect is imported."""
    import os

    os.environ.setdefault("PREFECT_HOME", str(settings.home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built on first use."""
    return Settings()

"""What every adapter is: a settings model (its section of the project file) and a builder.

A section of ``flywheel.toml`` such as::

    [judge]
    adapter = "http"
    url = "http://judge.internal:8080/v1/judge"
    timeout_s = 30

is validated by the ``http`` judge adapter's settings model (every key but ``adapter``),
and the part is built from it by the adapter's ``build``. Relative paths in a section are
relative to the project file's directory (:attr:`AdapterContext.root`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

SettingsT = TypeVar("SettingsT", bound=BaseModel)


class AdapterSettings(BaseModel):
    """Base of every adapter's settings: unknown keys are an error (a typo is not ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class AdapterContext:
    """What every adapter may need besides its own section."""

    root: Path
    """The project file's directory: relative paths are resolved against it."""
    home: Path
    """``$FLYWHEEL_HOME``: where flywheel keeps its own state and caches."""
    device: str = "cpu"
    """Where models run (``cpu``, ``cuda``, ``cuda:1``)."""

    def path(self, value: str | Path) -> Path:
        """``value`` resolved against the project's directory (``~`` expanded)."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.root / path)


@dataclass(frozen=True, kw_only=True, slots=True)
class Adapter(Generic[SettingsT]):
    """One adapter: its settings model, how to build the part, and what it is."""

    settings: type[SettingsT]
    build: Callable[[SettingsT, AdapterContext], Any]
    """The part (an object satisfying the port's Protocol)."""
    summary: str
    """One line for ``flywheel init`` and the README."""

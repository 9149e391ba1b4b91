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
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from training.loop import LoopConfig

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


def launched_round_loop(
    steps: int,
    *,
    lr: float,
    warmup_steps: int | None,
    checkpoint_every: int | None,
    seed: int,
    device: str,
    keep_checkpoints: int = 1,
) -> LoopConfig:
    """The loop of a round the in-process launcher trains from its manifest's settings:
    ``steps`` steps warmed up (``warmup_steps``; default a quarter of them, at most 20) then
    cosine-decayed to the end, a checkpoint every ``checkpoint_every`` steps (default every
    500, and at the end) so a killed round resumes there, progress every 10."""
    from training.loop import LoopConfig, OptimizerConfig

    warmup = min(20, steps // 4) if warmup_steps is None else warmup_steps
    return LoopConfig(
        optimizer=OptimizerConfig(
            lr=lr, warmup_steps=warmup, decay_steps=steps - warmup if steps > warmup else None
        ),
        max_steps=steps,
        checkpoint_every=checkpoint_every or min(steps, 500),
        keep_checkpoints=keep_checkpoints,
        log_every=10,
        seed=seed,
        device=device,
    )

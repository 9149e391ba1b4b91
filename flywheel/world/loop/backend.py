"""The embedded world's cycle backend (:class:`~flywheel.cycle.backend.CycleBackend`): the
world's own steps (:mod:`flywheel.world.loop.steps`), its dry run
(:mod:`flywheel.world.loop.plan`) and its shipped base. The loop finds it by name
(:data:`~flywheel.cycle.backend.WORLD_BACKEND`) when no project file names a stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from flywheel.cycle.backend import Indexes
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.plan_types import CyclePlan
from flywheel.cycle.registry import ShippedModel
from flywheel.cycle.verdicts import Evaluation
from flywheel.db.models import Component, Cycle
from flywheel.world.base_model import BASE_ENHANCER, BASE_REWARD
from flywheel.world.evaluation import BASE_MODEL

BASE_VERSION = "world-base"
"""The shipped base's name in the registry."""


def shipped_base() -> ShippedModel:
    """The shipped world base (generator, prompt enhancer, reward)."""
    return ShippedModel(
        name=BASE_VERSION,
        components={
            Component.GENERATOR: BASE_MODEL,
            Component.ENHANCER: BASE_ENHANCER,
            Component.REWARD: BASE_REWARD,
        },
        description="the shipped world base (generator, prompt enhancer, reward)",
    )


@dataclass(kw_only=True, slots=True)
class WorldBackend:
    """The embedded world: steps that know its truth (scenes, evaluator, users' words)."""

    @property
    def name(self) -> str:
        return "world"

    def shipped_model(self) -> ShippedModel | None:
        return shipped_base()

    def attribute(
        self, session: Session, cycle: Cycle, *, home: Path, indexes: Indexes
    ) -> dict[str, Any]:
        from flywheel.world.loop import steps

        return steps.attribute(
            session,
            cycle,
            home=home,
            client=indexes.client,
            qdrant=indexes.qdrant,
            embedder=indexes.embedder,
        )

    def prepare_rounds(
        self, session: Session, cycle: Cycle, *, home: Path, indexes: Indexes
    ) -> dict[str, Any]:
        from flywheel.world.loop import steps

        return steps.prepare_rounds(
            session,
            cycle,
            home=home,
            client=indexes.client,
            qdrant=indexes.qdrant,
            embedder=indexes.embedder,
        )

    def run_round(
        self, session: Session, round_id: int, *, home: Path, progress: bool
    ) -> dict[str, Any]:
        from flywheel.world.loop import steps

        return steps.run_round(session, round_id, home=home, progress=progress)

    def evaluate(self, session: Session, cycle: Cycle) -> Evaluation:
        from flywheel.world.loop import steps

        return steps.evaluate(session, cycle)

    def plan(self, engine: Engine, *, config: CycleConfig, home: Path) -> CyclePlan:
        from flywheel.world.loop.plan import plan_cycle

        return plan_cycle(engine, config=config, home=home)

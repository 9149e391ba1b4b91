"""What a cycle runs its stack-dependent steps on: a :class:`CycleBackend`.

The cycle's shared steps (open, candidate, gate, review, close: :mod:`flywheel.cycle.steps`)
are the same for every stack. The four that depend on the stack — attribute, prepare the
rounds, run a round, evaluate — and the dry run's plan come from a backend:

- :class:`PortBackend`: a project's parts through the ports (:mod:`flywheel.cycle.stack_steps`,
  :mod:`flywheel.cycle.stack_plan`) — a team's stack;
- the embedded world's backend (``flywheel.world.loop.backend:WorldBackend``), which knows
  the world's truth; :func:`cycle_backend` finds it by name when no project file names a
  stack, so nothing in the loop imports the world.

Each step records what it did in PostgreSQL and returns it when asked again, so a flow
retry, a resumed run or a paused cycle picks up where it stopped.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from qdrant_client import QdrantClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from flywheel.adapters.base import AdapterContext
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.plan_types import CyclePlan
from flywheel.cycle.registry import ShippedModel
from flywheel.cycle.verdicts import Evaluation
from flywheel.db.models import Cycle
from flywheel.parts import Parts, build_parts
from flywheel.project import Project
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig

WORLD_BACKEND = "flywheel.world.loop.backend:WorldBackend"
"""The embedded world's backend, imported by name only when the project is the world."""


@dataclass(kw_only=True, slots=True)
class Indexes:
    """The vector store a cycle's steps read and write (corpus, pool, failure cases)."""

    client: QdrantClient
    qdrant: QdrantConfig
    embedder: TextEmbedder


@runtime_checkable
class CycleBackend(Protocol):
    """The stack-dependent steps of a cycle (each idempotent: done work is returned)."""

    @property
    def name(self) -> str:
        """What the backend runs on (``world``, ``ports``), for logs."""
        ...

    def shipped_model(self) -> ShippedModel | None:
        """The model a fresh registry serves (None: the team registers its own)."""
        ...

    def attribute(
        self, session: Session, cycle: Cycle, *, home: Path, indexes: Indexes
    ) -> dict[str, Any]:
        """Signals to cases, themes and routes; what it did (recorded as ``attribution``)."""
        ...

    def prepare_rounds(
        self, session: Session, cycle: Cycle, *, home: Path, indexes: Indexes
    ) -> dict[str, Any]:
        """Per track its artefact, review item and pending round, or why none (``tracks``)."""
        ...

    def run_round(
        self, session: Session, round_id: int, *, home: Path, progress: bool
    ) -> dict[str, Any]:
        """Train one round (resuming), commit its status; its metrics."""
        ...

    def evaluate(self, session: Session, cycle: Cycle) -> Evaluation:
        """Base and candidate on the gate's cases, the regression suite and the scenarios
        (``evaluation``)."""
        ...

    def plan(self, engine: Engine, *, config: CycleConfig, home: Path) -> CyclePlan:
        """The dry run: the first steps in a rolled-back transaction; nothing persists."""
        ...


@dataclass(kw_only=True, slots=True)
class PortBackend:
    """A team's stack: every step through the project's ports."""

    parts: Parts

    @property
    def name(self) -> str:
        return "ports"

    def shipped_model(self) -> ShippedModel | None:
        return None

    def attribute(
        self, session: Session, cycle: Cycle, *, home: Path, indexes: Indexes
    ) -> dict[str, Any]:
        from flywheel.cycle import stack_steps

        return stack_steps.attribute(
            session,
            cycle,
            parts=self.parts,
            client=indexes.client,
            qdrant=indexes.qdrant,
            embedder=indexes.embedder,
        )

    def prepare_rounds(
        self, session: Session, cycle: Cycle, *, home: Path, indexes: Indexes
    ) -> dict[str, Any]:
        from flywheel.cycle import stack_steps

        return stack_steps.prepare_rounds(
            session,
            cycle,
            home=home,
            parts=self.parts,
            client=indexes.client,
            qdrant=indexes.qdrant,
            embedder=indexes.embedder,
        )

    def run_round(
        self, session: Session, round_id: int, *, home: Path, progress: bool
    ) -> dict[str, Any]:
        from flywheel.cycle import stack_steps

        return stack_steps.run_round(session, round_id, home=home, parts=self.parts)

    def evaluate(self, session: Session, cycle: Cycle) -> Evaluation:
        from flywheel.cycle import stack_steps

        return stack_steps.evaluate(session, cycle, parts=self.parts)

    def plan(self, engine: Engine, *, config: CycleConfig, home: Path) -> CyclePlan:
        from flywheel.cycle.stack_plan import plan_stack_cycle

        return plan_stack_cycle(engine, config=config, parts=self.parts, home=home)


def cycle_backend(project: Project, context: AdapterContext) -> CycleBackend:
    """The project's backend: its parts built in ``context`` behind the ports, or the
    embedded world's when the project is the world."""
    if not project.is_world:
        return PortBackend(parts=build_parts(project, context))
    module, _, attribute = WORLD_BACKEND.partition(":")
    backend = getattr(importlib.import_module(module), attribute)()
    if not isinstance(backend, CycleBackend):
        raise TypeError(f"{WORLD_BACKEND} is not a cycle backend")
    return backend

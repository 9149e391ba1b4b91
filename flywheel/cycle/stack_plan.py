"""``flywheel cycle --dry-run`` on a project's stack: the cycle's first steps — collect,
theme, attribute on the ports, and per track the artefact it would build — inside one
database transaction that is rolled back, with an in-memory vector store and the artefacts
written to a temporary directory that is removed: nothing it finds persists."""

from __future__ import annotations

import tempfile
from pathlib import Path

from qdrant_client import QdrantClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from flywheel.cycle import repository
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.plan_types import CyclePlan, RoundPlan, TrackPlan
from flywheel.cycle.registry import RegistryError, current_model
from flywheel.cycle.stack_steps import attribute_cases, round_budget, routed_cases
from flywheel.cycle.steps import ROUND_ORDER
from flywheel.parts import Parts
from flywheel.tracks.routed import split_cases
from flywheel.tracks.specs import TRACK_SPECS, TrackInputs
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig


def plan_stack_cycle(engine: Engine, *, config: CycleConfig, parts: Parts, home: Path) -> CyclePlan:
    """Run the cycle's first steps on a project's ``parts`` and roll them back; the plan."""
    client, qdrant, embedder = QdrantClient(location=":memory:"), QdrantConfig(), TextEmbedder()
    with (
        engine.connect() as connection,
        tempfile.TemporaryDirectory(prefix="flywheel-plan-") as scratch,
    ):
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        try:
            model = current_model(session)
            if model is None:
                raise RegistryError(
                    "no serving model: register yours with "
                    "`flywheel models register NAME --generator DIR`"
                )
            report = attribute_cases(
                session,
                config=config,
                parts=parts,
                client=client,
                qdrant=qdrant,
                embedder=embedder,
            )
            by_track = routed_cases(session)
            tracks = []
            for track in ROUND_ORDER:
                spec = TRACK_SPECS[track]
                pairs = by_track[track]
                train, held = split_cases([c for c, _ in pairs], seed=config.seed)
                data: dict[str, object] = {"train": len(train), "gate": len(held)}
                round_plan: RoundPlan | None = None
                if len(pairs) >= config.min_cases and held:
                    artefact = spec.build(
                        TrackInputs(
                            cases=train,
                            held_out=held,
                            parts=parts,
                            client=client,
                            qdrant=qdrant,
                            embedder=embedder,
                            out_dir=Path(scratch) / track.value,
                            seed=config.seed,
                            replay=config.pretraining_gap.replay,
                        )
                    )
                    if isinstance(artefact, str):
                        data["reason"] = artefact
                    else:
                        data["artefact"] = spec.title(artefact, len(pairs))
                        round_plan = RoundPlan(
                            recipe=spec.recipe,
                            steps=round_budget(track, config),
                            estimated_seconds=None,
                        )
                rows = [case for _, case in pairs]
                tracks.append(
                    TrackPlan(
                        track=track.value,
                        cases=len(pairs),
                        mean_confidence=repository.mean_confidence(session, cases=rows),
                        top_clusters=repository.top_clusters(session, cases=rows),
                        data=data,
                        round=round_plan,
                    )
                )
            return CyclePlan(
                model=model.name,
                signals_collected=int(report["signals_collected"]),
                cases_created=int(report["cases_created"]),
                routed=dict(report["routed"]),
                awaiting_triage=int(report["awaiting_triage"]),
                tracks=tracks,
                estimated_seconds=0.0,
            )
        finally:
            session.close()
            outer.rollback()
            client.close()

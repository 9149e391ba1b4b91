"""The cycle's plan — what ``flywheel cycle --dry-run`` prints — and the steps it shares
with a real cycle: collect, theme, attribute, and per track the artefact it would build.

:func:`plan_cycle` runs the real steps inside one database transaction that is rolled back
at the end (the session's own commits become savepoints), with an in-memory vector store
and no file written: nothing it finds persists — no cases, routes, training data,
checkpoints or cycle row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qdrant_client import QdrantClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from flywheel.attribution.classifier import ClassifierConfig
from flywheel.attribution.evidence import Evidence
from flywheel.attribution.service import (
    AttributionReport,
    attribute_open_cases,
    case_views,
    routing_classifier,
)
from flywheel.cases.service import CollectReport, collect_failures
from flywheel.cases.themes import assign_themes
from flywheel.cycle import repository
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.plan_types import CyclePlan, RoundPlan, TrackPlan
from flywheel.cycle.registry import ModelBundle, current_model
from flywheel.db.models import CaseRoute, FailureCase, Track
from flywheel.tracks.reward_data import preference_pairs
from flywheel.world.base_model import world_base_config
from flywheel.world.definition import world_of
from flywheel.world.loop.attribution import (
    LabeledSetConfig,
    seed_examples,
    world_evidence_tools,
    world_scarcity,
)
from flywheel.world.loop.backend import shipped_base
from flywheel.world.loop.evidence import EvidenceTools
from flywheel.world.loop.gate import split_tracks
from flywheel.world.loop.pretraining_gap import (
    GapTrackConfig,
    diagnose_gap,
    index_world_pool,
    plan_augmentation,
)
from flywheel.world.loop.prompt_enhancer import (
    PromptEnhancerTrackConfig,
    enhancer_pairs,
    failing_concepts,
)
from flywheel.world.loop.rl import RLTrackConfig, preference_cases
from flywheel.world.loop.slices import SliceCase
from flywheel.world.loop.slices import scene_of as _scene
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig

PE_GRPO_IMAGES = 16
"""Drawings of a rollout at the enhancer track's default GRPO settings (2 prompts a rollout, 8
rewrites a prompt), which :data:`SECONDS_PER_STEP`'s ``pe_grpo`` was measured at."""
PE_GRPO_SECONDS = 2.2
"""Seconds a GRPO step of the enhancer round takes at those settings, the evaluator judging
(6 steps in 13.4 s on 2 shared cores, loading the generator and both LMs included)."""

SECONDS_PER_STEP = {
    "pe_sft": 0.075,
    "pe_grpo": PE_GRPO_SECONDS,
    "vae": 0.13,
    "pretrain": 0.21,
    "flow_grpo": 18.0,
    "reward_recalibration": 0.3,
}
"""Measured on a 2-core AVX-512 CPU at the shipped base's sizes (README, The tracks): what a
plan's cost estimate multiplies the steps by (``pe_grpo``: at the track's default rollout,
:data:`PE_GRPO_IMAGES` drawings every ``grpo_updates_per_rollout`` steps)."""


def enhancer_round_plan(pe: PromptEnhancerTrackConfig) -> RoundPlan:
    """The enhancer round's plan: its SFT steps and, when ``pe.grpo_steps`` > 0, its GRPO
    stage's, each costed per step (the GRPO's scaled by the drawings a step makes against the
    measured rollout's)."""
    steps = {"pe_sft": pe.steps}
    seconds = pe.steps * SECONDS_PER_STEP["pe_sft"]
    if pe.grpo_steps > 0:
        steps["pe_grpo"] = pe.grpo_steps
        images = pe.grpo_prompts_per_step * pe.grpo_group_size / pe.grpo_updates_per_rollout
        reference = PE_GRPO_IMAGES / PromptEnhancerTrackConfig().grpo_updates_per_rollout
        seconds += pe.grpo_steps * SECONDS_PER_STEP["pe_grpo"] * images / reference
    return RoundPlan(recipe="pe_sft", steps=steps, estimated_seconds=seconds)


def _as_slices(session: Session, pairs: Sequence[tuple[CaseRoute, FailureCase]]) -> list[SliceCase]:
    views = case_views(session, [case for _, case in pairs])
    labels = repository.cluster_labels(
        session, cluster_ids=[c.cluster_id for _, c in pairs if c.cluster_id is not None]
    )
    out = []
    for (route, case), view in zip(pairs, views, strict=True):
        features = route.evidence.get("features") if isinstance(route.evidence, dict) else None
        reference = (
            Evidence.model_validate(features).rewritten_prompt
            if isinstance(features, dict)
            else case.prompt
        )
        out.append(
            SliceCase(
                case_id=case.id,
                prompt=case.prompt,
                reference=reference,
                scene=_scene(view.scene),
                theme=labels.get(case.cluster_id) if case.cluster_id is not None else None,
            )
        )
    return out


def routed_slices(session: Session) -> dict[Track, tuple[list[SliceCase], list[FailureCase]]]:
    """The routed cases of each track (their current route), as slices and as rows."""
    pairs = repository.latest_routes(session, case_ids=None)
    out: dict[Track, tuple[list[SliceCase], list[FailureCase]]] = {t: ([], []) for t in Track}
    for (route, case), slice_case in zip(pairs, _as_slices(session, pairs), strict=True):
        slices, rows = out[route.track]
        slices.append(slice_case)
        rows.append(case)
    return out


def case_slices(session: Session, *, case_ids: Sequence[int]) -> list[SliceCase]:
    """The slice of the given cases (judged against their current route's reference)."""
    pairs = repository.latest_routes(session, case_ids=case_ids)
    return _as_slices(session, pairs)


def plan_cycle(engine: Engine, *, config: CycleConfig, home: Path) -> CyclePlan:
    """Run the cycle's first steps in a transaction that is rolled back; the plan."""
    embedder = TextEmbedder()
    client, qdrant = QdrantClient(location=":memory:"), QdrantConfig()
    with engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        try:
            return _plan(
                session, config=config, home=home, client=client, qdrant=qdrant, embedder=embedder
            )
        finally:
            session.close()
            outer.rollback()
            client.close()


def attribution_tools(
    *,
    generator: Path,
    reward: Path,
    config: CycleConfig,
    home: Path,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
) -> tuple[EvidenceTools, list[tuple[Evidence, Track]]]:
    """The evidence tools a cycle attributes with and its seed labeled set (built once per
    model and config under ``$FLYWHEEL_HOME/attribution``; a dry run writes none)."""
    world = world_of(generator)
    probe = world_scarcity(
        client, qdrant, embedder, corpus=config.world.corpus, base=world_base_config(world)
    )
    tools = world_evidence_tools(generator, reward_dir=reward, scarcity=probe, seed=config.seed)
    seeds = seed_examples(
        tools,
        generator_dir=generator,
        reward_dir=reward,
        directory=home / "attribution",
        config=LabeledSetConfig(per_track=config.world.labeled_per_track),
        world=world,
        keep=not config.dry_run,
    )
    return tools, seeds


def collect_and_attribute(
    session: Session,
    *,
    model: ModelBundle,
    config: CycleConfig,
    home: Path,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
) -> tuple[CollectReport, AttributionReport]:
    """Signals -> cases, themes, and every open case routed (or sent to triage) by the
    classifier fitted on the seed set and the human overrides; commits as it goes."""
    collected = collect_failures(session)
    assign_themes(session, embedder=embedder)
    tools, seeds = attribution_tools(
        generator=model.generator,
        reward=model.reward,
        config=config,
        home=home,
        client=client,
        qdrant=qdrant,
        embedder=embedder,
    )
    classifier = routing_classifier(
        session, seeds, ClassifierConfig(min_confidence=config.min_confidence)
    )
    attributed = attribute_open_cases(session, gather=tools, classifier=classifier)
    return collected, attributed


def _plan(
    session: Session,
    *,
    config: CycleConfig,
    home: Path,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
) -> CyclePlan:
    model = current_model(session, shipped=shipped_base())
    assert model is not None  # registered on first use
    collected, attributed = collect_and_attribute(
        session,
        model=model,
        config=config,
        home=home,
        client=client,
        qdrant=qdrant,
        embedder=embedder,
    )
    slices = routed_slices(session)
    world = world_of(model.generator)  # the users' words and the pool of the model's world
    tracks = []
    order = (Track.RL, Track.PRETRAINING_GAP, Track.PROMPT_ENHANCER)
    # as the cycle builds it: from the train side of the split by theme
    splits, every_gate = split_tracks(
        {track: slices[track][0] for track in order},
        gate_share=config.gate.share,
        seed=config.seed,
    )
    for track in order:
        cases, rows = slices[track]
        split = splits[track]
        train = split.train
        data: dict[str, object] = {"train_cases": len(train), "gate_cases": len(split.gate)}
        round_plan: RoundPlan | None = None
        enough = len(cases) >= config.min_cases and bool(split.gate)
        if track == Track.PROMPT_ENHANCER:
            concepts = failing_concepts(train, world=world)
            data["concepts"] = concepts
            if concepts and enough:
                pe = PromptEnhancerTrackConfig.from_cycle(config)
                pairs = enhancer_pairs(concepts, pe, held_out=split.gate_keys(), world=world)
                data["pairs"] = len(pairs)
                round_plan = enhancer_round_plan(pe)
        elif track == Track.PRETRAINING_GAP and cases:
            gap = GapTrackConfig.from_cycle(config)
            asked = diagnose_gap(cases, client=client, qdrant=qdrant, config=gap)
            data["scarce"] = asked.scarce  # what all the track's cases ask for
            data["shares"] = {c.concept: round(c.share, 4) for c in asked.concepts[:3]}
            diagnosis = diagnose_gap(train, client=client, qdrant=qdrant, config=gap)
            data["scarce_in_train"] = diagnosis.scarce  # what the round would retrieve for
            if diagnosis.scarce and enough:
                index_world_pool(
                    client,
                    qdrant,
                    embedder,
                    count=config.world.pool,
                    base=world_base_config(world),
                )
                plan = plan_augmentation(
                    train,
                    diagnosis,
                    client=client,
                    qdrant=qdrant,
                    embedder=embedder,
                    config=gap,
                    held_out=split.gate_keys(),
                )
                data.update(
                    retrieved=len(plan.retrieved),
                    synthesized=plan.synthesized,
                    replay=plan.replay,
                    mixture_weight=plan.mixture_weight,
                )
                steps = {"vae": gap.vae_steps, "pretrain": gap.steps}
                round_plan = RoundPlan(
                    recipe="continued_pretraining",
                    steps=steps,
                    estimated_seconds=sum(n * SECONDS_PER_STEP[k] for k, n in steps.items()),
                )
        elif track == Track.RL:
            routed = preference_cases(session, train, every_gate=every_gate)
            preferences = preference_pairs(routed, seed=config.seed)
            data["preference_pairs"] = len(preferences)
            if preferences and enough:
                rl = RLTrackConfig.from_cycle(config)
                steps = {"reward_recalibration": rl.recalibration.steps, "flow_grpo": rl.steps}
                round_plan = RoundPlan(
                    recipe="flow_grpo",
                    steps=steps,
                    estimated_seconds=sum(n * SECONDS_PER_STEP[k] for k, n in steps.items()),
                )
        tracks.append(
            TrackPlan(
                track=track.value,
                cases=len(cases),
                mean_confidence=repository.mean_confidence(session, cases=rows),
                top_clusters=repository.top_clusters(session, cases=rows),
                data=data,
                round=round_plan,
            )
        )
    return CyclePlan(
        model=model.name,
        signals_collected=collected.signals_linked,
        cases_created=collected.cases_created,
        routed=attributed.routed,
        awaiting_triage=attributed.awaiting_triage,
        tracks=tracks,
        estimated_seconds=sum(t.round.estimated_seconds or 0.0 for t in tracks if t.round),
    )

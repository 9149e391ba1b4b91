"""One spec per track, in a registry: what a track builds from its routed cases on a
project's ports, what its round is, and how its review item is titled.

The cycle on the ports (:mod:`flywheel.cycle.stack_steps`) looks a track up in
:data:`TRACK_SPECS`; nothing branches on the track elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from qdrant_client import QdrantClient

from flywheel.db.models import Component, ReviewKind, Track
from flywheel.parts import Parts
from flywheel.ports import Recipe
from flywheel.review.edits import ArtefactEdits, EditVocabulary
from flywheel.tracks.edits import (
    edit_enhancer_pairs,
    edit_gap_data,
    edit_reward_data,
    enhancer_vocabulary,
    gap_vocabulary,
    reward_vocabulary,
)
from flywheel.tracks.enhancer_data import (
    EnhancerDataConfig,
    EnhancerPairsArtefact,
    build_enhancer_pairs,
)
from flywheel.tracks.gap_data import GapArtefact, GapDataConfig, build_gap_data
from flywheel.tracks.reward_data import RewardArtefact, RewardDataConfig, build_reward_data
from flywheel.tracks.routed import RoutedCase
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class TrackInputs:
    """What a track's artefact is built from."""

    cases: Sequence[RoutedCase]
    """The train share of the track's routed cases (the gate share is never trained on)."""
    held_out: Sequence[RoutedCase] = ()
    """The gate share: only ever judged; no artefact may train on its prompts."""
    parts: Parts
    client: QdrantClient
    qdrant: QdrantConfig
    embedder: TextEmbedder
    out_dir: Path
    """Where the artefact's files go (``$FLYWHEEL_HOME/cycles/<id>/<track>/data``)."""
    seed: int
    replay: int
    """Corpus items replayed in a data round (against forgetting)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrackSpec:
    """A track on the ports."""

    track: Track
    recipe: Recipe
    """The round's recipe (the launcher's manifest names it)."""
    component: Component
    """What the round's checkpoint replaces in the candidate."""
    review_kind: ReviewKind
    artefact_type: type[BaseModel]
    build: Callable[[TrackInputs], BaseModel | str]
    """The reviewed artefact, or why there is none."""
    files: Callable[[Any], dict[str, str]]
    """The manifest's ``artefacts``: name -> path of each input file the round reads."""
    title: Callable[[Any, int], str]
    """The review item's title (artefact, routed cases)."""
    editable: Callable[[Any], EditVocabulary]
    """The edits its review item takes (:mod:`flywheel.tracks.edits`)."""
    edit: Callable[[Any, ArtefactEdits], BaseModel]
    """The artefact as the reviewer edited it (its edited files written next to the
    reviewed ones)."""


def _enhancer(inputs: TrackInputs) -> BaseModel | str:
    return build_enhancer_pairs(
        inputs.cases,
        parts=inputs.parts,
        client=inputs.client,
        qdrant=inputs.qdrant,
        embedder=inputs.embedder,
        out_dir=inputs.out_dir,
        config=EnhancerDataConfig(seed=inputs.seed),
        held_out=inputs.held_out,
    )


def _gap(inputs: TrackInputs) -> BaseModel | str:
    return build_gap_data(
        inputs.cases,
        parts=inputs.parts,
        client=inputs.client,
        qdrant=inputs.qdrant,
        embedder=inputs.embedder,
        out_dir=inputs.out_dir,
        config=GapDataConfig(seed=inputs.seed, replay=inputs.replay),
        held_out=inputs.held_out,
    )


def _reward(inputs: TrackInputs) -> BaseModel | str:
    return build_reward_data(
        inputs.cases,
        parts=inputs.parts,
        out_dir=inputs.out_dir,
        config=RewardDataConfig(seed=inputs.seed),
    )


TRACK_SPECS: dict[Track, TrackSpec] = {
    Track.PRETRAINING_GAP: TrackSpec(
        track=Track.PRETRAINING_GAP,
        recipe="continued_pretraining",
        component=Component.GENERATOR,
        review_kind=ReviewKind.AUGMENTATION_BATCH,
        artefact_type=GapArtefact,
        build=_gap,
        files=lambda a: {"dataset": a.dataset_dir},
        title=lambda a, n: (
            f"Augmentation batch for {', '.join(a.diagnosis.scarce)}: {a.samples} samples "
            f"({len(a.retrieved)} retrieved, {sum(a.synthesized.values())} synthesized), "
            f"{n} cases"
        ),
        editable=gap_vocabulary,
        edit=edit_gap_data,
    ),
    Track.RL: TrackSpec(
        track=Track.RL,
        recipe="diffusion_dpo",
        component=Component.GENERATOR,
        review_kind=ReviewKind.REWARD_RECALIBRATION,
        artefact_type=RewardArtefact,
        build=_reward,
        files=lambda a: {"preferences": a.preferences_file},
        title=lambda a, n: f"Preference pairs and reward agreement: {a.pairs} pairs, {n} cases",
        editable=reward_vocabulary,
        edit=edit_reward_data,
    ),
    Track.PROMPT_ENHANCER: TrackSpec(
        track=Track.PROMPT_ENHANCER,
        recipe="pe_sft",
        component=Component.ENHANCER,
        review_kind=ReviewKind.PROMPT_ENHANCER_DATA,
        artefact_type=EnhancerPairsArtefact,
        build=_enhancer,
        files=lambda a: {"pairs": a.pairs_file},
        title=lambda a, n: f"Prompt-enhancer pairs: {a.pairs} pairs from {n} cases",
        editable=enhancer_vocabulary,
        edit=edit_enhancer_pairs,
    ),
}
"""Every track, by name."""

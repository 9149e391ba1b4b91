"""A project's parts, built: what the loop holds while it works on a team's stack.

:func:`build_parts` builds every port's part from the project file (:mod:`flywheel.project`)
once; :func:`index_corpus` puts the corpus' rich captions (train and pool splits, with their
tags) into the ``prompts`` vector collection, where density, tag counts and retrieval read
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qdrant_client import QdrantClient

from flywheel.adapters.base import AdapterContext
from flywheel.media.access import ImagePolicy
from flywheel.ports import (
    CaptionDegrader,
    Corpus,
    CorpusSplit,
    ImageGenerator,
    Judge,
    PortName,
    PromptEnhancer,
    PromptSuites,
    RewardModel,
    Synthesizer,
    TrainingLauncher,
)
from flywheel.project import Project, build_part
from retrieval.embedding import TextEmbedder
from retrieval.index import CORPUS, POOL, Embedders, IndexItem, IndexReport, Split, index_items
from retrieval.store import QdrantConfig

SPLITS: dict[CorpusSplit, Split] = {"train": CORPUS, "pool": POOL}
"""A corpus split -> the index's split payload."""


@dataclass(kw_only=True, slots=True)
class Parts:
    """Every part of a project, built."""

    project: Project
    context: AdapterContext
    generator: ImageGenerator
    judge: Judge
    suites: PromptSuites
    reward: RewardModel
    enhancer: PromptEnhancer
    corpus: Corpus
    degrader: CaptionDegrader
    synthesizer: Synthesizer | None
    launcher: TrainingLauncher
    images: ImagePolicy
    """Where the server may read the images apps name."""


def build_parts(project: Project, context: AdapterContext) -> Parts:
    """Build every part (:class:`~flywheel.project.ProjectError` or
    :class:`~flywheel.ports.PortError` on the first that fails)."""

    def part(port: PortName) -> Any:
        built = build_part(project, port, context)
        return built.part if built is not None else None

    return Parts(
        project=project,
        context=context,
        generator=part("generator"),
        judge=part("judge"),
        suites=part("suites"),
        reward=part("reward"),
        enhancer=part("enhancer"),
        corpus=part("corpus"),
        degrader=part("degrader"),
        synthesizer=part("synthesizer"),
        launcher=part("launcher"),
        images=ImagePolicy(project.images, home=context.home, base=project.root),
    )


def index_corpus(
    corpus: Corpus,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
    *,
    splits: tuple[CorpusSplit, ...] = ("train", "pool"),
) -> list[IndexReport]:
    """Index the corpus' rich captions and tags into ``prompts`` (only what is new or changed
    is embedded); the report of each split. An item's key is ``<split>/<id>``; its
    provenance keeps the image URI (``image``) and the item id (``item``)."""
    reports = []
    for split in splits:
        items = [
            IndexItem(
                dataset=corpus.name,
                split=SPLITS[split],
                text=item.rich_caption,
                key=f"{split}/{item.id}",
                tags=tuple(item.tags),
                provenance={**item.provenance, "image": item.image, "item": item.id},
            )
            for item in corpus.items(split)
        ]
        reports.append(index_items(client, qdrant, "prompts", items, Embedders(text=embedder)))
    return reports

"""The pretraining-gap track: what the corpus lacks, found in the pool and synthesized,
mixed into a continued-pretraining round.

1. **Diagnosis.** The concepts the routed cases ask for (in the world: the colours of their
   reference prompts) are counted in the training corpus' index (``prompts``, by tag): a
   concept whose share of the corpus is below ``scarce_below`` times the median concept's
   is scarce. The cases' own scarcity (from their evidence) is reported beside it.
2. **Augmentation.** For each scarce concept, diverse candidates are retrieved from the
   candidate pool (MMR over the pool's index, tag-filtered, near-copies of corpus items
   dropped; :func:`retrieval.augment.retrieve_for_augmentation`), and new samples are
   synthesized (world scenes drawn with the concept made common; a synthesis pipeline in
   production) to fill the augmentation budget.
3. **The round.** A dataset of ``replay`` corpus scenes plus the augmentation, so that the
   augmentation's share is ``mixture_weight``; the VAE is fine-tuned on it first (the base
   VAE, trained on a corpus with 0.17 % purple, reconstructs purple as blue: a scarce colour
   is a gap of the VAE too — measured: purple reconstruction 0 → 0.75 after 300 steps),
   then the transformer continues flow-matching pretraining on the re-encoded cache.
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from qdrant_client import QdrantClient

from flywheel.cycle.config import CycleConfig
from flywheel.tracks.routed import same_prompt_key
from flywheel.world.base_model import WorldBaseConfig, world_base
from flywheel.world.corpus import (
    IMAGES_DIR,
    annotation_for,
    reweighted,
    scene_seeds,
    write_world_corpus,
)
from flywheel.world.loop.attribution import corpus_scene_items
from flywheel.world.loop.slices import SliceCase
from flywheel.world.scenes import COLOURS, SceneConfig, captions, render, sample_scene
from model.pipeline import Generator
from retrieval.augment import AugmentConfig, Candidate, retrieve_for_augmentation
from retrieval.embedding import TextEmbedder
from retrieval.index import CORPUS, POOL, Embedders, count_tagged, index_items
from retrieval.store import QdrantConfig, collection_name
from training.data import Provenance, Sample, read_dataset, write_dataset
from training.loop import OptimizerConfig, round_loop
from training.pretrain import DataConfig, PretrainConfig
from training.vae_training import VAETrainConfig

WORLD_POOL = "world-pool"
"""The dataset name the base's candidate pool is indexed under."""


@dataclass(kw_only=True, slots=True)
class GapTrackConfig:
    """What the track retrieves, synthesizes and trains."""

    scarce_below: float = 0.5
    """A concept is scarce below this share of the median concept's corpus share."""
    replay: int = 1200
    """Corpus scenes replayed in the round (against forgetting)."""
    mixture_weight: float = 0.4
    """Share of the round's data that is augmentation."""
    retrieved_share: float = 0.5
    """Share of the augmentation retrieved from the pool (the rest is synthesized)."""
    synthesis_weight: float = 30.0
    """Weight of the scarce concept (a common one's is 1) in synthesized scenes."""
    vae_steps: int = 300
    vae_lr: float = 5e-4
    steps: int = 600
    """Continued-pretraining steps of the transformer."""
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0

    @classmethod
    def from_cycle(cls, config: CycleConfig) -> GapTrackConfig:
        """The track's config from a cycle's (its ``pretraining_gap`` section and seed)."""
        section = config.pretraining_gap
        return cls(
            steps=section.steps,
            vae_steps=section.vae_steps,
            replay=section.replay,
            batch_size=section.batch_size,
            seed=config.seed,
        )

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if not 0.0 < self.mixture_weight < 1.0 or not 0.0 <= self.retrieved_share <= 1.0:
            raise ValueError("GapTrackConfig: mixture_weight in (0, 1), retrieved_share in [0, 1]")
        if self.replay < 1 or self.steps < 1 or self.vae_steps < 0 or self.batch_size < 1:
            raise ValueError("GapTrackConfig: replay, steps, batch_size >= 1, vae_steps >= 0")
        if self.scarce_below <= 0 or self.synthesis_weight <= 0:
            raise ValueError("GapTrackConfig: scarce_below and synthesis_weight > 0")

    def augmentation(self) -> int:
        """Augmentation samples for ``replay`` at ``mixture_weight``."""
        return round(self.replay * self.mixture_weight / (1 - self.mixture_weight))


class ConceptShare(BaseModel):
    """One concept's presence in the corpus."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concept: str
    corpus_items: int
    share: float
    scarce: bool


class GapDiagnosis(BaseModel):
    """What the routed cases ask for that the corpus lacks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concepts: list[ConceptShare]
    """Every colour, rarest first."""
    scarce: list[str]
    """The scarce concepts the cases ask for."""
    corpus_items: int


def asked_colours(cases: Sequence[SliceCase]) -> set[str]:
    """The caption colours the cases' reference prompts name."""
    return {c for case in cases for c in COLOURS if c in case.reference.casefold().split()}


def diagnose_gap(
    cases: Sequence[SliceCase],
    *,
    client: QdrantClient,
    qdrant: QdrantConfig,
    config: GapTrackConfig,
) -> GapDiagnosis:
    """Count every colour in the corpus index; the scarce ones the cases ask for."""
    name = collection_name(qdrant, "prompts")
    total = count_tagged(client, name, CORPUS)
    if total == 0:
        raise ValueError(f"{name} holds no corpus items: index the corpus first")
    counts = {c: count_tagged(client, name, CORPUS, f"colour:{c}") for c in COLOURS}
    median = statistics.median(counts.values()) / total
    shares = [
        ConceptShare(
            concept=c,
            corpus_items=n,
            share=n / total,
            scarce=n / total < config.scarce_below * median,
        )
        for c, n in sorted(counts.items(), key=lambda kv: kv[1])
    ]
    asked = asked_colours(cases)
    return GapDiagnosis(
        concepts=shares,
        scarce=[s.concept for s in shares if s.scarce and s.concept in asked],
        corpus_items=total,
    )


class AugmentationPlan(BaseModel):
    """The round's data: what is replayed, retrieved and synthesized (the reviewed batch)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concepts: list[str]
    replay: int
    retrieved: list[Candidate]
    synthesized: dict[str, int]
    """New scenes per concept."""
    mixture_weight: float
    """Augmentation's share of the round's data."""


def plan_augmentation(
    cases: Sequence[SliceCase],
    diagnosis: GapDiagnosis,
    *,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
    config: GapTrackConfig,
    held_out: Collection[str] = (),
) -> AugmentationPlan:
    """Retrieve pool candidates per scarce concept (queries: the cases' references; none
    whose caption's :func:`same_prompt_key` is one of ``held_out``, the gate's prompts) and
    fill the rest of the augmentation budget with synthesized scenes."""
    config.validate()
    concepts = diagnosis.scarce
    if not concepts:
        return AugmentationPlan(
            concepts=[], replay=0, retrieved=[], synthesized={}, mixture_weight=0.0
        )
    budget = config.augmentation()
    shares = [budget // len(concepts) + (k < budget % len(concepts)) for k in range(len(concepts))]
    name = collection_name(qdrant, "prompts")
    retrieved: dict[str, Candidate] = {}
    synthesized: dict[str, int] = {}
    for concept, share in zip(concepts, shares, strict=True):
        wanted = round(share * config.retrieved_share)
        queries = [c.reference for c in cases if concept in c.reference.casefold().split()]
        found: dict[str, Candidate] = {}
        if wanted and queries:
            per_query = max(1, -(-wanted // len(queries)))
            for vector in embedder.embed(queries):
                augment = AugmentConfig(
                    limit=per_query,
                    splits=(POOL,),
                    tags_all=(f"colour:{concept}",),
                    candidates=max(100, 4 * per_query),
                )
                for candidate in retrieve_for_augmentation(
                    client, name, "text", embedder.model_id, vector, augment
                ):
                    # Only world pool scenes can be rendered; one retrieved for an earlier
                    # concept is not counted twice; none is a prompt the gate judges.
                    held = same_prompt_key(candidate.text or "") in held_out
                    if (
                        "scene_seed" in candidate.provenance
                        and candidate.key not in retrieved
                        and not held
                    ):
                        found.setdefault(candidate.key, candidate)
                if len(found) >= wanted:
                    break
        chosen = list(found.values())[:wanted]
        retrieved.update((c.key, c) for c in chosen)
        synthesized[concept] = share - len(chosen)
    return AugmentationPlan(
        concepts=list(concepts),
        replay=config.replay,
        retrieved=list(retrieved.values()),
        synthesized=synthesized,
        mixture_weight=config.mixture_weight,
    )


def write_round_dataset(
    plan: AugmentationPlan, directory: Path, *, base: WorldBaseConfig, config: GapTrackConfig
) -> Path:
    """Render the plan's samples into one dataset at ``directory`` (replayed corpus scenes,
    retrieved pool scenes, synthesized ones); returns ``directory``."""
    parts = directory / "parts"
    for stale in (parts, directory / "images"):  # a run cut short left these: start over
        if stale.exists():
            shutil.rmtree(stale)
    write_world_corpus(
        parts / "replay",
        count=plan.replay,
        config=base.corpus_scenes(),
        seed=base.seed,
        size=base.image_size,
        caption="rich",
        caption_dropout=base.caption_dropout,
        progress=False,
    )
    for concept, count in sorted(plan.synthesized.items()):
        if count > 0:
            scene = reweighted(base.scene, colours={concept: config.synthesis_weight})
            _write_scenes(
                parts / f"synth-{concept}",
                _showing(concept, scene, count=count, seed=base.seed + 1000),
                scene,
                base,
                origin="synthesized",
            )
    if plan.retrieved:
        _write_scenes(
            parts / "retrieved",
            [int(c.provenance["scene_seed"]) for c in plan.retrieved],
            base.pool_scenes_config(),
            base,
            origin="pool",
        )
    samples = []
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    for part in sorted(parts.iterdir()):
        for sample in read_dataset(part):
            target = images / f"{part.name}-{Path(sample.image).name}"
            os.link(part / sample.image, target)
            update = {"id": f"{part.name}-{sample.id}", "image": f"images/{target.name}"}
            samples.append(sample.model_copy(update=update))
    write_dataset(directory, samples)
    return directory


def _showing(concept: str, scene: SceneConfig, *, count: int, seed: int) -> list[int]:
    """The first ``count`` scene seeds (of a corpus of ``seed``) whose scene shows
    ``concept``."""
    found: list[int] = []
    batch = 2 * count
    while len(found) < count:
        if batch > 1000 * count:
            raise ValueError(f"scenes of {seed} rarely show {concept}; raise synthesis_weight")
        found = [
            s
            for s in scene_seeds(seed, batch)
            if any(o.colour == concept for o in sample_scene(s, scene).objects)
        ][:count]
        batch *= 2
    return found


def _write_scenes(
    directory: Path, seeds: Sequence[int], scene: SceneConfig, base: WorldBaseConfig, *, origin: str
) -> None:
    """The scenes of ``seeds`` as a dataset (retrieved candidates or synthesized scenes)."""
    (directory / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    samples = []
    for scene_seed in seeds:
        spec = sample_scene(scene_seed, scene)
        image = f"{IMAGES_DIR}/{origin}-{scene_seed}.png"
        render(spec, base.image_size, base.image_size).save(directory / image)
        uri = f"world:{origin}:{scene_seed}"
        samples.append(
            Sample(
                id=f"{origin}-{scene_seed}",
                image=image,
                caption=captions(spec).rich,
                annotation=annotation_for(spec),
                provenance=Provenance(dataset="world", split=origin, origin_uri=uri),
            )
        )
    write_dataset(directory, samples)


def vae_round(
    dataset: Path, *, generator: Path, base: WorldBaseConfig, config: GapTrackConfig
) -> VAETrainConfig:
    """The VAE fine-tuning on the round's dataset, from the generator's VAE (its latent
    statistics kept, so the transformer's latent space stays where it was)."""
    vae = Generator.load(generator).config.vae
    return replace(
        base.vae_stage(dataset),
        vae=vae,
        init_from=generator / "vae.safetensors",
        loop=round_loop(
            config.vae_steps,
            lr=config.vae_lr,
            seed=config.seed,
            checkpoints=1,
            optimizer=OptimizerConfig(betas=(0.5, 0.9), grad_clip=None),
        ),
    )


def transformer_round(
    cache: Path, *, generator: Path, base: WorldBaseConfig, config: GapTrackConfig
) -> PretrainConfig:
    """Continued flow-matching pretraining from the generator's transformer on ``cache``."""
    return PretrainConfig(
        model=base.transformer,
        flow=base.flow,
        init_from=generator / "transformer.safetensors",
        data=DataConfig(cache_dir=cache, batch_size=config.batch_size),
        loop=round_loop(config.steps, lr=config.lr, seed=config.seed),
    )


def index_world_pool(
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
    *,
    count: int = 2000,
    base: WorldBaseConfig | None = None,
) -> int:
    """Index the base's candidate pool (its first ``count`` scenes' rich captions and tags)
    into ``prompts`` as the pool split; returns the points added or updated."""
    base = base or world_base()
    items = corpus_scene_items(
        base.pool_scenes_config(), seed=base.seed + 1, count=count, split=POOL, dataset=WORLD_POOL
    )
    report = index_items(client, qdrant, "prompts", items, Embedders(text=embedder))
    return report.added + report.updated

"""Attribution in the world: the scarcity index of the base corpus, and the labeled set
drawn from the world's injected weaknesses.

The three weaknesses and the track each belongs to:

- **pretraining_gap**: the rare colour (purple: 0.17 % of the corpus) — colour probes of it;
- **prompt_enhancer**: the users' colour words (:mod:`flywheel.world.vocabulary`) — colour
  probes of the common colours, put in the users' words (rich or terse captions);
- **rl**: what the reward cannot see (it was trained on terse captions: no counts, no
  places) — count and relation probes; and what the generator draws, but unreliably — the
  common colours in the captions' words fail about 40 % of the time: the capability is
  there (no data gap, no wording problem) and a verifiable reward sharpens it.

A labeled case is a probe whose image (from the base model) fails the evaluator. A share of
them is presented as user feedback — a thumbs down with a flag, no intended scene — so the
classifier also learns to route cases the evaluator never saw.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qdrant_client import QdrantClient

from flywheel.attribution.evidence import CaseView, Evidence, Rarity, ScarcityProbe, term_rarity
from flywheel.db.models import Task, Track
from flywheel.world.base_model import WorldBaseConfig, world_base
from flywheel.world.benchmark import BenchmarkCase, Skill, build_case
from flywheel.world.corpus import scene_seeds, scene_tags
from flywheel.world.definition import WorldDefinition, default_world, dump_world
from flywheel.world.evaluation import generate_cases, score_case
from flywheel.world.loop.evidence import EvidenceTools, gather_evidence
from flywheel.world.scenes import COLOURS, SHAPES, SceneConfig, captions, sample_scene
from retrieval.embedding import TextEmbedder, weights_digest
from retrieval.index import CORPUS, Embedders, IndexItem, Split, count_tagged, index_items
from retrieval.scarcity import ScarcityConfig, calibration_for
from retrieval.store import QdrantConfig, collection_name
from training.io import atomic_write_bytes

LABELS_VERSION = 3
"""Bumped whenever the labeled set or the evidence changes meaning (invalidates the cached
seed sets): 2 — common-colour failures are RL examples; concept rarity is evidence; 3 — the
general lexicon rewrites, the slice disagreement is evidence."""

WORLD_CORPUS = "world-base"
"""The dataset name the base corpus' captions are indexed under."""


def corpus_scene_items(
    scene: SceneConfig, *, seed: int, count: int, split: Split, dataset: str
) -> list[IndexItem]:
    """The first ``count`` scenes of a world corpus of ``seed`` drawn with ``scene``, as index
    items of their rich captions with their scene tags (no rendering); key ``<split>/<i>``,
    the scene seed in the provenance."""
    items = []
    for i, scene_seed in enumerate(scene_seeds(seed, count)):
        spec = sample_scene(scene_seed, scene)
        items.append(
            IndexItem(
                dataset=dataset,
                split=split,
                text=captions(spec).rich,
                key=f"{split}/{i}",
                tags=scene_tags(spec),
                provenance={"scene_seed": str(scene_seed)},
            )
        )
    return items


def world_scarcity(
    client: QdrantClient,
    config: QdrantConfig,
    embedder: TextEmbedder,
    *,
    corpus: int = 1500,
    base: WorldBaseConfig | None = None,
) -> ScarcityProbe:
    """Index the first ``corpus`` captions of the base corpus into ``prompts`` (only what is
    missing is embedded) and return the scarcity probe over them."""
    base = base or world_base()
    items = corpus_scene_items(
        base.corpus_scenes(), seed=base.seed, count=corpus, split=CORPUS, dataset=WORLD_CORPUS
    )
    index_items(client, config, "prompts", items, Embedders(text=embedder))
    scarcity_config = ScarcityConfig()
    name = collection_name(config, "prompts")
    calibration = calibration_for(client, name, "text", embedder.model_id, scarcity_config)
    return ScarcityProbe(
        client=client, calibration=calibration, embedder=embedder, config=scarcity_config
    )


@dataclass(kw_only=True, slots=True)
class LabeledSetConfig:
    """How many labeled cases to draw, and from where."""

    per_track: int = 24
    """Failing cases kept per track."""
    band: int = 70_000_000
    """Seed band of the probes (a held-out set takes another band)."""
    feedback_share: float = 0.34
    """Share of the cases presented as user feedback (no intended scene)."""
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.per_track < 2:
            raise ValueError("LabeledSetConfig.per_track must be >= 2")
        if not 0.0 <= self.feedback_share <= 1.0:
            raise ValueError("LabeledSetConfig.feedback_share must be in [0, 1]")


RL_SKILLS: tuple[Skill, ...] = ("count", "relation")
"""Probe skills whose failures are the RL track's where the world's reward is blind to them."""


def _candidates(
    config: LabeledSetConfig, world: WorldDefinition, rng: random.Random
) -> list[tuple[BenchmarkCase, Track]]:
    """Probes of each of ``world``'s weaknesses, more than needed (some pass and are
    dropped): its rare colours' and shapes' probes (the gap), its common colours in its users'
    words (the enhancer) and, for RL, the skills its reward is blind to and the common colours
    in the captions' words (drawn, but unreliably: a verifiable reward sharpens them). An
    enhancer or RL probe that also shows a rare concept is left out: its failure would have
    two causes and its label only one."""
    n = config.per_track * 2
    vocabulary = world.user_vocabulary()
    rare = {f"colour:{c}" for c in world.rare.colours} | {f"shape:{s}" for s in world.rare.shapes}

    def clean(case: BenchmarkCase) -> bool:
        """The case shows none of the rare concepts: its failure has one cause."""
        return not rare & set(scene_tags(case.spec))

    out: list[tuple[BenchmarkCase, Track]] = []
    colours = [
        build_case("colour", k, band=config.band, case_id=f"labeled/colour/{k}")
        for k in range(7 * n)
    ]
    gap = [c for c in colours if c.focus in world.rare.colours]
    if world.rare.shapes:
        shapes = [
            build_case("shape", k, band=config.band, case_id=f"labeled/shape/{k}")
            for k in range(len(SHAPES) * n)
        ]
        gap += [c for c in shapes if c.focus in world.rare.shapes]
        rng.shuffle(gap)
    out += [(c, Track.PRETRAINING_GAP) for c in gap[:n]]
    common = [c for c in colours if c.focus not in world.rare.colours and clean(c)]
    worded = [c for c in common if c.focus in world.vocabulary]
    for k, case in enumerate(worded[:n]):
        caption = captions(case.spec).terse if k % 2 else case.prompt
        user = case.model_copy(update={"prompt": vocabulary.to_user_words(caption, rng)})
        out.append((user, Track.PROMPT_ENHANCER))
    # RL: what the reward misjudges and what the generator can draw but draws unreliably,
    # interleaved so the kept cases mix both.
    taken = {c.id for c in worded[:n]}
    rl = [(c, Track.RL) for c in common if c.id not in taken][:n]
    blind = [skill for skill in RL_SKILLS if skill in world.reward.blind_to()]
    for skill in blind:
        probes = [
            build_case(skill, k, band=config.band, case_id=f"labeled/{skill}/{k}")
            for k in range(2 * n // len(blind))
        ]
        rl += [(c, Track.RL) for c in probes if clean(c)][: n // len(blind)]
    rng.shuffle(rl)
    return out + rl


_FLAG = {"colour": "wrong_color", "count": "wrong_count"}


def labeled_views(
    tools: EvidenceTools, config: LabeledSetConfig, *, world: WorldDefinition | None = None
) -> list[tuple[CaseView, Track]]:
    """The labeled cases of ``world`` (default: the default world): probes its base (the
    tools' generator) fails, ``per_track`` of each track (fewer where the candidates run
    out), a share of them as feedback."""
    config.validate()
    rng = random.Random(config.seed)
    candidates = _candidates(config, world or default_world(), rng)
    generated = generate_cases(
        tools.generator, [c for c, _ in candidates], seed=config.seed, batch_size=tools.batch_size
    )
    kept: dict[Track, list[BenchmarkCase]] = {t: [] for t in Track}
    for item, (_, track) in zip(generated, candidates, strict=True):
        full = len(kept[track]) >= config.per_track
        if not full and not score_case(item.case, item.image, evaluator=tools.evaluator).passed:
            kept[track].append(item.case)
    out = []
    for track, cases in kept.items():
        for case in cases:
            if rng.random() < config.feedback_share:
                view = CaseView(
                    case_id=None,
                    task=Task.TEXT_TO_IMAGE,
                    prompt=case.prompt,
                    skill=None,
                    sources={"feedback": 1},
                    negative_feedback=1,
                    flags=(_FLAG.get(case.skill, "other"),),
                )
            else:
                view = CaseView(
                    case_id=None,
                    task=Task.TEXT_TO_IMAGE,
                    prompt=case.prompt,
                    skill=case.skill,
                    scene=case.model_dump(mode="json"),
                    sources={"mining": 1},
                )
            out.append((view, track))
    rng.shuffle(out)  # batches mix the tracks, as a cycle's cases do
    return out


def labeled_examples(
    tools: EvidenceTools, config: LabeledSetConfig, *, world: WorldDefinition | None = None
) -> list[tuple[Evidence, Track]]:
    """:func:`labeled_views` with their evidence gathered."""
    views = labeled_views(tools, config, world=world)
    evidence = gather_evidence([v for v, _ in views], tools)
    return [(e, t) for e, (_, t) in zip(evidence, views, strict=True)]


def write_examples(path: Path, examples: Sequence[tuple[Evidence, Track]]) -> None:
    """Store labeled examples as JSON lines (``{"track": ..., "evidence": {...}}``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"track": t.value, "evidence": e.model_dump(mode="json")}) + "\n"
        for e, t in examples
    ]
    atomic_write_bytes(path, "".join(lines).encode())


def read_examples(path: Path) -> list[tuple[Evidence, Track]]:
    """Labeled examples :func:`write_examples` stored."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
            out.append((Evidence.model_validate(row["evidence"]), Track(row["track"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a labeled example ({exc})") from None
    return out


def world_evidence_tools(
    generator_dir: Path,
    *,
    reward_dir: Path,
    scarcity: ScarcityProbe | None,
    seed: int = 0,
) -> EvidenceTools:
    """The evidence tools of the world: the generator under test, the ground-truth evaluator,
    the reward model, the general colour lexicon as the rewrite test's rewriter (it knows no
    world's users' words) and the corpus' scarcity."""
    from flywheel.world.base_model import load_world_reward
    from flywheel.world.evaluator import load_evaluator
    from flywheel.world.lexicon import lexicon_rewrites
    from model.pipeline import Generator

    return EvidenceTools(
        generator=Generator.load(generator_dir),
        evaluator=load_evaluator(),
        reward=load_world_reward(reward_dir),
        rewriter=lexicon_rewrites,
        scarcity=scarcity,
        rarity=(
            world_rarity(scarcity.client, scarcity.calibration.collection)
            if scarcity is not None
            else None
        ),
        term_rarity=(
            term_rarity(scarcity.client, scarcity.calibration.collection, dataset=WORLD_CORPUS)
            if scarcity is not None
            else None
        ),
        seed=seed,
    )


_COLOUR_WORD = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)


def world_rarity(client: QdrantClient, collection: str) -> Rarity:
    """Concept rarity from the corpus index's colour tags: per prompt, the corpus count of
    the rarest colour it names over the median colour's (None: it names no colour)."""
    counts = {c: count_tagged(client, collection, CORPUS, f"colour:{c}") for c in COLOURS}
    median = statistics.median(counts.values())

    def rarity(prompts: Sequence[str]) -> list[float | None]:
        out: list[float | None] = []
        for prompt in prompts:
            named = {m.casefold() for m in _COLOUR_WORD.findall(prompt)}
            out.append(min(counts[c] / median for c in named) if named and median else None)
        return out

    return rarity


def seed_examples(
    tools: EvidenceTools,
    *,
    generator_dir: Path,
    reward_dir: Path,
    directory: Path,
    config: LabeledSetConfig | None = None,
    world: WorldDefinition | None = None,
    keep: bool = True,
) -> list[tuple[Evidence, Track]]:
    """The labeled set as the classifier's seed examples, built once per generator, reward,
    corpus index, tools and config, and kept under ``directory``
    (``labeled-<generator digest>-<key digest>.jsonl``; ``keep=False``: read if there, never
    written — a dry run)."""
    config = config or LabeledSetConfig()
    world = world or default_world()
    identity = {
        "labels": LABELS_VERSION,
        "world": dump_world(world),
        **{f: getattr(config, f) for f in LabeledSetConfig.__dataclass_fields__},
        "reward": weights_digest(reward_dir),
        "tools": {
            "seed": tools.seed,
            "batch_size": tools.batch_size,
            "rewrite_seeds": tools.rewrite_seeds,
        },
        "corpus": (
            {
                "collection": tools.scarcity.calibration.collection,
                "points": len(tools.scarcity.calibration.knn_similarities),
                "radius": tools.scarcity.calibration.radius,
            }
            if tools.scarcity is not None
            else None
        ),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    path = directory / f"labeled-{weights_digest(generator_dir)}-{key}.jsonl"
    if path.is_file():
        return read_examples(path)
    examples = labeled_examples(tools, config, world=world)
    if keep:
        write_examples(path, examples)
    return examples


def world_labeled_set(
    world: WorldDefinition,
    *,
    generator: Path,
    reward: Path,
    config: LabeledSetConfig,
    embedder: TextEmbedder,
    corpus: int = 1500,
    seed: int = 0,
) -> list[tuple[Evidence, Track]]:
    """The labeled set of ``world`` drawn from its base (``generator`` and ``reward``
    directories), its evidence gathered with that world's own corpus index (its first
    ``corpus`` captions, in a Qdrant of its own, in memory): what a classifier fitted on
    another world is measured on."""
    from flywheel.world.base_model import world_base_config

    client = QdrantClient(location=":memory:")
    try:
        probe = world_scarcity(
            client, QdrantConfig(), embedder, corpus=corpus, base=world_base_config(world)
        )
        tools = world_evidence_tools(generator, reward_dir=reward, scarcity=probe, seed=seed)
        return labeled_examples(tools, config, world=world)
    finally:
        client.close()

"""The tracks' artefacts built from the ports: enhancer pairs from a team's corpus, preference
pairs and the reward's agreement from the cases' own feedback.

Real parts throughout: a dataset directory written here, the rules degrader, the world's
open_clip reward, MiniLM over an in-memory Qdrant, and an image policy with one file root.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from qdrant_client import QdrantClient

from flywheel.adapters.base import AdapterContext
from flywheel.adapters.datasets import DIRECTORY, write_records
from flywheel.adapters.degrader import RULES
from flywheel.media.access import ImageAccessConfig, ImagePolicy
from flywheel.parts import Parts, index_corpus
from flywheel.ports import CorpusItem, PortName
from flywheel.project import build_part, world_project
from flywheel.tracks.enhancer_data import (
    EnhancerDataConfig,
    EnhancerPairsArtefact,
    build_enhancer_pairs,
)
from flywheel.tracks.reward_data import (
    PreferencePair,
    RewardArtefact,
    RewardDataConfig,
    build_reward_data,
    image_tensor,
)
from flywheel.tracks.routed import CaseFeedback, RoutedCase
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig
from training.pe_sft import read_pairs

RGB = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "purple": (130, 40, 170),
    "orange": (240, 140, 20),
    "yellow": (235, 220, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
PLACES = ("at the top left", "in the middle", "at the bottom right", "at the middle left")
SIZES = ("large", "small")


def _caption(colour: str, shape: str, n: int) -> str:
    return (
        f"A picture with a grey background showing a {SIZES[n % 2]} {colour} {shape} "
        f"{PLACES[n % len(PLACES)]}."
    )


def _png(path: Path, colour: tuple[int, int, int], size: int = 32) -> Path:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((size // 6, size // 6, size * 5 // 6, size * 5 // 6), colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@dataclass(kw_only=True, slots=True)
class World:
    parts: Parts
    corpus: dict[str, CorpusItem]
    client: QdrantClient
    qdrant: QdrantConfig
    embedder: TextEmbedder
    images: Path
    outside: Path
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("track-data")
    home, data, images = tmp / "home", tmp / "corpus", tmp / "feedback"
    home.mkdir()
    items: list[CorpusItem] = []
    for c, colour in enumerate(RGB):
        for s, shape in enumerate(SHAPES):
            n = c + s
            _png(data / "images" / f"{colour}-{shape}.png", RGB[colour], 16)
            items.append(
                CorpusItem(
                    id=f"{colour}-{shape}",
                    image=f"images/{colour}-{shape}.png",
                    rich_caption=_caption(colour, shape, n),
                    raw_caption=f"{colour} {shape}",
                    tags=[f"colour:{colour}", f"shape:{shape}"],
                )
            )
    for shape in SHAPES:  # pool items as close to the cases as can be: never a source
        items.append(
            CorpusItem(
                id=f"pool-purple-{shape}",
                image=f"images/purple-{shape}.png",
                rich_caption=f"A purple {shape}.",
                tags=["colour:purple"],
                split="pool",
            )
        )
    write_records(data, items)
    context = AdapterContext(root=tmp, home=home)
    project = world_project()

    def part(port: PortName) -> Any:
        built = build_part(project, port, context)
        assert built is not None
        return built.part

    corpus = DIRECTORY.build(DIRECTORY.settings.model_validate({"path": str(data)}), context)
    degrader = RULES.build(
        RULES.settings.model_validate({"synonyms": {"purple": ["violet"], "orange": ["amber"]}}),
        context,
    )
    parts = Parts(
        project=project,
        context=context,
        generator=part("generator"),
        judge=part("judge"),
        suites=part("suites"),
        reward=part("reward"),
        enhancer=part("enhancer"),
        corpus=corpus,
        degrader=degrader,
        synthesizer=None,
        launcher=part("launcher"),
        images=ImagePolicy(ImageAccessConfig(file_roots=[images]), home=home),
    )
    client, qdrant, embedder = QdrantClient(location=":memory:"), QdrantConfig(), TextEmbedder()
    index_corpus(corpus, client, qdrant, embedder)
    for name in ("purple", "green", "red", "blue"):
        _png(images / f"{name}.png", RGB[name])
    _png(images / "red-2.png", RGB["red"], 40)
    _png(images / "blue-small.png", RGB["blue"], 24)  # another size: resized to the chosen one
    (images / "broken.png").write_bytes(b"not an image at all")
    outside = _png(tmp / "elsewhere" / "purple.png", RGB["purple"])
    return World(
        parts=parts,
        corpus={item.id: item for item in items},
        client=client,
        qdrant=qdrant,
        embedder=embedder,
        images=images,
        outside=outside,
        tmp=tmp,
    )


# ---- enhancer pairs ---------------------------------------------------------------------------

STAR = _caption("purple", "star", 3 + 3)
CASES = (
    RoutedCase(
        case_id=7, prompt="violet triangle", reference="a purple triangle", theme="colour:purple"
    ),
    # its reference is a corpus caption word for word: that item's pair is held out
    RoutedCase(case_id=3, prompt="violet star", reference=STAR, theme="colour:purple"),
)
CONFIG = EnhancerDataConfig(pairs_per_case=6, echo_share=0.5, seed=0, min_pairs=4)


def _build(world: World, out: Path, config: EnhancerDataConfig = CONFIG) -> EnhancerPairsArtefact:
    built = build_enhancer_pairs(
        CASES,
        parts=world.parts,
        client=world.client,
        qdrant=world.qdrant,
        embedder=world.embedder,
        out_dir=out,
        config=config,
    )
    assert isinstance(built, EnhancerPairsArtefact), built
    return built


def _key(text: str) -> str:
    words = re.findall(r"\w+", text.lower())
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def _expected_nearest(world: World, k: int) -> set[str]:
    """Each case's k nearest train captions by exact cosine (best over reference and prompt)."""
    train = [item for item in world.corpus.values() if item.split == "train"]
    captions = world.embedder.embed([item.rich_caption for item in train])
    out: set[str] = set()
    for case in CASES:
        queries = world.embedder.embed([case.reference, case.prompt])
        best = (queries @ captions.T).max(axis=0)
        order = np.lexsort(([item.id for item in train], -best))
        out |= {train[i].id for i in order[:k]}
    return out


def test_enhancer_pairs_degrade_the_captions_of_the_corpus_items_nearest_the_failing_themes(
    world: World, tmp_path: Path
) -> None:
    artefact = _build(world, tmp_path)
    held = world.corpus["purple-star"]
    assert held.rich_caption == STAR
    nearest = _expected_nearest(world, CONFIG.pairs_per_case)
    # "a violet triangle" (purple-triangle degraded) is case 7's prompt: held out too
    held_out = {held.id, "purple-triangle"}
    assert held_out <= nearest
    assert set(artefact.source_items) == nearest - held_out
    assert artefact.held_out == 2
    assert not any(i.startswith("pool-") for i in artefact.source_items + artefact.echo_items)
    for item in artefact.source_items:  # MiniLM weighs the shape, then the colour
        assert {"colour:purple", "shape:triangle", "shape:star"} & set(world.corpus[item].tags)
    assert artefact.themes == ["colour:purple"]
    assert artefact.cases == [3, 7]

    pairs = read_pairs(Path(artefact.pairs_file))  # what the pe_sft runner reads
    assert len(pairs) == artefact.pairs == artefact.degraded + artefact.echo
    routed = {_key(t) for case in CASES for t in (case.prompt, case.reference)}
    assert not routed & {_key(text) for pair in pairs for text in pair}
    degraded = [(p, t) for p, t in pairs if p != t]
    assert len(degraded) == artefact.degraded == len(artefact.source_items)
    sources = {world.corpus[i].rich_caption for i in artefact.source_items}
    assert {t for _, t in degraded} == sources
    for prompt, target in degraded:
        assert prompt == world.parts.degrader.degrade([target], seed=0)[0]
        assert len(prompt.split()) < len(target.split())
        assert ("violet" in prompt) == ("purple" in target)
        assert "picture" not in prompt


def test_echo_pairs_are_other_train_captions_at_the_configured_share(
    world: World, tmp_path: Path
) -> None:
    artefact = _build(world, tmp_path)
    pairs = read_pairs(Path(artefact.pairs_file))
    echoes = [(p, t) for p, t in pairs if p == t]
    assert len(echoes) == artefact.echo == round(CONFIG.echo_share * artefact.degraded)
    assert artefact.echo > 0
    assert not set(artefact.echo_items) & set(artefact.source_items)
    assert {t for _, t in echoes} == {world.corpus[i].rich_caption for i in artefact.echo_items}
    none = _build(
        world, tmp_path / "none", EnhancerDataConfig(pairs_per_case=6, echo_share=0.0, min_pairs=4)
    )
    assert none.echo == 0
    assert none.pairs == none.degraded == artefact.degraded


def test_the_pairs_file_and_the_artefact_are_on_disk_in_the_documented_format(
    world: World, tmp_path: Path
) -> None:
    artefact = _build(world, tmp_path)
    assert Path(artefact.pairs_file) == tmp_path / "pairs.jsonl"
    lines = (tmp_path / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == artefact.pairs
    records = [json.loads(line) for line in lines]
    assert all(set(r) == {"prompt", "target"} for r in records)
    assert records[:8] == [e.model_dump() for e in artefact.examples]
    on_disk = json.loads((tmp_path / "artefact.json").read_text(encoding="utf-8"))
    assert set(on_disk) == {
        "themes",
        "pairs",
        "degraded",
        "echo",
        "held_out",
        "examples",
        "pairs_file",
        "source_items",
        "echo_items",
        "cases",
    }
    assert EnhancerPairsArtefact.model_validate(on_disk) == artefact


def test_the_same_seed_gives_the_same_pairs_and_another_seed_another_order(
    world: World, tmp_path: Path
) -> None:
    first = _build(world, tmp_path / "a")
    again = _build(world, tmp_path / "b")
    other = _build(
        world,
        tmp_path / "c",
        EnhancerDataConfig(pairs_per_case=6, echo_share=0.5, seed=5, min_pairs=4),
    )
    text = (tmp_path / "a" / "pairs.jsonl").read_bytes()
    assert (tmp_path / "b" / "pairs.jsonl").read_bytes() == text
    assert again.model_copy(update={"pairs_file": first.pairs_file}) == first
    assert (tmp_path / "c" / "pairs.jsonl").read_bytes() != text
    assert other.source_items == first.source_items


def test_no_enhancer_artefact_without_cases_an_index_or_enough_pairs(
    world: World, tmp_path: Path
) -> None:
    def build(
        cases: tuple[RoutedCase, ...], client: QdrantClient, config: EnhancerDataConfig = CONFIG
    ) -> EnhancerPairsArtefact | str:
        return build_enhancer_pairs(
            cases,
            parts=world.parts,
            client=client,
            qdrant=world.qdrant,
            embedder=world.embedder,
            out_dir=tmp_path,
            config=config,
        )

    assert build((), world.client) == "no routed cases"
    empty = build(CASES, QdrantClient(location=":memory:"))
    assert isinstance(empty, str)
    assert "not indexed" in empty
    few = build(CASES, world.client, EnhancerDataConfig(pairs_per_case=2, min_pairs=10))
    assert isinstance(few, str)
    assert "fewer than min_pairs (10)" in few
    assert not (tmp_path / "pairs.jsonl").exists()


# ---- preference pairs and reward agreement ----------------------------------------------------


def _uri(path: Path) -> str:
    return path.resolve().as_uri()


def _feedback_cases(world: World) -> list[RoutedCase]:
    img = {p.stem: _uri(p) for p in world.images.iterdir()}
    return [
        RoutedCase(
            case_id=10,
            prompt="a purple circle",
            reference="a purple circle",
            theme="colour:purple",
            feedback=(
                CaseFeedback(
                    kind="pairwise",
                    chosen_image_uri=img["purple"],
                    rejected_image_uri=img["green"],
                    flags=("colour",),
                ),
                CaseFeedback(kind="comment"),
            ),
        ),
        RoutedCase(
            case_id=11,
            prompt="a red circle",
            reference="a red circle",
            theme="colour:red",
            feedback=(
                CaseFeedback(kind="thumbs", image_uri=img["red"], thumbs_up=True),
                CaseFeedback(kind="rating", image_uri=img["red-2"], rating=5),
                CaseFeedback(
                    kind="thumbs",
                    image_uri=img["blue-small"],
                    thumbs_up=False,
                    flags=("wrong_colour",),
                ),
            ),
        ),
        RoutedCase(  # the disliked image lies outside the roots: refused, never read
            case_id=12,
            prompt="a blue circle",
            reference="a blue circle",
            theme="colour:blue",
            feedback=(
                CaseFeedback(kind="rating", image_uri=img["blue"], rating=5),
                CaseFeedback(kind="rating", image_uri=_uri(world.outside), rating=1),
                CaseFeedback(kind="rating", image_uri=img["green"], rating=3),
            ),
        ),
        RoutedCase(  # one side per prompt: paired within the theme, under the disliked prompt
            case_id=13,
            prompt="a purple square",
            reference="a purple square",
            theme="colour:purple",
            image_uri=img["green"],
            feedback=(CaseFeedback(kind="thumbs", thumbs_up=False),),
        ),
        RoutedCase(
            case_id=14,
            prompt="violet square",
            reference="a purple square",
            theme="colour:purple",
            feedback=(CaseFeedback(kind="rating", image_uri=img["purple"], rating=4),),
        ),
        RoutedCase(  # not an image: unreadable, skipped
            case_id=15,
            prompt="a green circle",
            reference="a green circle",
            feedback=(
                CaseFeedback(
                    kind="pairwise",
                    chosen_image_uri=img["green"],
                    rejected_image_uri=img["broken"],
                ),
            ),
        ),
    ]


def _reward(world: World, out: Path, config: RewardDataConfig | None = None) -> RewardArtefact:
    built = build_reward_data(
        _feedback_cases(world),
        parts=world.parts,
        out_dir=out,
        config=config or RewardDataConfig(min_comparisons=1),
    )
    assert isinstance(built, RewardArtefact), built
    return built


def _prefers(world: World, prompt: str, chosen: str, rejected: str) -> bool:
    """The reward's own verdict on one pair (images opened directly: the test wrote them)."""
    good = Image.open(world.images / f"{chosen}.png")
    bad = Image.open(world.images / f"{rejected}.png")
    images = torch.stack([image_tensor(good), image_tensor(bad, good.size)])
    scores = world.parts.reward.score(images, [prompt, prompt])
    return float(scores[0]) > float(scores[1])


def test_pairwise_thumbs_and_ratings_become_preference_pairs_with_the_right_sides(
    world: World, tmp_path: Path
) -> None:
    artefact = _reward(world, tmp_path)
    lines = (tmp_path / "preferences.jsonl").read_text(encoding="utf-8").splitlines()
    assert all(
        set(json.loads(line)) == {"prompt", "chosen", "rejected", "source", "category", "case_id"}
        for line in lines
    )
    pairs = [PreferencePair.model_validate_json(line) for line in lines]
    img = {p.stem: _uri(p) for p in world.images.iterdir()}
    got = {(p.prompt, p.chosen, p.rejected, p.source, p.category, p.case_id) for p in pairs}
    assert got == {
        ("a purple circle", img["purple"], img["green"], "pairwise", "colour", 10),
        ("a red circle", img["red"], img["blue-small"], "thumbs", "wrong_colour", 11),
        ("a red circle", img["red-2"], img["blue-small"], "thumbs", "wrong_colour", 11),
        ("a purple square", img["purple"], img["green"], "thumbs", "colour:purple", 13),
    }
    assert len(pairs) == artefact.pairs == 4
    assert artefact.by_source == {"pairwise": 1, "thumbs": 3}
    assert artefact.comparisons == {"colour": 1, "colour:purple": 1, "wrong_colour": 2}
    assert artefact.cases == [10, 11, 13]
    assert Path(artefact.preferences_file) == tmp_path / "preferences.jsonl"
    on_disk = RewardArtefact.model_validate_json((tmp_path / "artefact.json").read_text())
    assert on_disk == artefact


def test_the_reward_agreement_is_the_share_of_pairs_where_the_preferred_image_scores_higher(
    world: World, tmp_path: Path
) -> None:
    artefact = _reward(world, tmp_path)
    agreement = artefact.agreement
    assert agreement.comparisons == artefact.comparisons
    expected = {
        "colour": float(_prefers(world, "a purple circle", "purple", "green")),
        "colour:purple": float(_prefers(world, "a purple square", "purple", "green")),
        "wrong_colour": (
            _prefers(world, "a red circle", "red", "blue-small")
            + _prefers(world, "a red circle", "red-2", "blue-small")
        )
        / 2,
    }
    assert agreement.agreement == pytest.approx(expected)
    assert all(0.0 <= value <= 1.0 for value in agreement.agreement.values())
    assert artefact.weights == pytest.approx(
        {c: max(0.0, a - 0.5) * 2 for c, a in expected.items()}
    )
    few = _reward(world, tmp_path / "min2", RewardDataConfig(min_comparisons=2))
    assert few.agreement.comparisons == {"wrong_colour": 2}
    assert set(few.weights) == {"wrong_colour"}
    assert few.comparisons == artefact.comparisons


def test_images_the_policy_refuses_or_cannot_read_are_skipped_and_counted(
    world: World, tmp_path: Path
) -> None:
    artefact = _reward(world, tmp_path)
    assert artefact.unreadable == 2 == len(artefact.unreadable_images)
    assert artefact.dropped == 2
    by_uri = {u.uri: u for u in artefact.unreadable_images}
    refused = by_uri[_uri(world.outside)]
    assert refused.refused
    assert "outside the allowed roots" in refused.reason
    broken = by_uri[_uri(world.images / "broken.png")]
    assert not broken.refused
    assert "not an image" in broken.reason
    text = (tmp_path / "preferences.jsonl").read_text(encoding="utf-8")
    assert _uri(world.outside) not in text
    assert "broken.png" not in text


def test_the_same_feedback_gives_the_same_preferences_file(world: World, tmp_path: Path) -> None:
    _reward(world, tmp_path / "a")
    _reward(world, tmp_path / "b")
    assert (tmp_path / "a" / "preferences.jsonl").read_bytes() == (
        tmp_path / "b" / "preferences.jsonl"
    ).read_bytes()


def test_no_reward_artefact_without_a_pair_or_without_a_readable_one(
    world: World, tmp_path: Path
) -> None:
    config = RewardDataConfig(min_comparisons=1)
    lonely = RoutedCase(
        case_id=1,
        prompt="a red circle",
        reference="a red circle",
        feedback=(
            CaseFeedback(kind="thumbs", image_uri=_uri(world.images / "red.png"), thumbs_up=True),
        ),
    )
    none = build_reward_data([lonely], parts=world.parts, out_dir=tmp_path, config=config)
    assert isinstance(none, str)
    assert none.startswith("no preference pair")
    hidden = RoutedCase(
        case_id=2,
        prompt="a purple circle",
        reference="a purple circle",
        feedback=(
            CaseFeedback(
                kind="pairwise",
                chosen_image_uri=_uri(world.outside),
                rejected_image_uri="http://images.example.com/x.png",
            ),
        ),
    )
    unread = build_reward_data([hidden], parts=world.parts, out_dir=tmp_path, config=config)
    assert isinstance(unread, str)
    assert "none with both images readable" in unread
    assert "2 image(s) skipped" in unread
    assert not (tmp_path / "preferences.jsonl").exists()

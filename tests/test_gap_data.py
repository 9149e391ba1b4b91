"""The pretraining-gap track on the ports (:mod:`flywheel.tracks.gap_data`), on real parts:
a dataset directory the test writes (a colour rare in train, plentiful in the pool, and pool
items the filter chain must drop), the world's reward and synthesizer, an in-memory Qdrant
indexed with :func:`flywheel.parts.index_corpus`, and the packaged MiniLM embedder."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw
from qdrant_client import QdrantClient

from flywheel.adapters.base import AdapterContext
from flywheel.adapters.datasets import RECORDS_FILE, DirectoryCorpus, write_records
from flywheel.media.access import ImagePolicy
from flywheel.media.filters import FILTERS, FilterThresholds
from flywheel.parts import Parts, index_corpus
from flywheel.ports import CorpusItem, CorpusSplit, PortError, PortName
from flywheel.project import Project, build_part, world_project
from flywheel.tracks.gap_data import (
    ARTEFACT_FILE,
    DATASET_DIR,
    GapArtefact,
    GapDataConfig,
    build_gap_data,
    count_tags,
)
from flywheel.tracks.routed import RoutedCase
from retrieval.embedding import TextEmbedder
from retrieval.index import CORPUS
from retrieval.store import QdrantConfig, collection_name
from training.data import read_dataset

RGB = {
    "red": (210, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
COMMON = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large", "medium-sized", "tiny", "huge")
PLACES = ("in the centre", "near the top left", "at the bottom right", "on the left edge")
BACKDROPS = ("grainy grey", "speckled beige", "noisy dark", "dusty white", "mottled teal")
LIGHT = ("under soft daylight", "in harsh flash", "at dusk", "under studio lamps")

BAD = {
    "pool-broken": "broken",
    "pool-small": "resolution",
    "pool-copy": "near_duplicate",
    "pool-flat": "flat",
    "pool-short": "caption_length",
}
"""The pool's bad purple items -> the filter that must drop them (and one of two twins:
``near_duplicate``)."""


def _draw(seed: int, colour: str, shape: str, size: int = 64) -> Image.Image:
    """Noise with a filled shape of ``colour``: distinct, never a near-duplicate."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    a, b = int(rng.integers(4, size // 3)), int(rng.integers(size // 2, size - 4))
    if shape == "circle":
        draw.ellipse((a, a, b, b), fill=RGB[colour])
    elif shape == "square":
        draw.rectangle((a, a, b, b), fill=RGB[colour])
    else:
        draw.polygon([(a, b), (b, b), ((a + b) // 2, a)], fill=RGB[colour])
    return image


def _caption(rng: random.Random, colour: str, shape: str) -> str:
    return (
        f"A {rng.choice(SIZES)} {colour} {shape} {rng.choice(PLACES)} on a "
        f"{rng.choice(BACKDROPS)} backdrop, photographed {rng.choice(LIGHT)}"
    )


def write_corpus(directory: Path) -> DirectoryCorpus:
    """60 train items (2 purple), a pool of 20 good purple items, 10 of other colours and the
    bad purple items of :data:`BAD`."""
    (directory / "images").mkdir(parents=True)
    rng = random.Random(7)
    items: list[CorpusItem] = []
    seed = 0

    def add(
        item_id: str,
        split: CorpusSplit,
        colour: str,
        shape: str,
        *,
        image: Image.Image | None = None,
        caption: str | None = None,
    ) -> None:
        nonlocal seed
        seed += 1
        path = f"images/{item_id}.png"
        (image or _draw(seed, colour, shape)).save(directory / path)
        items.append(
            CorpusItem(
                id=item_id,
                image=path,
                rich_caption=caption or _caption(rng, colour, shape),
                raw_caption=f"{colour} {shape}",
                tags=[f"colour:{colour}", f"shape:{shape}"],
                split=split,
                provenance={"source": "test"},
            )
        )

    for i in range(60):
        colour = "purple" if i in (5, 40) else COMMON[i % 4]
        add(f"train-{i:02d}", "train", colour, SHAPES[i % 3])
    for i in range(20):
        add(f"pool-purple-{i:02d}", "pool", "purple", SHAPES[i % 3])
    for i in range(10):
        add(f"pool-other-{i:02d}", "pool", COMMON[i % 4], SHAPES[i % 3])
    add("pool-broken", "pool", "purple", "circle")
    (directory / "images/pool-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    add("pool-small", "pool", "purple", "square", image=_draw(901, "purple", "square", size=16))
    copied = Image.open(directory / "images/train-05.png").copy()
    add(
        "pool-copy",
        "pool",
        "purple",
        SHAPES[5 % 3],
        image=copied,
        caption="Another upload of an older purple triangle photo, cropped the same way",
    )
    twin = _draw(902, "purple", "circle")
    add("pool-twin-a", "pool", "purple", "circle", image=twin)
    add("pool-twin-b", "pool", "purple", "circle", image=twin)
    add("pool-flat", "pool", "purple", "square", image=Image.new("RGB", (64, 64), RGB["purple"]))
    add("pool-short", "pool", "purple", "circle", caption="purple blob")
    write_records(directory, items)
    return DirectoryCorpus(directory, name="team-data")


CASES = [
    RoutedCase(
        case_id=i,
        prompt=f"purple {shape}",
        reference=f"A {size} purple {shape} in the centre on a grainy grey backdrop",
    )
    for i, (shape, size) in enumerate(
        [("circle", "large"), ("square", "small"), ("triangle", "large"), ("circle", "tiny")],
        start=1,
    )
]


@dataclass(kw_only=True, slots=True)
class World:
    """What every test shares: the embedder and the world's parts."""

    embedder: TextEmbedder
    parts: Parts
    synthesizer: Parts


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("parts")
    context = AdapterContext(root=root, home=root / "home")
    project = world_project()

    def part(port: PortName) -> Any:
        built = build_part(project, port, context)
        assert built is not None
        return built.part

    thresholds = FilterThresholds(min_alignment=-1.0)  # on (the reward scores each sample)
    team: Project = project.model_copy(update={"filters": thresholds, "synthesizer": None})
    parts = Parts(
        project=team,
        context=context,
        generator=part("generator"),
        judge=part("judge"),
        suites=part("suites"),
        reward=part("reward"),
        enhancer=part("enhancer"),
        corpus=part("corpus"),
        degrader=part("degrader"),
        synthesizer=None,
        launcher=part("launcher"),
        images=ImagePolicy(team.images, home=context.home, base=root),
    )
    # World scenes (a plain background, a few shapes) have 0.1-0.9 bits of grey-level
    # entropy: the default flat filter (1.0) would drop every one.
    scenes = FilterThresholds(min_entropy_bits=0.1)
    return World(
        embedder=TextEmbedder(),
        parts=parts,
        synthesizer=replace(
            parts,
            project=project.model_copy(update={"filters": scenes}),
            synthesizer=part("synthesizer"),
        ),
    )


@dataclass(kw_only=True, slots=True)
class Indexed:
    corpus: DirectoryCorpus
    client: QdrantClient
    qdrant: QdrantConfig


def indexed(directory: Path, embedder: TextEmbedder) -> Indexed:
    corpus = write_corpus(directory)
    client = QdrantClient(location=":memory:")
    qdrant = QdrantConfig()
    index_corpus(corpus, client, qdrant, embedder)
    return Indexed(corpus=corpus, client=client, qdrant=qdrant)


@pytest.fixture(scope="module")
def shared(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Indexed]:
    data = indexed(tmp_path_factory.mktemp("corpus") / "team-data", world.embedder)
    yield data
    data.client.close()


CONFIG = GapDataConfig(budget=40, replay=12, corpus_neighbours=64, seed=3)


@pytest.fixture(scope="module")
def built(
    world: World, shared: Indexed, tmp_path_factory: pytest.TempPathFactory
) -> tuple[GapArtefact, Path]:
    out = tmp_path_factory.mktemp("out") / "gap"
    artefact = build_gap_data(
        CASES,
        parts=replace(world.parts, corpus=shared.corpus),
        client=shared.client,
        qdrant=shared.qdrant,
        embedder=world.embedder,
        out_dir=out,
        config=CONFIG,
    )
    assert isinstance(artefact, GapArtefact), artefact
    return artefact, out


def test_the_rare_colour_is_diagnosed_scarce_and_only_it(built: tuple[GapArtefact, Path]) -> None:
    diagnosis = built[0].diagnosis
    assert diagnosis.scarce == ["colour:purple"]
    assert diagnosis.corpus_items == 60
    counts = {c.concept: c for c in diagnosis.concepts}
    assert counts["colour:purple"].corpus_items == 2
    assert counts["colour:purple"].share == pytest.approx(2 / 14)  # the median of 2, 14, 14, 15, 15
    assert [c.concept for c in diagnosis.concepts if c.scarce] == ["colour:purple"]
    assert {c.concept for c in diagnosis.concepts if c.asked} == {
        "colour:purple",
        "shape:circle",
        "shape:square",
        "shape:triangle",
    }
    assert [d.case_id for d in diagnosis.density] == [1, 2, 3, 4]
    assert all(0.0 <= d.scarcity <= 1.0 for d in diagnosis.density)


def test_retrieved_pool_items_all_carry_the_scarce_colour(built: tuple[GapArtefact, Path]) -> None:
    artefact = built[0]
    assert artefact.retrieved
    assert all("colour:purple" in r.tags for r in artefact.retrieved)
    assert all(r.concept == "colour:purple" for r in artefact.retrieved)
    assert all(r.item.startswith("pool-") for r in artefact.retrieved)
    assert all(r.image.startswith("file://") for r in artefact.retrieved)
    # Every purple pool item is found: 20 good, the twins and the 5 bad ones.
    assert len(artefact.retrieved) == 27


def test_each_filter_drop_is_recorded_and_bad_pool_items_are_dropped_by_the_right_filter(
    built: tuple[GapArtefact, Path],
) -> None:
    artefact, out = built
    dropped_by = {r.item: r.dropped_by for r in artefact.retrieved}
    for item, verdict in BAD.items():
        assert dropped_by[item] == verdict, item
    twins = sorted([dropped_by["pool-twin-a"], dropped_by["pool-twin-b"]], key=str)
    assert twins == [None, "near_duplicate"]  # whichever comes second is dropped
    assert all(dropped_by[f"pool-purple-{i:02d}"] is None for i in range(20))
    summary = artefact.filters
    assert list(summary.dropped) == list(FILTERS)
    assert summary.dropped == {
        "broken": 1,
        "resolution": 1,
        "near_duplicate": 2,
        "alignment": 0,
        "flat": 1,
        "caption_length": 1,
    }
    assert (summary.candidates, summary.kept) == (27, 21)
    on_disk = json.loads((out / ARTEFACT_FILE).read_text())
    assert on_disk["filters"] == summary.model_dump()


def test_the_dataset_on_disk_reads_back_with_the_replay_and_the_kept_augmentation(
    built: tuple[GapArtefact, Path],
) -> None:
    artefact, out = built
    assert artefact.dataset_dir == str(out / DATASET_DIR)
    samples = read_dataset(artefact.dataset_dir)
    assert len(samples) == artefact.samples == 12 + 21
    splits = [s.provenance.split for s in samples]
    assert splits.count("train") == artefact.replay == 12
    assert splits.count("pool") == artefact.augmentation["retrieved"] == 21
    assert all(s.provenance.dataset == "team-data" for s in samples)
    assert all(s.image.endswith(".png") for s in samples)
    by_id = {s.id: s for s in samples}
    copy = by_id["retrieved/pool-purple-00"]
    assert copy.provenance.origin_uri.endswith("/images/pool-purple-00.png")
    assert copy.caption.split()[2] == "purple"
    original = np.array(Image.open(copy.provenance.origin_uri.removeprefix("file://")))
    written = np.array(Image.open(Path(artefact.dataset_dir) / copy.image))
    assert np.array_equal(original, written)
    assert not list(out.parent.glob(".gap.*"))  # no temporary sibling left


def test_without_a_synthesizer_nothing_is_synthesized(built: tuple[GapArtefact, Path]) -> None:
    artefact, out = built
    assert artefact.synthesized == {}
    assert artefact.augmentation["synthesized"] == 0
    assert not (out / "synthesized").exists()


def test_with_a_synthesizer_the_rest_of_the_budget_is_synthesized_and_filtered(
    world: World, shared: Indexed, tmp_path: Path
) -> None:
    config = replace(CONFIG, budget=20, retrieved_share=0.5)
    out = tmp_path / "gap"
    artefact = build_gap_data(
        CASES,
        parts=replace(world.synthesizer, corpus=shared.corpus),
        client=shared.client,
        qdrant=shared.qdrant,
        embedder=world.embedder,
        out_dir=out,
        config=config,
    )
    assert isinstance(artefact, GapArtefact), artefact
    assert len(artefact.retrieved) == 10
    assert artefact.synthesized == {"colour:purple": 10}
    assert artefact.filters.candidates == 20
    samples = read_dataset(out / DATASET_DIR)
    synthesized = [s for s in samples if s.provenance.split == "synthesized"]
    assert len(synthesized) == artefact.augmentation["synthesized"] > 0
    for sample in synthesized:
        assert "purple" in sample.caption
        origin = Path(sample.provenance.origin_uri.removeprefix("file://"))
        assert origin.is_file()
        assert origin.is_relative_to(out / "synthesized")
    assert len(samples) == artefact.samples == 12 + artefact.filters.kept


def test_a_records_file_broken_mid_way_leaves_no_dataset_and_no_temporary_directory(
    world: World, tmp_path: Path
) -> None:
    data = indexed(tmp_path / "team-data", world.embedder)
    records = data.corpus.records
    lines = records.read_text().splitlines(keepends=True)
    records.write_text("".join(lines[:30]) + '{"id": "half a line\n' + "".join(lines[30:]))
    out = tmp_path / "runs" / "gap"
    with pytest.raises(PortError, match=r"records.jsonl:31: invalid JSON"):
        build_gap_data(
            CASES,
            parts=replace(world.synthesizer, corpus=data.corpus),
            client=data.client,
            qdrant=data.qdrant,
            embedder=world.embedder,
            out_dir=out,
            config=CONFIG,
        )
    assert not out.exists()
    assert list((tmp_path / "runs").iterdir()) == []

    records.write_text("".join(lines))  # mended; a train image that does not decode
    (tmp_path / "team-data/images/train-05.png").write_bytes(b"not a png")
    with pytest.raises(PortError, match="train-05"):
        build_gap_data(
            CASES,
            parts=replace(world.parts, corpus=data.corpus),
            client=data.client,
            qdrant=data.qdrant,
            embedder=world.embedder,
            out_dir=out,
            config=CONFIG,
        )
    assert list((tmp_path / "runs").iterdir()) == []
    data.client.close()


def test_cases_asking_only_for_a_common_colour_get_the_reason_and_nothing_is_written(
    world: World, shared: Indexed, tmp_path: Path
) -> None:
    cases = [
        RoutedCase(case_id=9, prompt="red square", reference="A large red square on grey"),
        RoutedCase(case_id=10, prompt="blue circle", reference="A small blue circle at dusk"),
    ]
    out = tmp_path / "gap"
    reason = build_gap_data(
        cases,
        parts=replace(world.parts, corpus=shared.corpus),
        client=shared.client,
        qdrant=shared.qdrant,
        embedder=world.embedder,
        out_dir=out,
        config=CONFIG,
    )
    assert reason == "no concept the cases ask for is scarce in the corpus"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_same_seed_gives_the_same_dataset_and_a_rerun_replaces_the_batch(
    world: World, shared: Indexed, built: tuple[GapArtefact, Path]
) -> None:
    first, out = built
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    again = build_gap_data(
        CASES,
        parts=replace(world.parts, corpus=shared.corpus),
        client=shared.client,
        qdrant=shared.qdrant,
        embedder=world.embedder,
        out_dir=out,
        config=CONFIG,
    )
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert again == first
    assert after == before
    assert not list(out.parent.glob(".gap.*"))


def test_tag_counts_by_scroll_match_the_facet_when_the_facet_may_be_cut(shared: Indexed) -> None:
    name = collection_name(shared.qdrant, "prompts")
    facet = count_tags(shared.client, name, "team-data", CORPUS)
    assert facet["colour:purple"] == 2
    assert facet["shape:circle"] == 20
    assert count_tags(shared.client, name, "team-data", CORPUS, limit=2) == facet
    assert count_tags(shared.client, name, "elsewhere", CORPUS) == {}


def test_the_corpus_fixture_reads_back_through_the_directory_adapter(shared: Indexed) -> None:
    train = list(shared.corpus.items("train"))
    assert len(train) == 60
    assert sum("colour:purple" in item.tags for item in train) == 2
    assert (shared.corpus.directory / RECORDS_FILE).is_file()


def test_an_out_dir_holding_something_else_is_refused_before_any_work(
    world: World, shared: Indexed, tmp_path: Path
) -> None:
    out = tmp_path / "gap"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a gap-data batch"):
        build_gap_data(
            CASES,
            parts=replace(world.parts, corpus=shared.corpus),
            client=shared.client,
            qdrant=shared.qdrant,
            embedder=world.embedder,
            out_dir=out,
            config=CONFIG,
        )
    assert [p.name for p in tmp_path.iterdir()] == ["gap"]
    assert (out / "notes.txt").read_text() == "keep me"

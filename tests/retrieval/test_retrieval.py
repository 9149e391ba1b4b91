"""retrieval/ on qdrant-client local mode with real embeddings (MiniLM for text, the world's
reward model for images): idempotent and incremental indexing, embedder-mismatch refusal,
scarcity ordering, MMR diversity, filters and deduplication."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient
from typer.testing import CliRunner

from flywheel.cli.main import app
from flywheel.settings import Settings, get_settings
from flywheel.world.base_model import BASE_REWARD
from flywheel.world.corpus import read_specs, reweighted, scene_tags, write_world_corpus
from flywheel.world.scenes import SceneConfig
from retrieval.augment import AugmentConfig, redundancy, retrieve_for_augmentation
from retrieval.embedding import ImageEmbedder, TextEmbedder
from retrieval.index import (
    CORPUS,
    POOL,
    Embedders,
    IndexItem,
    count_tagged,
    count_tags,
    dataset_items,
    index_items,
    prune,
)
from retrieval.scarcity import ScarcityConfig, calibrate, calibration_for, diagnose
from retrieval.store import (
    EmbedderMismatchError,
    QdrantConfig,
    collection_name,
    ensure_collection,
    open_qdrant,
    qdrant_config,
    recorded_embedders,
)

pytestmark = pytest.mark.usefixtures("offline")

SCENES = SceneConfig(text_probability=0.0)
runner = CliRunner()


def _tags(directory: Path):  # type: ignore[no-untyped-def]
    specs = read_specs(directory)
    return lambda sample: scene_tags(specs[sample.id].spec)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("world")
    write_world_corpus(
        root / "corpus",
        count=400,
        config=reweighted(SCENES, colours={"purple": 0.0}),  # purple: never trained on
        seed=0,
        size=32,
        edit_fraction=0.1,
    )
    write_world_corpus(
        root / "pool",
        count=120,
        config=reweighted(SCENES, colours={"purple": 4.0}),
        seed=1,
        size=32,
        split="pool",
    )
    return root / "corpus", root / "pool"


@pytest.fixture(scope="module")
def text() -> TextEmbedder:
    return TextEmbedder()


@pytest.fixture
def qdrant(tmp_path: Path) -> Iterator[tuple[QdrantClient, QdrantConfig]]:
    config = QdrantConfig(path=tmp_path / "qdrant")
    client = open_qdrant(config)
    yield client, config
    client.close()


@pytest.fixture(scope="module")
def indexed(
    corpora: tuple[Path, Path], text: TextEmbedder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[QdrantClient, QdrantConfig, str]]:
    corpus, pool = corpora
    config = QdrantConfig(path=tmp_path_factory.mktemp("qdrant-prompts"))
    client = open_qdrant(config)
    items = dataset_items(corpus, "prompts", split=CORPUS, extra_tags=_tags(corpus))
    items += dataset_items(pool, "prompts", split=POOL, extra_tags=_tags(pool))
    index_items(client, config, "prompts", items, Embedders(text=text))
    yield client, config, collection_name(config, "prompts")
    client.close()


def test_indexing_is_idempotent_and_incremental(
    corpora: tuple[Path, Path], text: TextEmbedder, qdrant: tuple[QdrantClient, QdrantConfig]
) -> None:
    client, config = qdrant
    items = dataset_items(corpora[1], "prompts", split=POOL)[:40]
    embedders = Embedders(text=text)
    first = index_items(client, config, "prompts", items, embedders, batch_size=16)
    assert (first.added, first.updated, first.unchanged) == (40, 0, 0)
    name = first.collection
    ids = sorted(str(p.id) for p in client.scroll(name, limit=100)[0])
    again = index_items(client, config, "prompts", items, embedders, batch_size=7)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 40)
    assert again.embed_seconds == 0.0
    assert sorted(str(p.id) for p in client.scroll(name, limit=100)[0]) == ids

    changed = [replace(items[0], text="A picture with a cream background showing no objects.")]
    changed.append(replace(items[1], tags=("reviewed",)))  # a payload change is a change
    new = IndexItem(dataset="prompts-from-users", split=POOL, text="a purple star")
    report = index_items(client, config, "prompts", [*changed, *items[2:], new], embedders)
    assert (report.added, report.updated, report.unchanged) == (1, 2, 38)
    assert client.count(name).count == 41
    stored = client.retrieve(name, ids=[changed[0].point_id("prompts", "")])[0]
    assert stored.payload is not None
    assert stored.payload["text"] == changed[0].text
    assert stored.payload["key"] == items[0].key
    # A keyless item's id comes from its content: the same text is the same point.
    twice = index_items(client, config, "prompts", [new, replace(new)], embedders)
    assert (twice.added, twice.unchanged) == (0, 2)


def test_a_collection_refuses_another_embedder(
    text: TextEmbedder, qdrant: tuple[QdrantClient, QdrantConfig]
) -> None:
    client, config = qdrant
    items = [
        IndexItem(dataset="d", split=CORPUS, text=f"a red circle number {i}") for i in range(12)
    ]
    index_items(client, config, "prompts", items, Embedders(text=text))
    name = collection_name(config, "prompts")
    assert recorded_embedders(client, name) == {"text": text.model_id}
    other = "sentence-transformers:other-model@0123456789abcdef"
    with pytest.raises(EmbedderMismatchError, match="built by"):
        ensure_collection(client, config, "prompts", {"text": (other, text.dim)})
    with pytest.raises(EmbedderMismatchError, match="built by"):
        calibrate(client, name, "text", other, ScarcityConfig(k=3))
    query = text.embed(["a red circle"])[0]
    with pytest.raises(EmbedderMismatchError):
        retrieve_for_augmentation(client, name, "text", other, query, AugmentConfig(limit=2))
    with pytest.raises(ValueError, match="takes the vectors"):
        ensure_collection(client, config, "prompts", {"image": (other, 8)})


def test_scarcity_orders_rare_before_common(
    indexed: tuple[QdrantClient, QdrantConfig, str], text: TextEmbedder
) -> None:
    client, _, name = indexed
    config = ScarcityConfig(k=5, calibration_points=128)
    calibration = calibrate(client, name, "text", text.model_id, config)
    assert len(calibration.knn_similarities) == 128
    common = [
        f"A picture with a white background showing a large {colour} {shape} at the centre."
        for colour, shape in (("red", "circle"), ("blue", "square"), ("green", "triangle"))
    ]
    rare = [
        p.replace("red", "purple").replace("blue", "purple").replace("green", "purple")
        for p in common
    ]
    far = ["a watercolour portrait of an old fisherman at dawn"]
    results = diagnose(client, calibration, text.embed(common + rare + far), config)
    scores = [r.scarcity for r in results]
    assert all(0.0 <= s <= 1.0 for s in scores)
    common_score, rare_score = np.mean(scores[:3]), np.mean(scores[3:6])
    assert rare_score > common_score + 0.2
    assert scores[6] >= max(scores[:6])
    assert scores[6] >= 0.95
    assert results[0].within_radius > results[6].within_radius
    for result in results:  # evidence: the nearest corpus examples, nearest first
        sims = [n.similarity for n in result.neighbours]
        assert len(sims) == config.evidence
        assert sims == sorted(sims, reverse=True)
        assert all("colour:purple" not in n.tags for n in result.neighbours)


def test_mmr_retrieves_a_less_redundant_set(
    indexed: tuple[QdrantClient, QdrantConfig, str], text: TextEmbedder
) -> None:
    client, _, name = indexed
    query = text.embed(["A picture with a grey background showing a small purple hexagon."])[0]
    sets = {}
    for diversity in (0.0, 0.6):
        config = AugmentConfig(limit=10, diversity=diversity, duplicate_similarity=1.01)
        found = retrieve_for_augmentation(client, name, "text", text.model_id, query, config)
        assert len(found) == 10
        assert all(c.split == POOL for c in found)
        sets[diversity] = found
    plain, diverse = sets[0.0], sets[0.6]
    assert [c.similarity for c in plain] == sorted((c.similarity for c in plain), reverse=True)
    assert redundancy(text.embed([c.text or "" for c in diverse])) < redundancy(
        text.embed([c.text or "" for c in plain])
    )
    assert min(c.similarity for c in diverse) <= min(c.similarity for c in plain)


def test_filters_and_provenance(
    indexed: tuple[QdrantClient, QdrantConfig, str], text: TextEmbedder
) -> None:
    client, _, name = indexed
    query = text.embed(["a purple star"])[0]
    purple = AugmentConfig(limit=8, tags_all=("colour:purple",))
    found = retrieve_for_augmentation(client, name, "text", text.model_id, query, purple)
    assert found
    assert all("colour:purple" in c.tags and c.split == POOL for c in found)
    assert all(c.provenance["dataset"] == "world" and c.provenance["origin_uri"] for c in found)
    both = AugmentConfig(limit=8, splits=(POOL, CORPUS), tags_any=("shape:star", "shape:circle"))
    found = retrieve_for_augmentation(client, name, "text", text.model_id, query, both)
    assert all({"shape:star", "shape:circle"} & set(c.tags) for c in found)
    nothing = AugmentConfig(limit=4, splits=(CORPUS,), tags_all=("colour:purple",))
    assert retrieve_for_augmentation(client, name, "text", text.model_id, query, nothing) == []
    with pytest.raises(ValueError, match="diversity"):
        AugmentConfig(diversity=1.5).validate()


def test_pool_duplicates_of_the_corpus_are_dropped(
    text: TextEmbedder, qdrant: tuple[QdrantClient, QdrantConfig]
) -> None:
    client, config = qdrant
    had = "A picture with a white background showing a small yellow star at the top left."
    items = [IndexItem(dataset="d", split=CORPUS, key="c0", text=had)]
    items += [
        IndexItem(dataset="d", split=CORPUS, key=f"c{i}", text=f"a blue square, {i}")
        for i in range(1, 8)
    ]
    items.append(IndexItem(dataset="pool", split=POOL, key="p-copy", text=had))
    items.append(
        IndexItem(dataset="pool", split=POOL, key="p-new", text="a small yellow star on cream")
    )
    index_items(client, config, "prompts", items, Embedders(text=text))
    name = collection_name(config, "prompts")
    query = text.embed(["a yellow star"])[0]
    found = retrieve_for_augmentation(
        client, name, "text", text.model_id, query, AugmentConfig(limit=2, diversity=0.0)
    )
    assert [c.key for c in found] == ["p-new"]
    assert found[0].nearest_corpus_similarity is not None
    assert found[0].nearest_corpus_similarity < 0.98


def test_images_and_edit_pairs(
    corpora: tuple[Path, Path], text: TextEmbedder, qdrant: tuple[QdrantClient, QdrantConfig]
) -> None:
    client, config = qdrant
    corpus = corpora[0]
    image = ImageEmbedder(BASE_REWARD)
    embedders = Embedders(text=text, image=image)
    images = dataset_items(corpus, "images", split=CORPUS)[:24]
    report = index_items(client, config, "images", images, embedders)
    assert report.added == 24
    pairs = dataset_items(corpus, "edit_pairs", split=CORPUS)
    assert pairs
    assert all("editing" in p.tags and p.text and p.image for p in pairs)
    report = index_items(client, config, "edit_pairs", pairs, embedders)
    assert report.added == len(pairs)
    name = collection_name(config, "edit_pairs")
    assert recorded_embedders(client, name) == {
        "instruction": text.model_id,
        "image": image.model_id,
    }
    point = client.scroll(name, limit=1, with_vectors=True)[0][0]
    assert isinstance(point.vector, dict)
    image_vector = np.asarray(point.vector["image"])
    assert image_vector.shape == (image.dim,)
    assert np.isclose(np.linalg.norm(np.asarray(point.vector["instruction"])), 1.0, atol=1e-4)
    # An image of the corpus finds itself first.
    query = image.embed([images[3].image or Path()])[0]
    hits = client.query_points(
        collection_name(config, "images"), query=query.tolist(), using="image", limit=1
    ).points
    assert hits[0].payload is not None
    assert hits[0].payload["key"] == images[3].key


def test_the_settings_pick_the_backend(tmp_path: Path) -> None:
    local = qdrant_config(Settings(home=tmp_path, qdrant_url=None))
    assert local.url is None
    assert local.path == tmp_path / "qdrant"
    server = qdrant_config(Settings(home=tmp_path, qdrant_url="http://qdrant:6333"))
    assert server.url == "http://qdrant:6333"


def test_dataset_items_skip_what_a_collection_does_not_hold(corpora: tuple[Path, Path]) -> None:
    corpus = corpora[0]
    prompts = dataset_items(corpus, "prompts", split=CORPUS)
    images = dataset_items(corpus, "images", split=CORPUS)
    pairs = dataset_items(corpus, "edit_pairs", split=CORPUS)
    assert len(images) == 400
    assert len(prompts) + len(pairs) == 400
    assert all(p.image is None and p.text for p in prompts)


def test_the_calibration_is_kept_until_the_corpus_changes(
    text: TextEmbedder, qdrant: tuple[QdrantClient, QdrantConfig]
) -> None:
    client, config = qdrant
    items = [
        IndexItem(dataset="d", split=CORPUS, text=f"a {c} {s}")
        for c in ("red", "blue", "green", "black")
        for s in ("circle", "square", "star")
    ]
    embedders = Embedders(text=text)
    index_items(client, config, "prompts", items, embedders)
    name = collection_name(config, "prompts")
    scarcity = ScarcityConfig(k=3, calibration_points=8)
    first = calibration_for(client, name, "text", text.model_id, scarcity)
    metadata = client.get_collection(name).config.metadata or {}
    assert metadata["calibration"]["text"]["corpus_points"] == 12
    assert metadata["embedders"]["text"]["model_id"] == text.model_id  # kept alongside
    again = calibration_for(client, name, "text", text.model_id, scarcity)
    assert np.array_equal(again.knn_similarities, first.knn_similarities)
    more = [
        IndexItem(dataset="d", split=CORPUS, key=f"yellow-{s}", text=f"a yellow {s}")
        for s in ("circle", "star")
    ]
    index_items(client, config, "prompts", more, embedders)
    index_items(
        client, config, "prompts", [IndexItem(dataset="p", split=POOL, text="x")], embedders
    )
    renewed = calibration_for(client, name, "text", text.model_id, scarcity)
    metadata = client.get_collection(name).config.metadata or {}
    stored = metadata["calibration"]["text"]
    assert stored["corpus_points"] == 14  # pool points do not count
    assert renewed.radius == stored["radius"]
    # A changed caption, same count: measured again.
    index_items(client, config, "prompts", [replace(more[0], text="a yellow hexagon")], embedders)
    calibration_for(client, name, "text", text.model_id, scarcity)
    metadata = client.get_collection(name).config.metadata or {}
    assert metadata["calibration"]["text"]["corpus_points"] == 14
    assert metadata["calibration"]["text"]["corpus_fingerprint"] != stored["corpus_fingerprint"]


def test_cli_index_diagnose_augment(
    corpora: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.delenv("FLYWHEEL_QDRANT_URL", raising=False)
    get_settings.cache_clear()
    try:
        corpus, pool = corpora
        args = ["retrieval", "index", "--dataset", str(corpus), "--split", "corpus", "--json"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["added"] == 360  # the 40 editing samples have no caption
        result = runner.invoke(app, [*args[:3], str(pool), "--split", "pool", "--json"])
        assert json.loads(result.stdout)["added"] == 120
        assert runner.invoke(app, args).exit_code == 0
        again = json.loads(runner.invoke(app, [*args, "--prune"]).stdout)
        assert (again["unchanged"], again["pruned"]) == (360, 0)

        prompts = [
            "a watercolour portrait of an old fisherman at dawn",
            "A picture with a white background showing a large red star at the centre.",
        ]
        result = runner.invoke(app, ["retrieval", "diagnose", *prompts, "--json"])
        assert result.exit_code == 0, result.stderr
        rows = json.loads(result.stdout)
        assert rows[0]["scarcity"] > rows[1]["scarcity"]
        assert rows[0]["scarcity"] >= 0.95
        assert len(rows[1]["neighbours"]) == 5
        assert (tmp_path / "qdrant").is_dir()

        purple = "A picture with a white background showing a large purple star at the centre."
        result = runner.invoke(
            app, ["retrieval", "augment", purple, "--tag", "colour:purple", "--json"]
        )
        assert result.exit_code == 0, result.stderr
        found = json.loads(result.stdout)
        assert found
        assert all("colour:purple" in c["tags"] and c["split"] == "pool" for c in found)
        table = runner.invoke(app, ["retrieval", "augment", purple, "--limit", "3"])
        assert table.exit_code == 0
        assert "pool" in table.stdout

        bad = runner.invoke(app, [*args[:6], "--collection", "failure_cases"])
        assert bad.exit_code == 2
        assert "--collection 'failure_cases'" in bad.stderr
        bad = runner.invoke(app, [*args[:5], "train"])
        assert bad.exit_code == 2
        assert "--split 'train'" in bad.stderr
        bad = runner.invoke(
            app, ["retrieval", "index", "--dataset", str(tmp_path), "--split", "pool"]
        )
        assert bad.exit_code == 2
        assert "no samples.jsonl" in bad.stderr
    finally:
        get_settings.cache_clear()


def test_cli_asks_for_an_index_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.delenv("FLYWHEEL_QDRANT_URL", raising=False)
    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["retrieval", "diagnose", "a red circle"])
        assert result.exit_code == 2
        assert "run `flywheel retrieval index` first" in result.stderr
    finally:
        get_settings.cache_clear()


def test_an_unreachable_server_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.setenv("FLYWHEEL_QDRANT_URL", "http://127.0.0.1:9")  # nothing listens there
    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["retrieval", "augment", "a red circle"])
        assert result.exit_code == 1
        assert "did not answer" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        get_settings.cache_clear()


def test_corpus_and_pool_items_with_one_key_stay_apart(
    text: TextEmbedder, qdrant: tuple[QdrantClient, QdrantConfig]
) -> None:
    client, config = qdrant
    corpus = IndexItem(dataset="world", split=CORPUS, key="world-7", text="a red circle")
    pool = replace(corpus, split=POOL, text="a purple circle")
    report = index_items(client, config, "prompts", [corpus, pool], Embedders(text=text))
    assert report.added == 2
    assert client.count(collection_name(config, "prompts")).count == 2


def test_images_of_different_sizes_embed_together(tmp_path: Path) -> None:
    from PIL import Image

    paths = []
    for size in ((32, 32), (64, 48)):
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (200, 40, 40)).save(path)
        paths.append(path)
    image = ImageEmbedder(BASE_REWARD, batch_size=8)
    vectors = image.embed(paths)
    assert vectors.shape == (2, image.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > 0.9  # the same flat red, resized


def test_prune_deletes_what_the_dataset_no_longer_makes(
    text: TextEmbedder, qdrant: tuple[QdrantClient, QdrantConfig]
) -> None:
    client, config = qdrant
    embedders = Embedders(text=text)
    items = [
        IndexItem(dataset="d", split=CORPUS, key=f"k{i}", text=f"a red circle {i}")
        for i in range(6)
    ]
    other = IndexItem(dataset="d", split=POOL, key="k0", text="a red circle 0")
    index_items(client, config, "prompts", [*items, other], embedders)
    name = collection_name(config, "prompts")
    now = items[:4]  # two samples left the dataset
    assert prune(client, config, "prompts", now, dataset="d", split=CORPUS) == 2
    assert client.count(name).count == 5  # the pool's point is another split's
    assert prune(client, config, "prompts", now, dataset="d", split=CORPUS) == 0
    assert prune(client, config, "images", now, dataset="d", split=CORPUS) == 0  # no collection


def test_counts_by_split_tag_and_dataset_read_the_payload_conventions(
    text: TextEmbedder, qdrant: tuple[QdrantClient, QdrantConfig]
) -> None:
    client, config = qdrant
    items = [
        IndexItem(dataset="a", split=CORPUS, key="1", text="x", tags=("colour:red",)),
        IndexItem(dataset="a", split=CORPUS, key="2", text="y", tags=("colour:red", "shape:star")),
        IndexItem(dataset="a", split=POOL, key="3", text="z", tags=("colour:purple",)),
        IndexItem(dataset="b", split=CORPUS, key="4", text="w", tags=("colour:red",)),
    ]
    index_items(client, config, "prompts", items, Embedders(text=text))
    name = collection_name(config, "prompts")
    assert count_tagged(client, name, CORPUS) == 3
    assert count_tagged(client, name, CORPUS, "colour:red") == 3
    assert count_tagged(client, name, CORPUS, "colour:red", dataset="a") == 2
    assert count_tagged(client, name, CORPUS, "colour:purple") == 0  # only the pool has it
    assert count_tagged(client, name, POOL, dataset="b") == 0
    both = {"colour:red": 3, "shape:star": 1}
    assert count_tags(client, name, None, CORPUS) == both
    assert count_tags(client, name, None, CORPUS, limit=1) == both  # a cut facet: a scroll
    assert count_tags(client, name, "a", CORPUS) == {"colour:red": 2, "shape:star": 1}
    assert count_tags(client, name, "a", POOL) == {"colour:purple": 1}

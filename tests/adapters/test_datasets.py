"""The data adapters a team uses with no code: dataset directories, parquet files, saved
Hugging Face datasets (the corpus port) and JSONL prompt suites (the suites port), written
for real into a temporary directory and read back through the adapters."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from flywheel.adapters.base import AdapterContext, AdapterSettings
from flywheel.adapters.datasets import (
    DIRECTORY,
    HF_DATASETS,
    PARQUET,
    RECORDS_FILE,
    SUITES,
    ArrowDatasetCorpus,
    DirectoryCorpus,
    JsonlSuites,
    ParquetCorpus,
    decode_image,
    write_records,
)
from flywheel.ports import Corpus, CorpusItem, PortError, PromptSuites
from flywheel.project import build_part, read_project

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


def png(colour: tuple[int, int, int], size: tuple[int, int] = (4, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (4, 3)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(colour, size))


def context(root: Path) -> AdapterContext:
    return AdapterContext(root=root, home=root / "home")


def build(adapter: Any, root: Path, **settings: Any) -> Any:
    """The part ``adapter`` builds from ``settings`` (as its project-file section would)."""
    validated: AdapterSettings = adapter.settings.model_validate(settings)
    return adapter.build(validated, context(root))


def assert_colour(image: torch.Tensor, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    assert image.dtype == torch.float32
    assert tuple(image.shape) == (3, size[1], size[0])
    expected = torch.tensor(colour, dtype=torch.float32).div(255).view(3, 1, 1)
    assert torch.equal(image, expected.expand_as(image))


def record(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "a",
        "image": "images/a.png",
        "rich_caption": "a red square on white",
        "raw_caption": "red square",
        "tags": ["colour:red"],
        "split": "train",
        "provenance": {"source": "tests"},
    }
    return base | fields


def dataset_directory(root: Path, *lines: dict[str, Any] | str) -> Path:
    """``root/data`` with ``images/a.png`` (red) and ``records.jsonl`` of ``lines``."""
    directory = root / "data"
    save_png(directory / "images" / "a.png", RED)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (directory / RECORDS_FILE).write_text(text, encoding="utf-8")
    return directory


# ---- the dataset directory --------------------------------------------------------------------


def test_a_dataset_directory_written_by_write_records_reads_back_split_by_split(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "sets" / "shapes"
    save_png(directory / "images" / "red.png", RED)
    save_png(directory / "images" / "green.png", GREEN, (2, 5))
    save_png(directory / "pool" / "blue.png", BLUE)
    items = [
        CorpusItem(id="r", image="images/red.png", rich_caption="red", tags=["colour:red"]),
        CorpusItem(id="p", image="pool/blue.png", rich_caption="blue", split="pool"),
        CorpusItem(
            id="g",
            image="images/green.png",
            rich_caption="a green bar",
            raw_caption="green",
            provenance={"licence": "cc0"},
        ),
    ]
    assert write_records(directory, items) == directory / RECORDS_FILE

    corpus = build(DIRECTORY, tmp_path, path="sets/shapes")
    assert isinstance(corpus, Corpus)
    assert corpus.name == "shapes"
    train = list(corpus.items("train"))
    assert [i.id for i in train] == ["r", "g"]
    assert train[1].image == (directory / "images" / "green.png").absolute().as_uri()
    assert train[1].model_dump(exclude={"image"}) == items[2].model_dump(exclude={"image"})
    assert [i.id for i in corpus.items("pool")] == ["p"]
    assert_colour(corpus.image(train[0]), RED, (4, 3))
    assert_colour(corpus.image(train[1]), GREEN, (2, 5))
    assert_colour(corpus.image(next(corpus.items("pool"))), BLUE, (4, 3))

    # The items a corpus gives (file:// URIs inside the directory) are written back as they were.
    before = (directory / RECORDS_FILE).read_text(encoding="utf-8")
    write_records(directory, [*corpus.items("train"), *corpus.items("pool")])
    after = (directory / RECORDS_FILE).read_text(encoding="utf-8")
    assert sorted(after.splitlines()) == sorted(before.splitlines())
    assert json.loads(before.splitlines()[0])["image"] == "images/red.png"


def test_a_corpus_section_of_a_project_file_builds_a_directory_corpus(tmp_path: Path) -> None:
    dataset_directory(tmp_path, record(), record(id="b", split="pool"))
    ports = ["generator", "judge", "suites", "reward", "enhancer", "degrader"]
    text = "".join(f'[{port}]\nadapter = "world"\n\n' for port in ports)
    text += '[launcher]\nadapter = "in_process"\n\n'
    text += '[corpus]\nadapter = "directory"\npath = "data"\nname = "team-shapes"\n'
    (tmp_path / "flywheel.toml").write_text(text, encoding="utf-8")
    project = read_project(tmp_path / "flywheel.toml")

    built = build_part(project, "corpus", context(project.root))
    assert built is not None
    assert built.adapter == "directory"
    corpus = built.part
    assert isinstance(corpus, DirectoryCorpus)
    assert corpus.name == "team-shapes"
    assert [i.id for i in corpus.items("pool")] == ["b"]


def test_write_records_refuses_an_image_outside_the_directory_and_a_duplicate_id(
    tmp_path: Path,
) -> None:
    directory = dataset_directory(tmp_path)
    outside = tmp_path / "elsewhere.png"
    save_png(outside, RED)
    good = CorpusItem(id="a", image="images/a.png", rich_caption="red")
    with pytest.raises(
        ValueError, match=r"item 2 \('b'\): image path '\.\./x\.png' must be relative"
    ):
        write_records(directory, [good, good.model_copy(update={"id": "b", "image": "../x.png"})])
    with pytest.raises(ValueError, match=r"item 1 \('a'\): image 'file://.*' is not inside"):
        write_records(directory, [good.model_copy(update={"image": outside.as_uri()})])
    with pytest.raises(ValueError, match=r"item 2 \('a'\): duplicate id"):
        write_records(directory, [good, good])
    with pytest.raises(ValueError, match=r"item 1 \('a'\): image 'images/b\.png' not found"):
        write_records(directory, [good.model_copy(update={"image": "images/b.png"})])
    assert not (directory / RECORDS_FILE).read_text(encoding="utf-8")  # never half-written


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": "b", "image": "images/a.png",', "invalid JSON (Expecting property name"),
        ('["not", "an", "object"]', "not a JSON object"),
        (record(id="b", rich_caption=None), "rich_caption: Input should"),
        ({k: v for k, v in record(id="b").items() if k != "rich_caption"}, "rich_caption: Field"),
        (record(id="b", split="validation"), "split: Input should be 'train' or 'pool'"),
        (record(id="b", colour="red"), "colour: Extra inputs are not permitted"),
        (record(id="b", image="../outside.png"), "image path '../outside.png' must be relative"),
        (record(id="b", image="/etc/passwd"), "image path '/etc/passwd' must be relative"),
        (record(id="b", image="file:///etc/passwd"), "image path 'file:///etc/passwd' must be"),
        (record(id="b", image="images/missing.png"), "image 'images/missing.png' not found in"),
        (record(id="a"), "duplicate id 'a'"),
    ],
)
def test_a_broken_records_line_is_refused_with_its_file_and_line(
    tmp_path: Path, line: dict[str, Any] | str, problem: str
) -> None:
    directory = dataset_directory(tmp_path, record(), line, record(id="c"))
    corpus = build(DIRECTORY, tmp_path, path="data")
    items = corpus.items("train")
    assert next(items).id == "a"  # lazily: the first item comes before the broken line
    with pytest.raises(PortError) as caught:
        next(items)
    message = str(caught.value)
    assert message.startswith(f"corpus: {directory / RECORDS_FILE}:2: {problem}")
    assert "\n" not in message
    assert caught.value.port == "corpus"


def test_a_broken_line_of_the_other_split_stops_the_listing_too(tmp_path: Path) -> None:
    directory = dataset_directory(
        tmp_path, record(), record(id="b", split="pool", image="../x.png")
    )
    corpus = build(DIRECTORY, tmp_path, path="data")
    with pytest.raises(PortError, match=rf"{directory / RECORDS_FILE}:2: image path '\.\./x"):
        list(corpus.items("train"))


def test_a_directory_without_records_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PortError, match=r"corpus: .*empty: not a dataset directory \(no records"):
        build(DIRECTORY, tmp_path, path="empty")


def test_an_image_that_does_not_decode_is_a_port_error(tmp_path: Path) -> None:
    directory = dataset_directory(tmp_path, record())
    (directory / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    corpus = build(DIRECTORY, tmp_path, path="data")
    (item,) = corpus.items("train")
    with pytest.raises(PortError, match=r"corpus: a \(.*a\.png\): cannot be decoded \(cannot"):
        corpus.image(item)
    truncated = png(RED, (64, 64))
    (directory / "images" / "a.png").write_bytes(truncated[: len(truncated) // 2])
    with pytest.raises(PortError, match=r"corpus: a \(.*a\.png\): cannot be decoded"):
        corpus.image(item)


def test_an_image_over_max_pixels_is_refused_as_a_decompression_bomb(tmp_path: Path) -> None:
    directory = dataset_directory(tmp_path, record())
    save_png(directory / "images" / "a.png", RED, (100, 50))
    corpus = build(DIRECTORY, tmp_path, path="data", max_pixels=4999)
    (item,) = corpus.items("train")
    with pytest.raises(
        PortError, match=r"a \(.*\): 100x50 pixels is over the limit of 4999 \(max_pixels"
    ):
        corpus.image(item)
    larger = build(DIRECTORY, tmp_path, path="data", max_pixels=5000)
    assert tuple(larger.image(item).shape) == (3, 50, 100)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_from_its_header_with_the_default_limit(
    tmp_path: Path,
) -> None:
    directory = dataset_directory(tmp_path, record())
    (directory / "images" / "a.png").write_bytes(png_header_only(20_000, 20_000))
    corpus = build(DIRECTORY, tmp_path, path="data")
    (item,) = corpus.items("train")
    with pytest.raises(PortError, match=r"corpus: a \(.*a\.png\): refused as a decompression bomb"):
        corpus.image(item)


def test_an_image_is_decoded_upright_in_rgb_whatever_its_mode() -> None:
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (4, 2), RED).save(rotated, format="PNG", exif=exif)
    assert_colour(decode_image(rotated.getvalue(), "x", max_pixels=100), RED, (2, 4))
    cases: list[tuple[str, int | tuple[int, ...], tuple[int, int, int]]] = [
        ("L", 255, (255, 255, 255)),
        ("RGBA", (0, 0, 255, 128), BLUE),
    ]
    for mode, value, colour in cases:
        buffer = io.BytesIO()
        Image.new(mode, (3, 3), value).save(buffer, format="PNG")
        assert_colour(decode_image(buffer.getvalue(), "x", max_pixels=100), colour, (3, 3))


def test_a_corpus_reads_no_image_but_its_own(tmp_path: Path) -> None:
    dataset_directory(tmp_path, record())
    secret = tmp_path / "secret.png"
    save_png(secret, RED)
    corpus = build(DIRECTORY, tmp_path, path="data")
    for uri in (secret.as_uri(), f"{corpus.directory.as_uri()}/../secret.png", "https://x/a.png"):
        with pytest.raises(PortError, match="not an image of dataset 'data'"):
            corpus.image(CorpusItem(id="x", image=uri, rich_caption="x"))


def test_directory_settings_refuse_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="pth"):
        DIRECTORY.settings.model_validate({"pth": "data"})


# ---- parquet ----------------------------------------------------------------------------------


def write_parquet(path: Path, columns: dict[str, list[Any]], **options: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **options)


def test_parquet_with_a_teams_own_column_names_and_image_paths_reads_as_items(
    tmp_path: Path,
) -> None:
    save_png(tmp_path / "laion" / "img" / "0.png", RED)
    save_png(tmp_path / "laion" / "img" / "1.png", GREEN)
    write_parquet(
        tmp_path / "laion" / "part.parquet",
        {
            "key": [10, 11],  # an integer id column: the ids are its numbers as text
            "file": ["img/0.png", "img/1.png"],
            "text": ["a red square", "a green square"],
            "keywords": [["colour:red"], None],
            "meta": [{"source": "crawl", "licence": "cc0"}, None],
            "width": [4, 4],
        },
    )
    corpus = build(
        PARQUET,
        tmp_path,
        path="laion/part.parquet",
        split="pool",
        columns={
            "id": "key",
            "image": "file",
            "rich_caption": "text",
            "tags": "keywords",
            "provenance": "meta",
        },
    )
    assert isinstance(corpus, ParquetCorpus)
    assert corpus.name == "part"
    assert list(corpus.items("train")) == []
    first, second = corpus.items("pool")
    assert first == CorpusItem(
        id="10",
        image=(tmp_path / "laion" / "img" / "0.png").as_uri(),
        rich_caption="a red square",
        tags=["colour:red"],
        split="pool",
        provenance={"source": "crawl", "licence": "cc0"},
    )
    assert (second.tags, second.provenance, second.raw_caption) == ([], {}, "")
    assert_colour(corpus.image(second), GREEN, (4, 3))


def test_parquet_files_of_a_glob_with_embedded_images_and_a_split_column(tmp_path: Path) -> None:
    image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for number, colours in enumerate([(RED, GREEN, BLUE), (BLUE, RED, GREEN)]):
        table = pa.table(
            {
                "id": [f"{number}-{i}" for i in range(3)],
                "image": pa.array(
                    [{"bytes": png(c), "path": f"{i}.png"} for i, c in enumerate(colours)],
                    type=image_struct,
                ),
                "rich_caption": ["r", "g", "b"],
                "split": ["train", "pool", "train"],
                "provenance": pa.array(
                    [[("source", "hub")], [], [("source", "hub")]],
                    type=pa.map_(pa.string(), pa.string()),
                ),
            }
        )
        (tmp_path / "shards").mkdir(exist_ok=True)
        pq.write_table(table, tmp_path / "shards" / f"train-{number}.parquet", row_group_size=2)
    corpus = build(PARQUET, tmp_path, path="shards/train-*.parquet")
    assert corpus.name == "shards"
    train = list(corpus.items("train"))
    assert [i.id for i in train] == ["0-0", "0-2", "1-0", "1-2"]
    assert train[0].provenance == {"source": "hub"}
    assert train[3].image == f"parquet://{tmp_path}/shards/train-1.parquet#row=2"
    for item, colour in zip(train, [RED, BLUE, BLUE, GREEN], strict=True):
        assert_colour(corpus.image(item), colour, (4, 3))
    assert [i.id for i in corpus.items("pool")] == ["0-1", "1-1"]
    foreign = train[0].model_copy(update={"image": f"parquet://{tmp_path}/other.parquet#row=0"})
    with pytest.raises(PortError, match="not an image of dataset 'shards'"):
        corpus.image(foreign)
    # A directory reads every parquet file under it.
    assert [i.id for i in build(PARQUET, tmp_path, path="shards").items("pool")] == ["0-1", "1-1"]


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"split": "train"}, "no column 'rich_caption' for rich_caption (columns: id, image)"),
        (
            {"split": "train", "columns": {"rich_caption": "caption"}},
            "no column 'caption' for rich_caption (columns: id, image)",
        ),
        (
            {"columns": {"rich_caption": "id"}},
            "no column 'split' for split (or set split) (columns: id, image)",
        ),
        (
            {"split": "train", "columns": {"rich_caption": "id", "tags": "labels"}},
            "no column 'labels' for tags (columns: id, image)",
        ),
    ],
)
def test_a_missing_parquet_column_is_refused_naming_the_file(
    tmp_path: Path, settings: dict[str, Any], problem: str
) -> None:
    save_png(tmp_path / "a.png", RED)
    write_parquet(tmp_path / "data.parquet", {"id": ["a"], "image": ["a.png"]})
    corpus = build(PARQUET, tmp_path, path="data.parquet", **settings)
    with pytest.raises(PortError) as caught:
        list(corpus.items("train"))
    assert str(caught.value) == f"corpus: {tmp_path / 'data.parquet'}: {problem}"


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"split": "validation"}, "split: Input should be 'train' or 'pool'"),
        ({"split": None}, "split: Input should be 'train' or 'pool'"),
        ({"image": "../a.png"}, "image path '../a.png' must be relative"),
        ({"image": "/tmp/a.png"}, "image path '/tmp/a.png' must be relative"),
        ({"image": "b.png"}, "image 'b.png' not found in"),
        ({"rich_caption": None}, "rich_caption: Input should be a valid string"),
        ({"id": "a"}, "duplicate id 'a'"),
    ],
)
def test_a_broken_parquet_row_is_refused_with_its_file_and_row(
    tmp_path: Path, row: dict[str, Any], problem: str
) -> None:
    save_png(tmp_path / "data" / "a.png", RED)
    good = {"id": "a", "image": "a.png", "rich_caption": "red", "split": "train"}
    bad = good | {"id": "b"} | row
    write_parquet(tmp_path / "data" / "x.parquet", {k: [good[k], bad[k]] for k in good})
    corpus = build(PARQUET, tmp_path, path="data/x.parquet")
    items = corpus.items("train")
    assert next(items).id == "a"
    with pytest.raises(PortError) as caught:
        next(items)
    assert str(caught.value).startswith(
        f"corpus: {tmp_path / 'data' / 'x.parquet'}: row 1: {problem}"
    )


def test_an_embedded_image_that_does_not_decode_and_a_file_that_is_not_parquet(
    tmp_path: Path,
) -> None:
    write_parquet(
        tmp_path / "x.parquet",
        {
            "id": ["a", "b"],
            "image": [{"bytes": b"garbage", "path": None}, {"bytes": None, "path": None}],
            "rich_caption": ["x", "y"],
        },
    )
    corpus = build(PARQUET, tmp_path, path="x.parquet", split="train")
    items = corpus.items("train")
    item = next(items)
    with pytest.raises(PortError, match=r"corpus: a \(parquet://.*#row=0\): cannot be decoded"):
        corpus.image(item)
    with pytest.raises(PortError, match=r"x\.parquet: row 1: image has neither bytes nor a path"):
        next(items)

    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    broken = build(PARQUET, tmp_path, path="broken.parquet", split="train")
    with pytest.raises(PortError, match=r"corpus: .*broken\.parquet: not a parquet file"):
        list(broken.items("train"))
    with pytest.raises(PortError, match=r"corpus: .*nothing-\*\.parquet: no parquet file"):
        build(PARQUET, tmp_path, path="nothing-*.parquet", split="train")


# ---- Hugging Face datasets (save_to_disk) -----------------------------------------------------


@pytest.fixture(scope="module")
def hf() -> Iterator[Any]:
    import datasets  # type: ignore[import-untyped,unused-ignore]

    datasets.disable_progress_bars()
    yield datasets
    datasets.enable_progress_bars()


def hf_dataset(hf: Any, directory: Path, rows: list[tuple[str, tuple[int, int, int], str]]) -> Any:
    """A Dataset with an Image column (from PNG files, embedded on save) and a text column."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, colour, _ in rows:
        save_png(directory / f"{key}.png", colour)
        paths.append(str(directory / f"{key}.png"))
    data = {"key": [r[0] for r in rows], "img": paths, "text": [r[2] for r in rows]}
    return hf.Dataset.from_dict(data).cast_column("img", hf.Image())


def test_a_saved_dataset_dict_maps_its_splits_and_columns(tmp_path: Path, hf: Any) -> None:
    train = hf_dataset(hf, tmp_path / "src" / "t", [("a", RED, "red"), ("b", GREEN, "green")])
    held = hf_dataset(hf, tmp_path / "src" / "v", [("c", BLUE, "blue")])
    extra = hf_dataset(hf, tmp_path / "src" / "x", [("d", BLUE, "blue")])
    hf.DatasetDict({"train": train, "validation": held, "test": extra}).save_to_disk(
        str(tmp_path / "saved")
    )
    corpus = build(
        HF_DATASETS,
        tmp_path,
        path="saved",
        splits={"train": "train", "validation": "pool"},
        columns={"id": "key", "image": "img", "rich_caption": "text"},
    )
    assert isinstance(corpus, ArrowDatasetCorpus)
    assert corpus.name == "saved"
    first, second = corpus.items("train")
    assert (first.id, first.rich_caption, first.split) == ("a", "red", "train")
    assert first.image == f"hf-datasets://{tmp_path}/saved#split=train&row=0"
    assert_colour(corpus.image(second), GREEN, (4, 3))
    (pool,) = corpus.items("pool")
    assert (pool.id, pool.split) == ("c", "pool")
    assert_colour(corpus.image(pool), BLUE, (4, 3))
    test_item = pool.model_copy(
        update={"image": f"hf-datasets://{tmp_path}/saved#split=test&row=0"}
    )
    with pytest.raises(PortError, match="not an image of dataset 'saved'"):
        corpus.image(test_item)

    with pytest.raises(
        PortError, match=r"saved: no split 'pool' \(splits: train, validation, test"
    ):
        build(HF_DATASETS, tmp_path, path="saved", splits={"pool": "pool"})
    columns = {"id": "key", "image": "img", "rich_caption": "text"}
    default = build(HF_DATASETS, tmp_path, path="saved", columns=columns)
    assert [i.id for i in default.items("train")] == ["a", "b"]
    assert list(default.items("pool")) == []  # no split named pool: none read
    with pytest.raises(PortError, match=r"saved: a DatasetDict maps its splits with splits"):
        build(HF_DATASETS, tmp_path, path="saved", split="train")


def test_a_saved_dataset_with_a_split_column_and_relative_image_paths(
    tmp_path: Path, hf: Any
) -> None:
    directory = tmp_path / "saved"
    hf.Dataset.from_dict(
        {
            "id": ["a", "b"],
            "image": ["pics/a.png", "pics/b.png"],
            "rich_caption": ["red", "green"],
            "split": ["pool", "train"],
            "tags": [["colour:red"], ["colour:green"]],
        }
    ).save_to_disk(str(directory))
    save_png(directory / "pics" / "a.png", RED)
    save_png(directory / "pics" / "b.png", GREEN)
    corpus = build(HF_DATASETS, tmp_path, path="saved", name="mine")
    (item,) = corpus.items("pool")
    assert item == CorpusItem(
        id="a",
        image=(directory / "pics" / "a.png").as_uri(),
        rich_caption="red",
        tags=["colour:red"],
        split="pool",
    )
    assert_colour(corpus.image(item), RED, (4, 3))
    with pytest.raises(PortError, match=r"one Dataset"):
        build(HF_DATASETS, tmp_path, path="saved", splits={"train": "train"})
    missing = build(HF_DATASETS, tmp_path, path="saved", columns={"rich_caption": "caption"})
    with pytest.raises(PortError) as caught:
        list(missing.items("train"))
    assert str(caught.value) == (
        f"corpus: {directory}: no column 'caption' for rich_caption "
        "(columns: id, image, rich_caption, split, tags)"
    )
    with pytest.raises(PortError, match=r"corpus: .*nowhere: not a saved dataset"):
        build(HF_DATASETS, tmp_path, path="nowhere")


# ---- prompt suites ----------------------------------------------------------------------------


def write_suite(path: Path, *lines: dict[str, Any] | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")


def prompt(id: str, *tags: str, **fields: Any) -> dict[str, Any]:
    return {"id": id, "prompt": f"prompt {id}", "tags": list(tags), **fields}


def test_jsonl_suites_give_each_suite_and_every_tagged_prompt(tmp_path: Path) -> None:
    write_suite(
        tmp_path / "suites" / "standard.jsonl",
        prompt("s1", "skill:count", spec={"count": 3}, skill="count"),
        "",
        prompt("s2", "colour:purple"),
    )
    write_suite(tmp_path / "suites" / "regression.jsonl")
    write_suite(tmp_path / "typo.jsonl", prompt("t1", "skill:count"), prompt("s1", "skill:count"))
    suites = build(
        SUITES,
        tmp_path,
        standard="suites/standard.jsonl",
        regression="suites/regression.jsonl",
        extra={"typography": "typo.jsonl"},
    )
    assert isinstance(suites, JsonlSuites)
    assert isinstance(suites, PromptSuites)
    assert suites.names() == ["standard", "regression", "typography"]
    standard = suites.suite("standard")
    assert [p.id for p in standard] == ["s1", "s2"]
    assert standard[0].spec == {"count": 3}
    assert standard[0].skill == "count"
    assert suites.suite("regression") == []
    assert [p.id for p in suites.tagged("skill:count")] == ["s1", "t1"]  # an id once
    assert suites.tagged("style:anime") == []
    with pytest.raises(KeyError):
        suites.suite("nope")

    # A suite file that changes is read again.
    write_suite(tmp_path / "suites" / "regression.jsonl", prompt("r1", "colour:purple"))
    assert [p.id for p in suites.suite("regression")] == ["r1"]
    assert [p.id for p in suites.tagged("colour:purple")] == ["s2", "r1"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": "b"', "invalid JSON"),
        ("42", "not a JSON object"),
        ({"id": "b"}, "prompt: Field required"),
        (prompt("b", colour="red"), "colour: Extra inputs are not permitted"),
        (prompt(""), "id: String should have at least 1 character"),
        (prompt("a"), "duplicate id 'a'"),
    ],
)
def test_a_broken_suite_line_is_refused_with_its_file_and_line(
    tmp_path: Path, line: dict[str, Any] | str, problem: str
) -> None:
    write_suite(tmp_path / "standard.jsonl", prompt("a"), line)
    write_suite(tmp_path / "regression.jsonl")
    with pytest.raises(PortError) as caught:
        build(SUITES, tmp_path, standard="standard.jsonl", regression="regression.jsonl")
    assert str(caught.value).startswith(f"suites: {tmp_path / 'standard.jsonl'}:2: {problem}")
    assert caught.value.port == "suites"


def test_suite_settings_refuse_an_extra_suite_named_like_a_standard_one(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="suite name 'regression' is empty or taken"):
        SUITES.settings.model_validate(
            {"standard": "s.jsonl", "regression": "r.jsonl", "extra": {"regression": "x.jsonl"}}
        )
    write_suite(tmp_path / "s.jsonl")
    with pytest.raises(PortError, match=r"suites: .*r\.jsonl: no such file"):
        build(SUITES, tmp_path, standard="s.jsonl", regression="r.jsonl")

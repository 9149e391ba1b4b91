"""The training data layer: dataset files, resolution buckets, the pre-encoded cache."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from flywheel.cli.main import app
from model.condition import ConditionEncoder, minilm_condition
from model.vae import ResidualVAE, vae_debug
from tests.helpers import FLYWHEEL_CLI
from training.cache import (
    DONE_FILE,
    CachedBatches,
    CacheError,
    ConsumerConfig,
    ProducerConfig,
    produce,
)
from training.data import (
    SAMPLES_FILE,
    Annotation,
    BucketConfig,
    DatasetError,
    Provenance,
    Sample,
    SampleFilter,
    bucket_image,
    image_to_tensor,
    load_image,
    read_dataset,
    resize_and_crop,
    write_dataset,
)

REPO = Path(__file__).resolve().parents[2]
BUCKETS = BucketConfig(
    target_area=48 * 48, aspect_ratios=(1.0, 2.0, 0.5, 1.5, 2 / 3), multiple_of=8
)
# (width, height) of the test images: buckets 40x56, 64x32, 48x48 and 32x64.
SIZES = [(32, 48), (64, 32), (48, 48), (30, 44), (70, 36), (40, 80), (50, 50)]
VAE_SEED = 7


@pytest.fixture(scope="module")
def encoder(offline: None) -> ConditionEncoder:
    return ConditionEncoder.load(minilm_condition())


@pytest.fixture(scope="module")
def vae() -> ResidualVAE:
    torch.manual_seed(VAE_SEED)
    return ResidualVAE(vae_debug()).eval()


def _provenance(n: int) -> Provenance:
    return Provenance(dataset="toy", split="train", origin_uri=f"file:///toy/{n}.png")


def _make_dataset(root: Path) -> list[Sample]:
    """Random PNGs of SIZES; the fourth sample is an editing sample."""
    generator = torch.Generator().manual_seed(0)
    root.joinpath("images").mkdir(parents=True)
    samples: list[Sample] = []
    for n, (w, h) in enumerate(SIZES):
        pixels = torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy(), "RGB").save(root / f"images/{n}.png")
        editing = n == 3
        samples.append(
            Sample(
                id=f"s{n}",
                image=f"images/{n}.png",
                caption=f"a noisy test picture number {n}" + " with stripes" * (n % 3),
                input_images=["images/0.png"] if editing else [],
                instruction="make it brighter" if editing else None,
                annotation=Annotation(
                    image_type="photograph",
                    style="noise",
                    language="en" if n % 2 else None,
                    watermarks=["ACME"] if n == 1 else [],
                    abnormal_element="mosaic" if n == 2 else None,
                ),
                provenance=_provenance(n),
            )
        )
    write_dataset(root, samples)
    return samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Sample]]:
    root = tmp_path_factory.mktemp("dataset")
    return root, _make_dataset(root)


@pytest.fixture(scope="module")
def cache(
    dataset: tuple[Path, list[Sample]],
    vae: ResidualVAE,
    encoder: ConditionEncoder,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache"
    config = ProducerConfig(buckets=BUCKETS, shard_size=2, batch_size=2)
    produce(dataset[0], out, vae=vae, encoder=encoder, config=config)
    return out


# ---- dataset files ----------------------------------------------------------------------


def test_dataset_round_trip(dataset: tuple[Path, list[Sample]]) -> None:
    root, samples = dataset
    read = read_dataset(root)
    assert read == samples
    assert read[3].is_editing
    assert read[3].instruction == "make it brighter"
    assert read[1].annotation is not None
    assert read[1].annotation.watermarks == ["ACME"]
    assert read[0].provenance.origin_uri == "file:///toy/0.png"


def _line(**changes: Any) -> str:
    raw: dict[str, Any] = {
        "id": "x",
        "image": "images/0.png",
        "caption": "c",
        "provenance": {"dataset": "d", "split": "train", "origin_uri": "u"},
    }
    raw.update(changes)
    return json.dumps({k: v for k, v in raw.items() if v is not None})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "invalid JSON"),
        (_line(caption=None), "caption: Field required"),
        (_line(image="/etc/passwd"), "must be relative"),
        (_line(image="../outside.png"), "must be relative"),
        (_line(image="images/missing.png"), "not found"),
        (_line(input_images=["images/0.png"]), "needs an instruction"),
        (_line(annotation={"image_type": "photo"}), "annotation.style: Field required"),
        (_line(colour="red"), "colour: Extra inputs are not permitted"),
        (_line(id="s0"), "duplicate id 's0'"),
    ],
)
def test_dataset_validation_names_the_line(
    dataset: tuple[Path, list[Sample]], tmp_path: Path, bad: str, message: str
) -> None:
    root, samples = dataset
    (tmp_path / "images").mkdir()
    (tmp_path / "images/0.png").write_bytes((root / "images/0.png").read_bytes())
    lines = [samples[0].model_dump_json(), "", bad]
    (tmp_path / SAMPLES_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=f"{SAMPLES_FILE}:3: .*{message}"):
        read_dataset(tmp_path)


def test_write_dataset_refuses_duplicates_and_missing_images(tmp_path: Path) -> None:
    sample = Sample(id="a", image="a.png", caption="c", provenance=_provenance(0))
    with pytest.raises(DatasetError, match=r"image 'a\.png' not found"):
        write_dataset(tmp_path, [sample])
    with pytest.raises(DatasetError, match="sample 2: duplicate id 'a'"):
        write_dataset(tmp_path, [sample, sample], check_images=False)
    assert not (tmp_path / SAMPLES_FILE).exists()


# ---- buckets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [
        (1024, 1024),
        (1920, 1080),
        (1080, 1920),
        (800, 600),
        (3000, 1000),
        (500, 2000),
        (37, 1111),
        (1023, 1025),
    ],
)
def test_bucket_is_closest_ratio_near_target_area(size: tuple[int, int]) -> None:
    config = BucketConfig()  # 1024^2 pixels, seven ratios, multiples of 32
    width, height = size
    bw, bh = config.assign_bucket(width, height)
    assert bw % 32 == 0
    assert bh % 32 == 0
    assert abs(bw * bh / config.target_area - 1) < 0.05
    closest = min(config.aspect_ratios, key=lambda r: abs(math.log(r * height / width)))
    assert abs(bw / bh - closest) / closest < 0.05
    # No other bucket has a closer aspect ratio.
    distance = abs(math.log(bw / bh) - math.log(width / height))
    for ow, oh in config.buckets():
        assert distance <= abs(math.log(ow / oh) - math.log(width / height)) + 0.05


def test_bucket_image_resizes_and_center_crops() -> None:
    assert [BUCKETS.assign_bucket(w, h) for w, h in SIZES[:3]] == [(40, 56), (64, 32), (48, 48)]
    image = Image.new("RGB", (90, 50))
    assert bucket_image(image, BUCKETS).size == (64, 32)
    # Same height: no resize, only the middle columns are kept.
    pixels = torch.arange(10 * 4 * 3, dtype=torch.uint8).view(4, 10, 3)
    strip = Image.fromarray(pixels.numpy(), "RGB")
    cropped = image_to_tensor(resize_and_crop(strip, (6, 4)))  # (3, 4, 6)
    assert torch.equal(cropped, image_to_tensor(strip)[:, :, 2:8])
    with pytest.raises(ValueError, match="aspect_ratios must be positive"):
        BucketConfig(aspect_ratios=(1.0, -2.0)).assign_bucket(10, 10)


# ---- cache: producer and consumer -------------------------------------------------------


def _read_all(
    cache_dir: Path, config: ConsumerConfig, state: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    return list(CachedBatches(cache_dir, config, state))


def test_cache_round_trip(
    cache: Path,
    dataset: tuple[Path, list[Sample]],
    vae: ResidualVAE,
    encoder: ConditionEncoder,
) -> None:
    root, samples = dataset
    by_id = {s.id: s for s in samples}
    assert (cache / DONE_FILE).is_file()
    assert json.loads((cache / "manifest.json").read_text())["samples"] == len(samples)
    batches = _read_all(cache, ConsumerConfig(batch_size=2, seed=1))
    ids = [i for b in batches for i in b["ids"]]
    assert sorted(ids) == sorted(by_id)  # every sample exactly once
    assert {b["bucket"] for b in batches} == {(40, 56), (64, 32), (48, 48), (32, 64)}
    for batch in batches:
        bw, bh = batch["bucket"]
        assert batch["latents"].shape == (len(batch["ids"]), 8, bh // 8, bw // 8)
        assert batch["mask"].any(dim=0).all()  # trimmed to the longest condition
        for row, sample_id in enumerate(batch["ids"]):
            sample = by_id[sample_id]
            image = load_image(root / sample.image)
            assert batch["bucket"] == BUCKETS.assign_bucket(image.width, image.height)
            pixels = image_to_tensor(bucket_image(image, BUCKETS))[None]
            with torch.no_grad():
                expected = vae.normalize_latents(vae.encode(pixels).mean)[0]
            torch.testing.assert_close(batch["latents"][row], expected, atol=1e-6, rtol=0)
            if sample.is_editing:
                assert sample.instruction is not None
                hidden, mask = encoder.encode([sample.instruction], task="image_editing")
            else:
                hidden, mask = encoder.encode([sample.caption], task="text_to_image")
            length = int(mask.sum())
            assert torch.equal(batch["mask"][row], torch.arange(batch["mask"].shape[1]) < length)
            torch.testing.assert_close(
                batch["condition"][row, :length], hidden[0, :length], atol=1e-5, rtol=1e-5
            )
            assert not batch["condition"][row, length:].any()


def test_consumer_shuffles_by_seed_and_epoch(cache: Path) -> None:
    def order(seed: int, epochs: int) -> list[str]:
        config = ConsumerConfig(batch_size=2, seed=seed, epochs=epochs)
        return [i for b in _read_all(cache, config) for i in b["ids"]]

    two_epochs = order(3, 2)
    assert two_epochs[:7] == order(3, 1)
    assert sorted(two_epochs[:7]) == sorted(two_epochs[7:])
    assert two_epochs[:7] != two_epochs[7:]  # each epoch reshuffles
    assert order(4, 1) != two_epochs[:7]  # another seed, another order
    # The trainer may wrap it in a DataLoader that leaves batching to it.
    loader = DataLoader(CachedBatches(cache, ConsumerConfig(batch_size=2, seed=3)), batch_size=None)
    assert [i for b in loader for i in b["ids"]] == two_epochs[:7]


def _refused(args: list[str]) -> str:
    """``flywheel cache produce ARGS``'s one-line reason; it must exit 2."""
    result = CliRunner().invoke(app, ["cache", "produce", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_cache_produce_refuses_bad_input_in_one_line_and_writes_nothing(
    offline: None, dataset: tuple[Path, list[Sample]], tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / SAMPLES_FILE).write_text("{}\n")
    out = tmp_path / "c"
    debug = ["--vae", "debug", "--multiple-of", "8"]
    data = ["--data", str(dataset[0]), "--cache", str(out)]
    assert "samples.jsonl" in _refused(["--data", str(bad), "--cache", str(out), *debug])
    assert "--vae-weights is required" in _refused(data)
    assert "no such file" in _refused([*data, "--vae-weights", str(tmp_path / "missing")])
    assert "--aspect-ratios" in _refused([*data, *debug, "--aspect-ratios", "1,wide"])
    other = tmp_path / "other.safetensors"  # the weights of another VAE
    save_file({"x": torch.zeros(1)}, str(other))
    assert "not weights of the debug VAE" in _refused([*data, *debug, "--vae-weights", str(other)])
    assert "needs --condition-path" in _refused([*data, *debug, "--condition", "qwen3-vl"])
    assert not out.exists()  # nothing written
    taken = tmp_path / "taken"
    (taken / "x").mkdir(parents=True)
    assert "not an empty directory" in _refused(
        ["--data", str(dataset[0]), "--cache", str(taken), *debug]
    )


@pytest.mark.parametrize(("batch_size", "taken"), [(2, 1), (2, 5), (1, 3), (1, 6), (1, 9)])
def test_consumer_resumes_exactly(cache: Path, batch_size: int, taken: int) -> None:
    """Stop after ``taken`` batches (mid-shard, at a shard end, in the second epoch), resume."""
    config = ConsumerConfig(batch_size=batch_size, seed=5, epochs=2)
    full = _read_all(cache, config)
    first = CachedBatches(cache, config)
    iterator = iter(first)
    head = [next(iterator) for _ in range(taken)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    del iterator
    rest = _read_all(cache, config, state)
    assert len(head) + len(rest) == len(full)
    for got, want in zip(head + rest, full, strict=True):
        assert got["ids"] == want["ids"]
        assert got["bucket"] == want["bucket"]
        assert torch.equal(got["latents"], want["latents"])
        assert torch.equal(got["condition"], want["condition"])


def test_flywheel_cache_produce_in_a_process_feeds_a_consumer_that_started_first(
    cache: Path, dataset: tuple[Path, list[Sample]], vae: ResidualVAE, tmp_path: Path
) -> None:
    weights = tmp_path / "vae.safetensors"
    save_file(vae.state_dict(), str(weights))
    out = tmp_path / "live-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        *FLYWHEEL_CLI, "cache", "produce",
        "--data", str(dataset[0]), "--cache", str(out),
        "--vae", "debug", "--vae-weights", str(weights),
        "--target-area", str(BUCKETS.target_area),
        "--aspect-ratios", ",".join(str(r) for r in BUCKETS.aspect_ratios),
        "--multiple-of", "8", "--shard-size", "2", "--batch-size", "2",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        config = ConsumerConfig(batch_size=2, seed=0, poll_interval=0.05, timeout=120)
        consumer = CachedBatches(out, config)
        iterator = iter(consumer)
        batches = [next(iterator)]
        # The consumer started before the cache existed: it reads shards as they are written.
        assert consumer.state_dict()["order"] == "written"
        batches.extend(iterator)
    finally:
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert stdout.strip() == f"wrote 5 shards to {out}"
    ids = [i for b in batches for i in b["ids"]]
    assert sorted(ids) == sorted(s.id for s in dataset[1])  # all samples, exactly once
    # The subprocess wrote what the in-process producer wrote.
    reference = {
        i: b["latents"][k]
        for b in _read_all(cache, ConsumerConfig(batch_size=2))
        for k, i in enumerate(b["ids"])
    }
    for batch in batches:
        for k, sample_id in enumerate(batch["ids"]):
            torch.testing.assert_close(batch["latents"][k], reference[sample_id], atol=1e-6, rtol=0)


def test_consumer_picks_up_later_shards_and_stops_at_done(cache: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    shards = sorted(cache.glob("*/shard-*.safetensors"), key=lambda p: p.name)
    # Up to two per shard: 64x32 and 48x48 hold 2 samples each, 32x64 one, 40x56 one
    # text-to-image sample and (a shard of its own) one editing sample.
    assert len(shards) == 5

    def publish(shard: Path) -> None:
        (live / shard.parent.name).mkdir(parents=True, exist_ok=True)
        (live / shard.parent.name / shard.name).write_bytes(shard.read_bytes())

    config = ConsumerConfig(batch_size=2, seed=0, poll_interval=0.01, timeout=5)
    iterator = iter(CachedBatches(live, config))
    publish(shards[0])
    # A shard being written (its temporary name) is never read.
    (live / shards[1].parent.name).mkdir(exist_ok=True)
    (live / shards[1].parent.name / f".{shards[1].name}.tmp").write_bytes(b"partial")
    seen = list(next(iterator)["ids"])
    for shard in shards[1:]:
        publish(shard)
        seen.extend(next(iterator)["ids"])
    (live / DONE_FILE).write_text(json.dumps({"shards": len(shards)}))
    assert list(iterator) == []  # the epoch ends at DONE
    assert sorted(seen) == [f"s{n}" for n in range(len(SIZES))]

    empty = CachedBatches(tmp_path / "never", ConsumerConfig(poll_interval=0.01, timeout=0.1))
    with pytest.raises(CacheError, match="no shard 0 and no DONE"):
        next(iter(empty))


# ---- editing samples and filters --------------------------------------------------------


def test_editing_inputs_are_cached_at_the_targets_bucket(
    cache: Path, dataset: tuple[Path, list[Sample]], vae: ResidualVAE
) -> None:
    root, samples = dataset
    editing = samples[3]
    batches = _read_all(cache, ConsumerConfig(batch_size=2, seed=0))
    for batch in batches:
        has_inputs = "input_latents" in batch
        assert has_inputs == (batch["ids"] == [editing.id])  # its own shard
    (batch,) = [b for b in batches if "input_latents" in b]
    bw, bh = batch["bucket"]
    assert (bw, bh) == (40, 56)
    assert batch["input_latents"].shape == (1, 1, 8, bh // 8, bw // 8)  # (B, K, z, h, w)
    # The input (32 x 48 px) is resized and cropped to the target's bucket, then encoded.
    source = load_image(root / editing.input_images[0])
    assert source.size == (32, 48)
    pixels = image_to_tensor(resize_and_crop(source, (bw, bh)))[None]
    with torch.no_grad():
        expected = vae.normalize_latents(vae.encode(pixels).mean)[0]
    torch.testing.assert_close(batch["input_latents"][0, 0], expected, atol=1e-6, rtol=0)
    # The input differs from the target: the two are separate encodings.
    assert not torch.allclose(batch["input_latents"][0, 0], batch["latents"][0])

    # The shard's metadata carries what filters read, without the dataset.
    shard = next(cache.glob("*/shard-*.safetensors"))
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    ids, rows = json.loads(metadata["ids"]), json.loads(metadata["rows"])
    by_id = {s.id: s for s in samples}
    for sample_id, row in zip(ids, rows, strict=True):
        sample = by_id[sample_id]
        annotation = sample.annotation
        assert annotation is not None
        image = load_image(root / sample.image)
        assert row == {
            "dataset": "toy",
            "editing": sample.is_editing,
            "inputs": len(sample.input_images),
            "width": image.width,
            "height": image.height,
            "annotation": annotation.model_dump(),
        }
    assert int(metadata["area"]) == BUCKETS.target_area


ALL = {f"s{n}" for n in range(len(SIZES))}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (ConsumerConfig(), ALL),
        (ConsumerConfig(filter=SampleFilter(max_watermarks=0)), ALL - {"s1"}),
        (ConsumerConfig(filter=SampleFilter(max_watermarks=1)), ALL),
        (ConsumerConfig(filter=SampleFilter(allow_abnormal=False)), ALL - {"s2"}),
        # shortest source sides: 32, 32, 48, 30, 36, 40, 50
        (ConsumerConfig(filter=SampleFilter(min_side=40)), {"s2", "s5", "s6"}),
        # odd samples render English text; the others none (and always pass)
        (ConsumerConfig(filter=SampleFilter(languages=("zh",))), {"s0", "s2", "s4", "s6"}),
        (ConsumerConfig(filter=SampleFilter(languages=("en", "zh"))), ALL),
        (ConsumerConfig(filter=SampleFilter(image_types=("photograph",))), ALL),
        (ConsumerConfig(filter=SampleFilter(datasets=("toy",))), ALL),
        (ConsumerConfig(task="image_editing"), {"s3"}),
        (ConsumerConfig(task="text_to_image"), ALL - {"s3"}),
        (ConsumerConfig(target_area=48 * 48), ALL),
        (
            ConsumerConfig(
                task="text_to_image",
                filter=SampleFilter(max_watermarks=0, allow_abnormal=False, min_side=32),
            ),
            {"s0", "s4", "s5", "s6"},
        ),
    ],
)
def test_filters_select_rows(cache: Path, config: ConsumerConfig, expected: set[str]) -> None:
    config.batch_size, config.seed = 2, 3
    ids = [i for b in _read_all(cache, config) for i in b["ids"]]
    assert sorted(ids) == sorted(expected)  # each selected row once per epoch


@pytest.mark.parametrize(
    "config",
    [
        ConsumerConfig(filter=SampleFilter(image_types=("poster",))),
        ConsumerConfig(filter=SampleFilter(exclude_image_types=("photograph",))),
        ConsumerConfig(filter=SampleFilter(datasets=("elsewhere",))),
        ConsumerConfig(target_area=64 * 64),
        ConsumerConfig(task="image_editing", filter=SampleFilter(min_side=31)),
    ],
)
def test_a_selection_of_nothing_is_an_error(cache: Path, config: ConsumerConfig) -> None:
    config.epochs = None  # would otherwise look for a batch forever
    with pytest.raises(CacheError, match="no sample passes the selection"):
        next(iter(CachedBatches(cache, config)))


def test_unannotated_samples_pass_only_filters_that_ignore_annotations() -> None:
    info = {"dataset": "d", "editing": False, "inputs": 0, "width": 64, "height": 48}
    bare = {**info, "annotation": None}
    assert SampleFilter().accepts(bare)
    assert SampleFilter(min_side=48, datasets=("d",)).accepts(bare)
    assert not SampleFilter(min_side=49).accepts(bare)
    assert not SampleFilter(max_watermarks=3).accepts(bare)
    assert not SampleFilter(allow_abnormal=False).accepts(bare)
    annotated = {**info, "annotation": Annotation(image_type="poster", style="flat").model_dump()}
    assert SampleFilter(max_watermarks=0, allow_abnormal=False).accepts(annotated)
    assert not SampleFilter(exclude_image_types=("poster",)).accepts(annotated)
    with pytest.raises(ValueError, match="max_watermarks"):
        SampleFilter(max_watermarks=-1).validate()


@pytest.mark.parametrize("taken", [1, 2, 4, 6])
def test_filtered_consumer_resumes_exactly(cache: Path, taken: int) -> None:
    """Skipped rows leave no trace in the position: a resumed filtered read continues exactly."""
    config = ConsumerConfig(
        batch_size=2, seed=5, epochs=3, filter=SampleFilter(max_watermarks=0, min_side=32)
    )
    full = _read_all(cache, config)
    ids = [i for b in full for i in b["ids"]]
    assert sorted(ids) == sorted(["s0", "s2", "s4", "s5", "s6"] * 3)
    first = CachedBatches(cache, config)
    iterator = iter(first)
    head = [next(iterator) for _ in range(taken)]
    state = json.loads(json.dumps(first.state_dict()))
    del iterator
    rest = _read_all(cache, config, state)
    assert len(head) + len(rest) == len(full)
    for got, want in zip(head + rest, full, strict=True):
        assert got["ids"] == want["ids"]
        assert torch.equal(got["latents"], want["latents"])

"""Pre-encoded training cache: a producer writes VAE latents and conditions, the trainer reads.

Layout of a cache directory::

    <cache>/manifest.json                      shapes, bucket config, areas, shards (rewritten
                                               at end)
    <cache>/<W>x<H>/shard-<NNNNN>.safetensors   samples of one bucket and one number of input
                                                images; NNNNN counts shards over the whole
                                                cache, in the order written
    <cache>/DONE                               written last: the cache is complete

A shard holds ``latents`` (N, z, h, w) float32, normalized (``vae.normalize_latents`` of the
posterior mean), ``condition`` (N, L, D) float32, right-padded, ``mask`` (N, L) bool, and, for
editing samples with K input images, ``input_latents`` (N, K, z, h, w) float32, normalized like
the latents (text-to-image shards have none). Its metadata holds the sample ids (JSON list), the
bucket ("WxH"), the bucket target area it was made for (``area``) and ``rows``: per row, what
filters read (:func:`training.data.sample_info`: source dataset, task, number of inputs, source
image size, annotation), so the trainer filters without the dataset. Every file is written
under a temporary name and moved in place with ``os.replace`` (:mod:`training.io`), so a reader
never sees a partial shard.

The producer (:func:`produce`, or ``flywheel cache produce``) reads a dataset
(:mod:`training.data`), buckets each target image, encodes it with the VAE and its prompt with
the condition encoder (the caption, or for an editing sample the instruction with the editing
template), and writes a shard per ``shard_size`` samples of a (bucket, number of inputs) group,
then the remainders, the manifest and ``DONE``. An editing sample's input images are encoded
with the same VAE after being resized and center-cropped to the *target's* bucket (so a row's
inputs and target have one latent shape and rows stack; an input of another aspect ratio loses
its borders). With ``extra_areas`` the producer also encodes every sample whose target image has
at least that many pixels at that bucket area (no upsampling): one cache serves every stage of
a resolution curriculum, each stage reading the shards of its area.

The consumer (:class:`CachedBatches`) reads only the cache. It yields batches of one shard at a
time (so every batch is a single bucket and a single number of input images), items shuffled
inside the shard by a seed derived from ``(seed, epoch, shard)``. Shards run in the order they
were written while the cache is still being produced (new shards are picked up by polling, and
the epoch ends at ``DONE``), and in a seeded random order in epochs that start on a complete
cache. It may read only one task's shards (``task``), one bucket area's (``target_area``), and
only the rows a :class:`training.data.SampleFilter` accepts: other shards and rows are skipped,
deterministically, so the order of what is read does not depend on when it is read. Its position
is a small state dict (:meth:`CachedBatches.state_dict`) that a new consumer resumes from
exactly.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor
from torch.utils.data import IterableDataset

from model.condition import TASKS, ConditionEncoder, ConditionTask
from model.vae import ResidualVAE
from training.data import (
    BucketConfig,
    Sample,
    SampleFilter,
    image_to_tensor,
    load_image,
    read_dataset,
    resize_and_crop,
    sample_info,
)
from training.io import atomic_write_bytes

MANIFEST_FILE = "manifest.json"
DONE_FILE = "DONE"
CACHE_VERSION = 2
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_BUCKET_RE = re.compile(r"^(\d+)x(\d+)$")


_PADDED = ("condition", "mask")
"""Shard tensors right-padded along dim 1, trimmed per batch to its longest condition."""


class CacheError(RuntimeError):
    """A cache directory that cannot be written or read as asked."""


# ---- producer ---------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class ProducerConfig:
    """How the producer fills a cache."""

    buckets: BucketConfig = field(default_factory=BucketConfig)
    """Resolution buckets; ``multiple_of`` must be a multiple of the VAE's spatial factor."""
    shard_size: int = 64
    """Samples per shard (the last shard of a bucket may hold fewer)."""
    batch_size: int = 8
    """Samples per VAE / condition encoder call."""
    extra_areas: tuple[int, ...] = ()
    """Further bucket target areas (pixels): a sample whose target image has at least that
    many pixels is also encoded at that area (``buckets`` with its ``target_area`` replaced).
    Every sample is encoded at ``buckets.target_area``."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.buckets.validate()
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("ProducerConfig.shard_size and batch_size must be >= 1")
        areas = self.areas()
        if len(set(areas)) != len(areas):
            raise ValueError(f"ProducerConfig: bucket areas must be distinct, got {areas}")
        for area in self.extra_areas:
            replace(self.buckets, target_area=area).validate()

    def areas(self) -> tuple[int, ...]:
        """Every bucket target area of the cache: ``buckets.target_area``, then the extra."""
        return (self.buckets.target_area, *self.extra_areas)


def _bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def _prompt(sample: Sample) -> tuple[str, ConditionTask]:
    if sample.is_editing:
        assert sample.instruction is not None  # Sample's validator guarantees it
        return sample.instruction, "image_editing"
    return sample.caption, "text_to_image"


def _encode_images(paths: Sequence[Path], bucket: tuple[int, int], vae: ResidualVAE) -> Tensor:
    """(n, z, h, w): normalized posterior means of the images resized and cropped to ``bucket``."""
    channels = vae.config.in_channels
    device = next(vae.parameters()).device
    images = torch.stack(
        [image_to_tensor(resize_and_crop(load_image(p, channels=channels), bucket)) for p in paths]
    )  # (n, C, H, W)
    with torch.no_grad():
        posterior = vae.encode(images.to(device))
        return vae.normalize_latents(posterior.mean).float().cpu()  # (n, z, h, w)


def encode_samples(
    samples: Sequence[Sample],
    data_dir: Path,
    bucket: tuple[int, int],
    *,
    vae: ResidualVAE,
    encoder: ConditionEncoder,
    batch_size: int,
) -> dict[str, Tensor]:
    """Encode samples of one bucket: ``latents`` (N, z, h, w), ``condition`` (N, L, D), ``mask``.

    Latents are the normalized posterior means of the bucketed target images; conditions are
    right-padded to the longest of the N samples. Editing samples (all with the same number K
    of input images) add ``input_latents`` (N, K, z, h, w): their inputs resized and
    center-cropped to the target's ``bucket``, then encoded like the targets.
    """
    inputs = {len(s.input_images) for s in samples}
    if len(inputs) > 1:
        raise ValueError(f"encode_samples needs one number of input images, got {sorted(inputs)}")
    count = inputs.pop() if inputs else 0
    latents: list[Tensor] = []
    input_latents: list[Tensor] = []
    states: dict[int, tuple[Tensor, Tensor]] = {}  # sample position -> ((L_i, D), (L_i,))
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        latents.append(_encode_images([data_dir / s.image for s in chunk], bucket, vae))
        if count:
            per_input = [
                _encode_images([data_dir / s.input_images[k] for s in chunk], bucket, vae)
                for k in range(count)
            ]  # K x (b, z, h, w)
            input_latents.append(torch.stack(per_input, dim=1))  # (b, K, z, h, w)
        # Text-to-image and editing prompts use different templates: encode per task.
        for task in TASKS:
            rows = [start + i for i, s in enumerate(chunk) if _prompt(s)[1] == task]
            if not rows:
                continue
            hidden, mask = encoder.encode([_prompt(samples[n])[0] for n in rows], task=task)
            for k, n in enumerate(rows):
                valid = int(mask[k].sum())
                states[n] = (hidden[k, :valid].float().cpu(), mask[k, :valid].cpu())
    length = max(int(m.shape[0]) for _, m in states.values())
    condition = torch.zeros(len(samples), length, encoder.hidden_size)  # (N, L, D)
    mask_out = torch.zeros(len(samples), length, dtype=torch.bool)  # (N, L)
    for n, (h, m) in states.items():
        condition[n, : h.shape[0]] = h
        mask_out[n, : m.shape[0]] = m
    encoded = {"latents": torch.cat(latents), "condition": condition, "mask": mask_out}
    if count:
        encoded["input_latents"] = torch.cat(input_latents)  # (N, K, z, h, w)
    return encoded


def write_shard(
    cache_dir: Path,
    index: int,
    bucket: tuple[int, int],
    ids: list[str],
    tensors: dict[str, Tensor],
    *,
    rows: list[dict[str, Any]] | None = None,
    area: int | None = None,
) -> Path:
    """Write shard ``index`` of ``bucket`` (``ids``: one per row of the tensors); its path.

    ``rows``: per row, what filters read (:func:`training.data.sample_info`); ``area``: the
    bucket target area the shard was made for. Both go to the metadata when given.
    """
    folder = cache_dir / _bucket_name(bucket)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"shard-{index:05d}.safetensors"
    metadata = {"ids": json.dumps(ids), "bucket": _bucket_name(bucket)}
    if rows is not None:
        if len(rows) != len(ids):
            raise ValueError(f"write_shard: {len(rows)} rows for {len(ids)} ids")
        metadata["rows"] = json.dumps(rows)
    if area is not None:
        metadata["area"] = str(area)
    atomic_write_bytes(
        path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    )
    return path


def begin_cache(
    cache: Path,
    *,
    vae: ResidualVAE,
    encoder: ConditionEncoder,
    buckets: BucketConfig,
    kind: str = "samples",
    areas: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Create the (new or empty) ``cache`` and its incomplete manifest; returns the manifest.

    ``kind``: what a row is, "samples" (latents) or "preferences" (winner / loser latents).
    ``areas``: the bucket target areas of the shards (default: ``buckets.target_area``).
    """
    f = vae.config.spatial_factor
    if buckets.multiple_of % f:
        raise CacheError(
            f"bucket multiple_of {buckets.multiple_of} is not a multiple of the VAE's "
            f"spatial factor {f}"
        )
    if cache.exists() and any(cache.iterdir()):
        raise CacheError(f"cache directory {cache} is not empty")
    cache.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "version": CACHE_VERSION,
        "kind": kind,
        "latent_channels": vae.config.latent_channels,
        "spatial_factor": f,
        "hidden_size": encoder.hidden_size,
        "buckets": asdict(buckets),
        "areas": list(areas) if areas is not None else [buckets.target_area],
        "complete": False,
        "shards": [],
    }
    atomic_write_bytes(cache / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    return manifest


def finish_cache(cache: Path, manifest: dict[str, Any], shards: list[dict[str, Any]]) -> None:
    """Rewrite the manifest with its ``shards`` (``{path, count}``) and mark the cache done."""
    manifest.update(complete=True, shards=shards, samples=sum(s["count"] for s in shards))
    atomic_write_bytes(cache / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    atomic_write_bytes(cache / DONE_FILE, json.dumps({"shards": len(shards)}).encode())


_Group = tuple[int, tuple[int, int], int]
"""A shard's samples share (bucket area, bucket, number of input images)."""


def produce(
    data_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    vae: ResidualVAE,
    encoder: ConditionEncoder,
    config: ProducerConfig,
) -> int:
    """Encode the dataset at ``data_dir`` into the (new or empty) ``cache_dir``; returns shards.

    The dataset is validated whole first (:func:`training.data.read_dataset`). Samples are
    grouped by (bucket area, bucket, number of input images); shards are written as groups
    fill up, then the remainders, the manifest and ``DONE``.
    """
    config.validate()
    data = Path(data_dir)
    cache = Path(cache_dir)
    samples = read_dataset(data)  # validated whole before anything is written
    areas = config.areas()
    manifest = begin_cache(cache, vae=vae, encoder=encoder, buckets=config.buckets, areas=areas)
    bucketings = {area: replace(config.buckets, target_area=area) for area in areas}
    pending: dict[_Group, list[tuple[Sample, dict[str, Any]]]] = {}
    shards: list[dict[str, Any]] = []

    def flush(group: _Group) -> None:
        area, bucket, inputs = group
        batch = pending.pop(group)
        tensors = encode_samples(
            [s for s, _ in batch],
            data,
            bucket,
            vae=vae,
            encoder=encoder,
            batch_size=config.batch_size,
        )
        ids, rows = [s.id for s, _ in batch], [info for _, info in batch]
        path = write_shard(cache, len(shards), bucket, ids, tensors, rows=rows, area=area)
        entry = {"path": str(path.relative_to(cache)), "count": len(batch)}
        shards.append({**entry, "area": area, "inputs": inputs})

    for sample in samples:
        with Image.open(data / sample.image) as image:  # reads the header only
            width, height = image.width, image.height
        info = sample_info(sample, width, height)
        for area in areas:
            if area != config.buckets.target_area and width * height < area:
                continue  # no upsampling to the extra areas
            bucket = bucketings[area].assign_bucket(width, height)
            group = (area, bucket, len(sample.input_images))
            pending.setdefault(group, []).append((sample, info))
            if len(pending[group]) >= config.shard_size:
                flush(group)
    for group in list(pending):
        flush(group)
    finish_cache(cache, manifest, shards)
    return len(shards)


# ---- consumer ---------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class ConsumerConfig:
    """How the trainer reads a cache."""

    batch_size: int = 8
    """Samples per batch (a shard's last batch may hold fewer)."""
    seed: int = 0
    """Seed of the shard order and of the item order inside shards."""
    epochs: int | None = 1
    """Epochs to run; None: forever."""
    poll_interval: float = 0.2
    """Seconds between looks for new shards while the cache is being produced."""
    timeout: float = 600.0
    """Seconds to wait for a new shard (or ``DONE``) before raising :class:`CacheError`."""
    task: ConditionTask | None = None
    """Read only the shards of this task ("text_to_image": no input images, "image_editing":
    with input images); None: both."""
    target_area: int | None = None
    """Read only the shards made for this bucket target area (see ``ProducerConfig``); None:
    every area."""
    filter: SampleFilter = field(default_factory=SampleFilter)
    """Read only the rows it accepts (by the shards' ``rows`` metadata)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.batch_size < 1:
            raise ValueError(f"ConsumerConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"ConsumerConfig.epochs must be >= 1 or None, got {self.epochs}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"ConsumerConfig.task {self.task!r} is not one of {TASKS}")
        if self.target_area is not None and self.target_area < 1:
            raise ValueError(f"ConsumerConfig.target_area must be >= 1, got {self.target_area}")
        self.filter.validate()

    def selection(self) -> str:
        """What is read, in words (for error messages)."""
        parts = [f"task={self.task}"] if self.task is not None else []
        if self.target_area is not None:
            parts.append(f"target_area={self.target_area}")
        if not self.filter.keeps_everything:
            parts.append(f"filter={self.filter}")
        return ", ".join(parts) or "everything"


@dataclass(kw_only=True, slots=True)
class CachePosition:
    """Where the next batch starts."""

    epoch: int = 0
    """Epoch of the next batch."""
    shard: int = 0
    """Position of its shard in the epoch's shard order."""
    offset: int = 0
    """Its first item, in the shard's shuffled item order."""
    order: Literal["written", "shuffled"] | None = None
    """The epoch's shard order; None: not chosen yet (the epoch has not started)."""
    bucket: str | None = None
    """Bucket of the shard at ``shard`` ("WxH") once known; checked on resume."""


def _scan_shards(cache: Path) -> dict[int, Path]:
    """Every complete shard of the cache, by index."""
    found: dict[int, Path] = {}
    if not cache.is_dir():  # the producer has not started yet
        return found
    for folder in cache.iterdir():
        if folder.is_dir() and _BUCKET_RE.match(folder.name):
            for path in folder.iterdir():
                match = _SHARD_RE.match(path.name)
                if match:
                    found[int(match.group(1))] = path
    return found


def _done_shards(cache: Path) -> int | None:
    """Total shards once ``DONE`` is written, else None."""
    done = cache / DONE_FILE
    if not done.is_file():
        return None
    return int(json.loads(done.read_text())["shards"])


def _permutation(n: int, *seeds: int) -> list[int]:
    generator = torch.Generator().manual_seed(hash_seeds(*seeds))
    return [int(i) for i in torch.randperm(n, generator=generator)]


def hash_seeds(*values: int) -> int:
    """A deterministic 63-bit seed from integers (stable across processes and runs)."""
    mixed = 0x9E3779B97F4A7C15
    for value in values:
        mixed = ((mixed ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        mixed ^= mixed >> 31
    return mixed & 0x7FFFFFFFFFFFFFFF


class CachedBatches(IterableDataset[dict[str, Any]]):
    """Batches from a cache directory, one bucket per batch, resumable; see the module doc.

    Each batch is a dict: ``latents`` (B, z, h, w) (and any other per-sample tensor the
    shards hold: an editing shard's ``input_latents`` (B, K, z, h, w), a preference cache's
    ``winner_latents`` / ``loser_latents``), ``condition`` (B, L, D) trimmed to the batch's
    longest condition, ``mask`` (B, L) bool, ``ids`` (list of B str), ``bucket``
    ``(width, height)``. Use it directly or in a ``DataLoader(batch_size=None)`` with no
    worker processes (the position lives in this object).

    An epoch in which nothing passes the selection (task, area, filter) raises
    :class:`CacheError` rather than looping forever.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        config: ConsumerConfig,
        state: dict[str, Any] | None = None,
    ) -> None:
        config.validate()
        self.cache = Path(cache_dir)
        self.config = config
        self.position = CachePosition()
        if state is not None:
            self.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch: ``{epoch, shard, offset, order, bucket}``."""
        return asdict(self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.position = CachePosition(**state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pos = self.position
        while self.config.epochs is None or pos.epoch < self.config.epochs:
            whole_epoch = pos.shard == 0 and pos.offset == 0  # not resumed mid-epoch
            yielded = 0
            if pos.order is None:
                pos.order = "shuffled" if _done_shards(self.cache) is not None else "written"
            order = self._shard_order(pos.epoch, pos.order)
            while True:
                index = self._shard_index(order, pos.shard)
                if index is None:  # the epoch is over
                    break
                path = self._wait_for_shard(index)
                bucket = path.parent.name
                if pos.bucket is not None and pos.bucket != bucket:
                    raise CacheError(
                        f"resume state names bucket {pos.bucket} at shard {pos.shard}, but the "
                        f"cache has {bucket} there: not the same cache or seed"
                    )
                pos.bucket = bucket
                for batch in self._shard_batches(path, pos, index):
                    yielded += 1
                    yield batch
                pos.shard, pos.offset, pos.bucket = pos.shard + 1, 0, None
            if whole_epoch and not yielded:
                raise CacheError(
                    f"{self.cache}: no sample passes the selection ({self.config.selection()})"
                )
            self.position = pos = CachePosition(epoch=pos.epoch + 1)

    def _shard_order(self, epoch: int, order: str) -> list[int] | None:
        """Shard indexes of the epoch in order; None: written order, still growing."""
        if order == "written":
            return None
        total = _done_shards(self.cache)
        if total is None:
            raise CacheError(f"{self.cache}: a shuffled epoch needs a complete cache (DONE)")
        return _permutation(total, self.config.seed, epoch, -1)

    def _shard_index(self, order: list[int] | None, position: int) -> int | None:
        if order is not None:
            return order[position] if position < len(order) else None
        deadline = time.monotonic() + self.config.timeout
        while True:
            if position in _scan_shards(self.cache):
                return position
            total = _done_shards(self.cache)
            if total is not None:
                return position if position < total else None
            if time.monotonic() > deadline:
                raise CacheError(f"{self.cache}: no shard {position} and no DONE after waiting")
            time.sleep(self.config.poll_interval)

    def _wait_for_shard(self, index: int) -> Path:
        deadline = time.monotonic() + self.config.timeout
        while True:
            path = _scan_shards(self.cache).get(index)
            if path is not None:
                return path
            if _done_shards(self.cache) is not None:
                raise CacheError(f"{self.cache}: DONE is written but shard {index} is missing")
            if time.monotonic() > deadline:
                raise CacheError(f"{self.cache}: shard {index} did not appear")
            time.sleep(self.config.poll_interval)

    def _selected_rows(self, path: Path, metadata: dict[str, str], names: set[str]) -> set[int]:
        """Rows of the shard that the task, area and filter select (read from the metadata)."""
        config = self.config
        if config.task is not None:
            task: ConditionTask = "image_editing" if "input_latents" in names else "text_to_image"
            if task != config.task:
                return set()
        if config.target_area is not None:
            area = metadata.get("area")
            if area is None or int(area) != config.target_area:
                return set()
        count = len(json.loads(metadata["ids"]))
        if config.filter.keeps_everything:
            return set(range(count))
        if "rows" not in metadata:
            raise CacheError(f"{path}: no rows metadata to filter by (a cache made before filters)")
        rows = json.loads(metadata["rows"])
        return {n for n, row in enumerate(rows) if config.filter.accepts(row)}

    def _shard_batches(
        self, path: Path, pos: CachePosition, index: int
    ) -> Iterator[dict[str, Any]]:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            names = set(handle.keys())
        ids: list[str] = json.loads(metadata["ids"])
        match = _BUCKET_RE.match(metadata["bucket"])
        if match is None:
            raise CacheError(f"{path}: bad bucket {metadata['bucket']!r}")
        bucket = (int(match.group(1)), int(match.group(2)))
        selected = self._selected_rows(path, metadata, names)
        if not selected:  # skipped whole, without loading its tensors
            pos.offset = len(ids)
            return
        tensors = load_file(str(path))
        items = _permutation(len(ids), self.config.seed, pos.epoch, index)
        while pos.offset < len(items):
            # The next batch_size selected rows in the shuffled order; offset passes them.
            rows: list[int] = []
            cursor = pos.offset
            while cursor < len(items) and len(rows) < self.config.batch_size:
                if items[cursor] in selected:
                    rows.append(items[cursor])
                cursor += 1
            if not rows:  # only unselected rows were left
                pos.offset = cursor
                break
            pick = torch.tensor(rows)
            mask = tensors["mask"][pick]  # (B, L_shard)
            length = max(1, int(mask.sum(dim=1).max()))
            batch: dict[str, Any] = {
                # latents (B, z, h, w) and any other per-sample tensor of the shard
                key: value[pick]
                for key, value in tensors.items()
                if key not in _PADDED
            }
            batch["condition"] = tensors["condition"][pick, :length]  # (B, L, D)
            batch["mask"] = mask[:, :length]  # (B, L)
            batch.update(ids=[ids[r] for r in rows], bucket=bucket)
            pos.offset = cursor
            yield batch

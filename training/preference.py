"""Preference pairs (for Diffusion-DPO): their on-disk format and their pre-encoded cache.

A preference dataset is a dataset directory (:mod:`training.data`) plus a pair index::

    <dir>/samples.jsonl     the images of both sides, as samples
    <dir>/pairs.jsonl       one :class:`PreferencePair` per line: a winner and a loser sample
                            that answer the same prompt

Pairs come from pairwise feedback in the product apps, from a reward model ranking several
samples of one prompt, or (tests, debug recipe) from :mod:`training.synthetic`.
:func:`read_pairs` validates every line against the samples and raises
:class:`training.data.DatasetError` naming the file and line of the first bad one.

:func:`produce_preferences` encodes a preference dataset into a cache of the layout of
:mod:`training.cache`, ``kind: "preferences"`` in its manifest, with per-row tensors
``winner_latents`` and ``loser_latents`` (N, z, h, w) (both sides resized to the winner's
bucket), the shared prompt's ``condition`` (N, L, D) and ``mask`` (N, L); the row ids are
the pair ids. :class:`training.cache.CachedBatches` reads it like any cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.condition import ConditionEncoder
from model.vae import ResidualVAE
from training.cache import ProducerConfig, begin_cache, encode_samples, finish_cache, write_shard
from training.data import DatasetError, Sample, read_dataset, validation_problems
from training.io import atomic_write_text

PAIRS_FILE = "pairs.jsonl"
"""Name of the pair index inside a preference dataset directory."""


class PreferencePair(BaseModel):
    """One line of ``pairs.jsonl``: the winner was preferred to the loser for one prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    """Unique within the dataset."""
    winner: str = Field(min_length=1)
    """Id of the preferred sample."""
    loser: str = Field(min_length=1)
    """Id of the other sample (same prompt)."""
    source: str | None = None
    """Where the preference comes from (e.g. "feedback:pairwise", "reward:alignment")."""


def _prompt_key(sample: Sample) -> tuple[str, ...]:
    """What two samples of one pair must share: the prompt and, for editing, the inputs."""
    if sample.is_editing:
        return (sample.instruction or "", *sample.input_images)
    return (sample.caption,)


def _check_pair(pair: PreferencePair, samples: dict[str, Sample], where: str) -> None:
    for side in (pair.winner, pair.loser):
        if side not in samples:
            raise DatasetError(f"{where}: pair {pair.id!r} names unknown sample {side!r}")
    if pair.winner == pair.loser:
        raise DatasetError(f"{where}: pair {pair.id!r} has the same winner and loser")
    if _prompt_key(samples[pair.winner]) != _prompt_key(samples[pair.loser]):
        raise DatasetError(f"{where}: pair {pair.id!r}: winner and loser answer different prompts")


def write_pairs(directory: str | os.PathLike[str], pairs: Iterable[PreferencePair]) -> Path:
    """Write ``pairs`` as ``<directory>/pairs.jsonl`` (atomically), checked against the samples."""
    root = Path(directory)
    samples = {s.id: s for s in read_dataset(root)}
    seen: set[str] = set()
    lines: list[str] = []
    for number, pair in enumerate(pairs, start=1):
        if pair.id in seen:
            raise DatasetError(f"pair {number}: duplicate id {pair.id!r}")
        seen.add(pair.id)
        _check_pair(pair, samples, f"pair {number}")
        lines.append(pair.model_dump_json())
    target = root / PAIRS_FILE
    atomic_write_text(target, "".join(line + "\n" for line in lines))
    return target


def read_pairs(
    directory: str | os.PathLike[str], samples: Iterable[Sample] | None = None
) -> list[PreferencePair]:
    """The validated pairs of a preference dataset (samples read from it unless given)."""
    root = Path(directory)
    path = root / PAIRS_FILE
    if not path.is_file():
        raise DatasetError(f"{root}: no {PAIRS_FILE}")
    by_id = {s.id: s for s in (read_dataset(root) if samples is None else samples)}
    pairs: list[PreferencePair] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                pair = PreferencePair.model_validate(json.loads(line))
            except json.JSONDecodeError as error:
                raise DatasetError(f"{where}: invalid JSON: {error}") from None
            except ValidationError as error:
                problems = validation_problems(error, "pair")
                raise DatasetError(f"{where}: invalid pair: {problems}") from None
            if pair.id in seen:
                raise DatasetError(f"{where}: duplicate id {pair.id!r}")
            seen.add(pair.id)
            _check_pair(pair, by_id, where)
            pairs.append(pair)
    if not pairs:
        raise DatasetError(f"{path}: no pairs")
    return pairs


def produce_preferences(
    data_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    vae: ResidualVAE,
    encoder: ConditionEncoder,
    config: ProducerConfig,
) -> int:
    """Encode the preference dataset at ``data_dir`` into ``cache_dir``; returns shards.

    Everything is validated before anything is written; see the module docstring.
    """
    config.validate()
    data = Path(data_dir)
    cache = Path(cache_dir)
    samples = read_dataset(data)
    by_id = {s.id: s for s in samples}
    pairs = read_pairs(data, samples)
    manifest = begin_cache(
        cache, vae=vae, encoder=encoder, buckets=config.buckets, kind="preferences"
    )
    pending: dict[tuple[int, int], list[PreferencePair]] = {}
    shards: list[dict[str, Any]] = []

    def flush(bucket: tuple[int, int]) -> None:
        batch = pending.pop(bucket)
        winners = encode_samples(
            [by_id[p.winner] for p in batch],
            data,
            bucket,
            vae=vae,
            encoder=encoder,
            batch_size=config.batch_size,
        )
        losers = encode_samples(
            [by_id[p.loser] for p in batch],
            data,
            bucket,
            vae=vae,
            encoder=encoder,
            batch_size=config.batch_size,
        )
        tensors = {
            "winner_latents": winners["latents"],  # (N, z, h, w)
            "loser_latents": losers["latents"],  # (N, z, h, w)
            "condition": winners["condition"],  # (N, L, D): the shared prompt
            "mask": winners["mask"],  # (N, L)
        }
        path = write_shard(cache, len(shards), bucket, [p.id for p in batch], tensors)
        shards.append({"path": str(path.relative_to(cache)), "count": len(batch)})

    for pair in pairs:
        with Image.open(data / by_id[pair.winner].image) as image:  # reads the header only
            bucket = config.buckets.assign_bucket(image.width, image.height)
        pending.setdefault(bucket, []).append(pair)
        if len(pending[bucket]) >= config.shard_size:
            flush(bucket)
    for bucket in list(pending):
        flush(bucket)
    finish_cache(cache, manifest, shards)
    return len(shards)

"""A small generated dataset for pretraining tests and the debug recipe.

Solid backgrounds with one coloured shape (circle, square or triangle) and a caption naming
them (:func:`write_synthetic_dataset`), encoded into a training cache with the VAE's seeded
random weights (:func:`build_synthetic_cache`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from model.condition import ConditionEncoder
from model.vae import ResidualVAE
from training.cache import ProducerConfig, produce
from training.data import BucketConfig, Provenance, Sample, write_dataset
from training.io import fsync_directory
from training.recipes import SyntheticDataConfig

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
_SHAPES = ("circle", "square", "triangle")


def write_synthetic_dataset(directory: Path, config: SyntheticDataConfig) -> list[Sample]:
    """Write ``config.images`` shape images and their captions as a dataset at ``directory``."""
    generator = torch.Generator().manual_seed(config.seed)
    names = list(_COLOURS)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    size = config.size
    for n in range(config.images):
        bg, fg = (int(i) for i in torch.randperm(len(names), generator=generator)[:2])
        shape = _SHAPES[int(torch.randint(len(_SHAPES), (1,), generator=generator))]
        image = Image.new("RGB", (size, size), _COLOURS[names[bg]])
        draw = ImageDraw.Draw(image)
        lo, hi = size // 5, size - size // 5
        if shape == "circle":
            draw.ellipse((lo, lo, hi, hi), fill=_COLOURS[names[fg]])
        elif shape == "square":
            draw.rectangle((lo, lo, hi, hi), fill=_COLOURS[names[fg]])
        else:
            draw.polygon([(size // 2, lo), (hi, hi), (lo, hi)], fill=_COLOURS[names[fg]])
        image.save(directory / f"images/{n}.png")
        samples.append(
            Sample(
                id=f"synthetic-{n}",
                image=f"images/{n}.png",
                caption=f"a {names[fg]} {shape} on a {names[bg]} background",
                provenance=Provenance(
                    dataset="synthetic-shapes", split="train", origin_uri=f"synthetic:{n}"
                ),
            )
        )
    write_dataset(directory, samples)
    return samples


def build_synthetic_cache(cache_dir: Path, config: SyntheticDataConfig) -> None:
    """Generate the dataset and encode it into ``cache_dir`` (built aside, moved in place)."""
    work = cache_dir.with_name(f".{cache_dir.name}.tmp")
    if work.exists():  # left by a run killed while building
        shutil.rmtree(work)
    write_synthetic_dataset(work / "dataset", config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vae = ResidualVAE(config.vae).eval()
    encoder = ConditionEncoder.load(config.condition)
    buckets = BucketConfig(
        target_area=config.size * config.size,
        aspect_ratios=(1.0,),
        multiple_of=config.vae.spatial_factor,
    )
    produce(
        work / "dataset",
        work / "cache",
        vae=vae,
        encoder=encoder,
        config=ProducerConfig(buckets=buckets, shard_size=config.shard_size),
    )
    os.replace(work / "cache", cache_dir)
    fsync_directory(cache_dir.parent)
    shutil.rmtree(work)

"""A small generated dataset for pretraining tests and the debug recipe.

Solid backgrounds with one coloured shape (circle, square or triangle) and a caption naming
them (:func:`write_synthetic_dataset`), encoded into a training cache with the VAE's seeded
random weights (:func:`build_synthetic_cache`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from model.condition import ConditionEncoder, ConditionEncoderConfig, minilm_condition
from model.vae import ResidualVAE, VAEConfig, vae_debug
from training.cache import ProducerConfig, produce
from training.data import BucketConfig, Provenance, Sample, write_dataset
from training.io import fsync_directory
from training.preference import PreferencePair, produce_preferences, write_pairs


@dataclass(kw_only=True, slots=True)
class SyntheticDataConfig:
    """A small generated dataset: solid backgrounds with one coloured shape, and captions.

    Written with :mod:`training.data` and encoded with :func:`training.cache.produce` (the VAE
    with seeded random weights, the condition encoder as configured).
    """

    images: int = 16
    """Number of images (and samples)."""
    size: int = 32
    """Side of the square images, in pixels (a multiple of the VAE's spatial factor)."""
    seed: int = 0
    """Seed of the colours and shapes and of the VAE's random weights."""
    vae: VAEConfig = field(default_factory=vae_debug)
    """The VAE that encodes the images (random weights)."""
    condition: ConditionEncoderConfig = field(default_factory=minilm_condition)
    """The condition encoder of the captions."""
    shard_size: int = 8
    """Samples per cache shard."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.images < 1 or self.shard_size < 1:
            raise ValueError("SyntheticDataConfig: images and shard_size must be >= 1")
        factor = self.vae.spatial_factor
        if self.size < 1 or self.size % factor:
            raise ValueError(
                f"SyntheticDataConfig.size must be a positive multiple of the VAE's spatial "
                f"factor {factor}, got {self.size}"
            )


_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
_SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, fg: str, bg: str, size: int) -> Image.Image:
    """A ``size`` x ``size`` image: ``shape`` in colour ``fg`` on a ``bg`` background."""
    image = Image.new("RGB", (size, size), _COLOURS[bg])
    draw = ImageDraw.Draw(image)
    lo, hi = size // 5, size - size // 5
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=_COLOURS[fg])
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=_COLOURS[fg])
    else:
        draw.polygon([(size // 2, lo), (hi, hi), (lo, hi)], fill=_COLOURS[fg])
    return image


def _scenes(config: SyntheticDataConfig) -> list[tuple[str, str, str, str]]:
    """``config.images`` seeded scenes: (shape, foreground, background, another colour)."""
    generator = torch.Generator().manual_seed(config.seed)
    names = list(_COLOURS)
    scenes = []
    for _ in range(config.images):
        bg, fg, other = (int(i) for i in torch.randperm(len(names), generator=generator)[:3])
        shape = _SHAPES[int(torch.randint(len(_SHAPES), (1,), generator=generator))]
        scenes.append((shape, names[fg], names[bg], names[other]))
    return scenes


def _provenance(n: int, variant: str = "") -> Provenance:
    return Provenance(
        dataset="synthetic-shapes", split="train", origin_uri=f"synthetic:{n}{variant}"
    )


def write_synthetic_dataset(directory: Path, config: SyntheticDataConfig) -> list[Sample]:
    """Write ``config.images`` shape images and their captions as a dataset at ``directory``."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    for n, (shape, fg, bg, _) in enumerate(_scenes(config)):
        _draw(shape, fg, bg, config.size).save(directory / f"images/{n}.png")
        samples.append(
            Sample(
                id=f"synthetic-{n}",
                image=f"images/{n}.png",
                caption=f"a {fg} {shape} on a {bg} background",
                provenance=_provenance(n),
            )
        )
    write_dataset(directory, samples)
    return samples


def write_synthetic_preferences(
    directory: Path, config: SyntheticDataConfig
) -> list[PreferencePair]:
    """A preference dataset at ``directory``: per scene, the right image beats one whose shape
    has the wrong colour (same caption, same background)."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    pairs: list[PreferencePair] = []
    for n, (shape, fg, bg, other) in enumerate(_scenes(config)):
        caption = f"a {fg} {shape} on a {bg} background"
        for side, colour in (("winner", fg), ("loser", other)):
            _draw(shape, colour, bg, config.size).save(directory / f"images/{n}-{side}.png")
            samples.append(
                Sample(
                    id=f"synthetic-{n}-{side}",
                    image=f"images/{n}-{side}.png",
                    caption=caption,
                    provenance=_provenance(n, f"/{side}"),
                )
            )
        pairs.append(
            PreferencePair(
                id=f"pair-{n}",
                winner=f"synthetic-{n}-winner",
                loser=f"synthetic-{n}-loser",
                source="synthetic:wrong-colour",
            )
        )
    write_dataset(directory, samples)
    write_pairs(directory, pairs)
    return pairs


def build_synthetic_cache(
    cache_dir: Path, config: SyntheticDataConfig, *, preferences: bool = False
) -> None:
    """Generate the dataset (or, with ``preferences``, the preference dataset) and encode it
    into ``cache_dir`` (built aside, moved in place)."""
    work = cache_dir.with_name(f".{cache_dir.name}.tmp")
    if work.exists():  # left by a run killed while building
        shutil.rmtree(work)
    if preferences:
        write_synthetic_preferences(work / "dataset", config)
    else:
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
    producer = ProducerConfig(buckets=buckets, shard_size=config.shard_size)
    produce_cache = produce_preferences if preferences else produce
    produce_cache(work / "dataset", work / "cache", vae=vae, encoder=encoder, config=producer)
    os.replace(work / "cache", cache_dir)
    fsync_directory(cache_dir.parent)
    shutil.rmtree(work)

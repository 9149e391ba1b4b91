"""A small generated dataset for pretraining tests and the debug recipes.

Solid backgrounds with one coloured shape (circle, square or triangle) and a caption naming
them (:func:`write_synthetic_dataset`), encoded into a training cache with the VAE's seeded
random weights (:func:`build_synthetic_cache`). Optionally (the curriculum and SFT debug
recipes):

* editing samples: an input image and the same scene with the shape recoloured, with the
  instruction "make the <shape> <colour>" (provenance dataset ``synthetic-edits``);
* images at several sizes (``extra_sizes``), each cached at every size's bucket area its
  image covers, so a stage's ``target_area`` picks a resolution;
* annotations that filters act on, drawn into the pixels: a "wm" watermark, a QR-code-like
  abnormal element, and the image type ("icon": a larger shape, or "illustration").
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
from training.cache import ProducerConfig, hash_seeds, produce
from training.data import Annotation, BucketConfig, Provenance, Sample, write_dataset
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
    editing_images: int = 0
    """Editing samples added after the text-to-image ones (recolour the shape)."""
    extra_sizes: tuple[int, ...] = ()
    """Further image sides: sample n is drawn at ``(size, *extra_sizes)[n % count]`` pixels
    (text-to-image and editing samples counted separately) and cached at every side's
    area its image covers."""
    annotate: bool = False
    """Annotate every sample (seeded: a quarter each with a watermark, an abnormal element,
    the "icon" type), the marks drawn into its images; False: no annotations."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.images < 1 or self.shard_size < 1:
            raise ValueError("SyntheticDataConfig: images and shard_size must be >= 1")
        if self.editing_images < 0:
            raise ValueError(
                f"SyntheticDataConfig.editing_images must be >= 0, got {self.editing_images}"
            )
        factor = self.vae.spatial_factor
        for size in self.sizes():
            if size < 1 or size % factor:
                raise ValueError(
                    f"SyntheticDataConfig.size must be a positive multiple of the VAE's spatial "
                    f"factor {factor}, got {size}"
                )
        if len(set(self.sizes())) != len(self.sizes()):
            raise ValueError(f"SyntheticDataConfig: sizes must be distinct, got {self.sizes()}")

    def sizes(self) -> tuple[int, ...]:
        """Every image side: ``size``, then ``extra_sizes``."""
        return (self.size, *self.extra_sizes)


_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
_SHAPES = ("circle", "square", "triangle")


def _draw(
    shape: str, fg: str, bg: str, size: int, annotation: Annotation | None = None, mark: int = 0
) -> Image.Image:
    """A ``size`` x ``size`` image: ``shape`` in colour ``fg`` on a ``bg`` background, with
    the ``annotation``'s marks (``mark`` seeds the abnormal element's pattern)."""
    image = Image.new("RGB", (size, size), _COLOURS[bg])
    draw = ImageDraw.Draw(image)
    icon = annotation is not None and annotation.image_type == "icon"
    margin = size // 10 if icon else size // 5
    lo, hi = margin, size - margin
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=_COLOURS[fg])
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=_COLOURS[fg])
    else:
        draw.polygon([(size // 2, lo), (hi, hi), (lo, hi)], fill=_COLOURS[fg])
    if annotation is not None and annotation.abnormal_element is not None:
        cells = torch.Generator().manual_seed(mark)
        side = size // 3 // 2 * 2  # a QR-code-like block of 2 x 2 cells, top left
        pattern = torch.randint(2, (side // 2, side // 2), generator=cells)
        for row in range(side // 2):
            for col in range(side // 2):
                colour = (0, 0, 0) if pattern[row, col] else (255, 255, 255)
                draw.rectangle((2 * col, 2 * row, 2 * col + 1, 2 * row + 1), fill=colour)
    if annotation is not None and annotation.watermarks:
        draw.text((size - 14, size - 12), "wm", fill=(128, 128, 128))
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


def _provenance(n: int, variant: str = "", dataset: str = "synthetic-shapes") -> Provenance:
    return Provenance(dataset=dataset, split="train", origin_uri=f"synthetic:{n}{variant}")


def _annotations(config: SyntheticDataConfig, count: int, stream: int) -> list[Annotation | None]:
    """``count`` seeded annotations (all None unless ``config.annotate``)."""
    if not config.annotate:
        return [None] * count
    generator = torch.Generator().manual_seed(hash_seeds(config.seed, stream))
    draws = torch.rand(count, 3, generator=generator)  # (count, 3)
    return [
        Annotation(
            image_type="icon" if float(u[0]) < 0.25 else "illustration",
            style="flat design",
            watermarks=["wm"] if float(u[1]) < 0.25 else [],
            abnormal_element="QR code" if float(u[2]) < 0.25 else None,
        )
        for u in draws
    ]


def write_synthetic_dataset(directory: Path, config: SyntheticDataConfig) -> list[Sample]:
    """Write the shape images (and editing pairs) with their captions as a dataset at
    ``directory``."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    sizes = config.sizes()
    annotations = _annotations(config, config.images, 1)
    for n, (shape, fg, bg, _) in enumerate(_scenes(config)):
        size, annotation = sizes[n % len(sizes)], annotations[n]
        _draw(shape, fg, bg, size, annotation, mark=n).save(directory / f"images/{n}.png")
        samples.append(
            Sample(
                id=f"synthetic-{n}",
                image=f"images/{n}.png",
                caption=f"a {fg} {shape} on a {bg} background",
                annotation=annotation,
                provenance=_provenance(n),
            )
        )
    edits = SyntheticDataConfig(images=max(1, config.editing_images), seed=config.seed + 1)
    annotations = _annotations(config, config.editing_images, 2)
    for n, (shape, before, bg, after) in enumerate(_scenes(edits)[: config.editing_images]):
        size, annotation = sizes[n % len(sizes)], annotations[n]
        target, source = f"images/edit-{n}.png", f"images/edit-{n}-input.png"
        mark = config.images + n
        _draw(shape, before, bg, size, annotation, mark=mark).save(directory / source)
        _draw(shape, after, bg, size, annotation, mark=mark).save(directory / target)
        samples.append(
            Sample(
                id=f"synthetic-edit-{n}",
                image=target,
                caption=f"a {after} {shape} on a {bg} background",
                input_images=[source],
                instruction=f"make the {shape} {after}",
                annotation=annotation,
                provenance=_provenance(n, "/edit", dataset="synthetic-edits"),
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
    into ``cache_dir`` (built aside, moved in place).

    The buckets are square: ``size`` squared pixels, and each of ``extra_sizes`` squared for
    the images that cover it. The preference dataset ignores the editing, size and annotation
    options."""
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
    extra = () if preferences else tuple(s * s for s in config.extra_sizes)
    producer = ProducerConfig(buckets=buckets, shard_size=config.shard_size, extra_areas=extra)
    produce_cache = produce_preferences if preferences else produce
    produce_cache(work / "dataset", work / "cache", vae=vae, encoder=encoder, config=producer)
    os.replace(work / "cache", cache_dir)
    fsync_directory(cache_dir.parent)
    shutil.rmtree(work)

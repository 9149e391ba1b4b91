"""The on-disk training dataset of the generator, and its resolution buckets.

A dataset is a directory::

    <dir>/samples.jsonl     one JSON object per line: a :class:`Sample`
    <dir>/<image paths>     the PNG files the samples reference, by paths relative to <dir>

A sample holds a target image and its caption, optional editing fields (input images and an
instruction), the structured annotation of the Qwen-Image report (:class:`Annotation`: image
type, style, text language, watermarks, abnormal element) and its provenance
(:class:`Provenance`). :func:`write_dataset` writes ``samples.jsonl`` atomically;
:func:`read_dataset` / :func:`iter_dataset` validate every line and raise
:class:`DatasetError` naming the file and line of the first bad one.

Data filters (:class:`SampleFilter`) select samples by what the cache keeps of each one
(:func:`sample_info`: its annotation, source dataset, task and source image size), so the
trainer can filter a pre-encoded cache without the dataset; a pretraining curriculum tightens
them stage by stage (:mod:`training.curriculum`).

Resolution buckets (:class:`BucketConfig`): every bucket has about ``target_area`` pixels, one
of several aspect ratios, and sides that are multiples of ``multiple_of``. An image goes to the
bucket of the closest aspect ratio (:func:`assign_bucket`, closest in log ratio) and is resized
(so that it covers the bucket) and center-cropped to it (:func:`bucket_image`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import Tensor

from training.io import atomic_write_text

SAMPLES_FILE = "samples.jsonl"
"""Name of the sample index inside a dataset directory."""


class DatasetError(ValueError):
    """A dataset directory or sample that cannot be read or written as it is."""


# ---- samples ----------------------------------------------------------------------------


def _check_relative_path(value: str) -> str:
    """A POSIX path relative to the dataset directory that stays inside it."""
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
        raise ValueError(f"image path {value!r} must be relative, inside the dataset directory")
    return value


class Annotation(BaseModel):
    """The structured annotation of the Qwen-Image report's data pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_type: str = Field(min_length=1)
    """What the image is: e.g. "photograph", "illustration", "poster", "screenshot", "chart"."""
    style: str = Field(min_length=1)
    """Visual style: e.g. "realistic", "anime", "flat design", "oil painting"."""
    language: str | None = None
    """Language of the text rendered in the image (e.g. "en", "zh"); None: no text."""
    watermarks: list[str] = Field(default_factory=list)
    """Watermarks seen in the image (their text or a description); empty: none."""
    abnormal_element: str | None = None
    """An abnormal element (QR code, mosaic, heavy compression, ...); None: none."""


class Provenance(BaseModel):
    """Where a sample comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(min_length=1)
    """Name of the source dataset."""
    split: str = Field(min_length=1)
    """Split of the source dataset ("train", "validation", ...)."""
    origin_uri: str = Field(min_length=1)
    """URI of the original item (URL, s3://..., file://..., a database key)."""


class Sample(BaseModel):
    """One line of ``samples.jsonl``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    """Unique within the dataset."""
    image: str
    """The target image (PNG), relative to the dataset directory."""
    caption: str
    """Description of the target image (the text-to-image prompt)."""
    input_images: list[str] = Field(default_factory=list)
    """Editing: the input images (relative paths), in order; empty for text-to-image."""
    instruction: str | None = None
    """Editing: the instruction turning the inputs into the target; required with inputs."""
    annotation: Annotation | None = None
    """Structured annotation; None: not annotated yet."""
    provenance: Provenance
    """Source of the sample."""

    @field_validator("image")
    @classmethod
    def _image_inside(cls, value: str) -> str:
        return _check_relative_path(value)

    @field_validator("input_images")
    @classmethod
    def _inputs_inside(cls, value: list[str]) -> list[str]:
        return [_check_relative_path(v) for v in value]

    @model_validator(mode="after")
    def _editing_fields(self) -> Sample:
        if self.input_images and not self.instruction:
            raise ValueError("an editing sample (input_images) needs an instruction")
        if self.instruction is not None and not self.input_images:
            raise ValueError("an instruction needs input_images")
        return self

    @property
    def is_editing(self) -> bool:
        """Whether this is an image-editing sample (it has input images)."""
        return bool(self.input_images)

    def image_paths(self) -> list[str]:
        """Every image the sample references: the target, then the inputs."""
        return [self.image, *self.input_images]


def validation_problems(error: ValidationError, what: str) -> str:
    """A pydantic error as one line: ``field: message`` per problem (``what`` for the whole)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg']}" for e in error.errors()
    )


def write_dataset(
    directory: str | os.PathLike[str], samples: Iterable[Sample], *, check_images: bool = True
) -> Path:
    """Write ``samples`` as ``<directory>/samples.jsonl`` (atomically); returns its path.

    The images must already be in ``directory`` (checked unless ``check_images`` is False);
    ids must be unique.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    lines: list[str] = []
    for number, sample in enumerate(samples, start=1):
        if sample.id in seen:
            raise DatasetError(f"sample {number}: duplicate id {sample.id!r}")
        seen.add(sample.id)
        if check_images:
            _check_images_exist(root, sample, f"sample {number} ({sample.id!r})")
        lines.append(sample.model_dump_json(exclude_defaults=False))
    target = root / SAMPLES_FILE
    atomic_write_text(target, "".join(line + "\n" for line in lines))
    return target


def iter_dataset(
    directory: str | os.PathLike[str], *, check_images: bool = True
) -> Iterator[Sample]:
    """The samples of ``<directory>/samples.jsonl`` in file order, validated line by line.

    Raises :class:`DatasetError` naming the file and line of the first invalid sample (bad
    JSON, a field that fails validation, a duplicate id, or, with ``check_images``, a missing
    image). Blank lines are skipped.
    """
    root = Path(directory)
    path = root / SAMPLES_FILE
    if not path.is_file():
        raise DatasetError(f"{root}: no {SAMPLES_FILE}")
    seen: set[str] = set()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{where}: invalid JSON: {error}") from None
            try:
                sample = Sample.model_validate(raw)
            except ValidationError as error:
                problems = validation_problems(error, "sample")
                raise DatasetError(f"{where}: invalid sample: {problems}") from None
            if sample.id in seen:
                raise DatasetError(f"{where}: duplicate id {sample.id!r}")
            seen.add(sample.id)
            if check_images:
                _check_images_exist(root, sample, where)
            yield sample


def read_dataset(directory: str | os.PathLike[str], *, check_images: bool = True) -> list[Sample]:
    """All samples of a dataset directory; see :func:`iter_dataset`."""
    return list(iter_dataset(directory, check_images=check_images))


def _check_images_exist(root: Path, sample: Sample, where: str) -> None:
    for relative in sample.image_paths():
        if not (root / relative).is_file():
            raise DatasetError(f"{where}: image {relative!r} not found in {root}")


# ---- filters ----------------------------------------------------------------------------


def sample_info(sample: Sample, width: int, height: int) -> dict[str, Any]:
    """What a filter reads of a sample (JSON-able; the cache keeps one per row).

    Keys: ``dataset`` (provenance dataset), ``editing`` (bool), ``inputs`` (number of input
    images), ``width`` / ``height`` (pixels of the source target image, before bucketing) and
    ``annotation`` (the :class:`Annotation` as a dict, or None).
    """
    return {
        "dataset": sample.provenance.dataset,
        "editing": sample.is_editing,
        "inputs": len(sample.input_images),
        "width": width,
        "height": height,
        "annotation": None if sample.annotation is None else sample.annotation.model_dump(),
    }


@dataclass(kw_only=True, slots=True)
class SampleFilter:
    """Which samples to train on, after the Qwen-Image report's data pipeline.

    The report filters low-resolution images first and raises the bar with the resolution,
    then drops images whose structured annotation reports watermarks or abnormal elements
    (QR codes, mosaics, ...), and balances image types and text languages. The default keeps
    everything. A sample without an annotation passes only filters with no annotation
    criterion (``max_watermarks``, ``allow_abnormal``, ``image_types``,
    ``exclude_image_types``, ``languages``): curated data is annotated data.
    """

    min_side: int = 0
    """Shortest side of the source target image, in pixels (before bucketing), at least."""
    max_watermarks: int | None = None
    """At most this many annotated watermarks (0: none); None: any."""
    allow_abnormal: bool = True
    """Keep samples annotated with an abnormal element (QR code, mosaic, ...)."""
    image_types: tuple[str, ...] | None = None
    """Keep only these annotated image types (e.g. "photograph", "poster"); None: any."""
    exclude_image_types: tuple[str, ...] = ()
    """Drop these annotated image types."""
    languages: tuple[str, ...] | None = None
    """Keep images whose rendered text is in one of these languages (images without text
    always pass); None: any."""
    datasets: tuple[str, ...] | None = None
    """Keep only samples of these provenance datasets; None: any."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.min_side < 0:
            raise ValueError(f"SampleFilter.min_side must be >= 0, got {self.min_side}")
        if self.max_watermarks is not None and self.max_watermarks < 0:
            raise ValueError(
                f"SampleFilter.max_watermarks must be >= 0 or None, got {self.max_watermarks}"
            )

    @property
    def reads_annotation(self) -> bool:
        """Whether a criterion reads the annotation (unannotated samples then fail)."""
        return (
            self.max_watermarks is not None
            or not self.allow_abnormal
            or self.image_types is not None
            or bool(self.exclude_image_types)
            or self.languages is not None
        )

    @property
    def keeps_everything(self) -> bool:
        """Whether no criterion is set (every sample passes)."""
        return not self.reads_annotation and self.min_side == 0 and self.datasets is None

    def accepts(self, info: Mapping[str, Any]) -> bool:
        """Whether the sample described by ``info`` (:func:`sample_info`) passes."""
        if min(int(info["width"]), int(info["height"])) < self.min_side:
            return False
        if self.datasets is not None and info["dataset"] not in self.datasets:
            return False
        if not self.reads_annotation:
            return True
        annotation = info.get("annotation")
        if annotation is None:
            return False
        if self.max_watermarks is not None and len(annotation["watermarks"]) > self.max_watermarks:
            return False
        if not self.allow_abnormal and annotation["abnormal_element"] is not None:
            return False
        image_type = annotation["image_type"]
        if self.image_types is not None and image_type not in self.image_types:
            return False
        if image_type in self.exclude_image_types:
            return False
        language = annotation["language"]
        return self.languages is None or language is None or language in self.languages


# ---- resolution buckets -----------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class BucketConfig:
    """Resolution buckets: about ``target_area`` pixels, several aspect ratios."""

    target_area: int = 1024 * 1024
    """Pixels (width * height) every bucket has about."""
    aspect_ratios: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
    """Width / height of the buckets."""
    multiple_of: int = 32
    """Both bucket sides are multiples of this (a multiple of the VAE's factor, in pixels)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.multiple_of < 1:
            raise ValueError(f"BucketConfig.multiple_of must be >= 1, got {self.multiple_of}")
        if self.target_area < self.multiple_of**2:
            raise ValueError(
                f"BucketConfig.target_area {self.target_area} is below one "
                f"{self.multiple_of}x{self.multiple_of} cell"
            )
        if not self.aspect_ratios or any(
            not math.isfinite(r) or r <= 0 for r in self.aspect_ratios
        ):
            raise ValueError(
                f"BucketConfig.aspect_ratios must be positive, got {self.aspect_ratios}"
            )

    def bucket_for_ratio(self, ratio: float) -> tuple[int, int]:
        """``(width, height)`` of the bucket with aspect ratio ``ratio`` (width / height)."""
        m = self.multiple_of
        width = max(m, round(math.sqrt(self.target_area * ratio) / m) * m)
        height = max(m, round(math.sqrt(self.target_area / ratio) / m) * m)
        return width, height

    def buckets(self) -> list[tuple[int, int]]:
        """Every bucket ``(width, height)``, one per aspect ratio, in order, deduplicated."""
        self.validate()
        return list(dict.fromkeys(self.bucket_for_ratio(r) for r in self.aspect_ratios))

    def assign_bucket(self, width: int, height: int) -> tuple[int, int]:
        """The bucket ``(width, height)`` of an image: the closest aspect ratio (in log)."""
        self.validate()
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        log_ratio = math.log(width / height)
        closest = min(self.aspect_ratios, key=lambda r: abs(math.log(r) - log_ratio))
        return self.bucket_for_ratio(closest)


def assign_bucket(width: int, height: int, config: BucketConfig) -> tuple[int, int]:
    """The bucket ``(bucket_w, bucket_h)`` of a ``width`` x ``height`` image under ``config``."""
    return config.assign_bucket(width, height)


def resize_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``image`` (bicubic) to cover ``size`` = ``(width, height)``, then center-crop."""
    target_w, target_h = size
    scale = max(target_w / image.width, target_h / image.height)
    resized_w = max(target_w, math.ceil(image.width * scale - 1e-6))
    resized_h = max(target_h, math.ceil(image.height * scale - 1e-6))
    if (resized_w, resized_h) != image.size:
        image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    left = (resized_w - target_w) // 2
    top = (resized_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))


def bucket_image(image: Image.Image, config: BucketConfig) -> Image.Image:
    """``image`` resized and center-cropped to its bucket."""
    return resize_and_crop(image, config.assign_bucket(image.width, image.height))


def load_image(path: str | os.PathLike[str], *, channels: int = 4) -> Image.Image:
    """Open an image file as RGBA (``channels=4``; opaque alpha where it has none) or RGB."""
    if channels not in (3, 4):
        raise ValueError(f"channels must be 3 (RGB) or 4 (RGBA), got {channels}")
    with Image.open(path) as opened:
        return opened.convert("RGBA" if channels == 4 else "RGB")


def image_to_tensor(image: Image.Image) -> Tensor:
    """An RGB or RGBA Pillow image -> float32 ``(C, H, W)`` in [-1, 1]."""
    if image.mode not in ("RGB", "RGBA"):
        raise ValueError(f"expected an RGB or RGBA image, got mode {image.mode!r}")
    channels = len(image.mode)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = data.view(image.height, image.width, channels).permute(2, 0, 1)  # (C, H, W)
    return pixels.float() / 127.5 - 1.0

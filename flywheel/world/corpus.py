"""The world corpus: rendered scenes in the training dataset format, with their truth.

:func:`write_world_corpus` draws ``count`` scenes (:func:`flywheel.world.scenes.sample_scene`)
and editing triples (:func:`flywheel.world.scenes.sample_edit`, a fraction
``edit_fraction`` of the samples, spread evenly), renders them and writes a dataset of
:mod:`training.data`::

    <dir>/samples.jsonl          the Samples (written last: its presence means complete)
    <dir>/specs.jsonl            one WorldRecord per sample, in the same order: its id, its
                                 scene seed, the SceneSpec of its target image and, for an
                                 editing sample, the source spec, edit kind and instruction
    <dir>/world.json             the parameters the corpus was written with (WorldCorpusInfo)
    <dir>/images/<id>.png        the target image; <id>-source.png: an edit's input image

Every sample is annotated (image type "synthetic scene", style "flat", the language of its
text: "en" for Latin, "zh" for Han, None without text; no watermarks, no abnormal element)
and has provenance dataset "world", the given split and origin ``world:<scene seed>``
(``world:edit:<scene seed>`` for an editing sample: the seed of :func:`sample_edit`). The
caption is the target's rich, raw or terse caption (:func:`flywheel.world.scenes.captions`).
:func:`read_specs` gives the truth back, by sample id, to the evaluator and to retrieval.

Seeds: the scene seeds of a corpus are drawn from ``random.Random(seed)`` below
:data:`CORPUS_SEED_LIMIT`; the benchmark suites (:mod:`flywheel.world.benchmark`) take theirs
above it, so no benchmark scene is ever trained on.

A candidate pool (what the pretraining-gap track retrieves from) is another corpus drawn with
other weights, where the training corpus' rare concepts are common: e.g. training on
``reweighted(SceneConfig(), shapes={"star": 0.005})`` with seed 0 and a pool of
``reweighted(SceneConfig(), shapes={"star": 3.0})`` with seed 1 and split "pool".
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import track

from flywheel.world.scenes import (
    CORPUS_SEED_LIMIT,
    Captions,
    EditKind,
    SceneConfig,
    SceneSpec,
    captions,
    render,
    sample_edit,
    sample_scene,
)
from training.data import SAMPLES_FILE, Annotation, Provenance, Sample, write_dataset
from training.io import atomic_write_text

CaptionKind = Literal["rich", "raw", "terse"]
CAPTION_KINDS: tuple[CaptionKind, ...] = ("rich", "raw", "terse")

DATASET = "world"
"""The provenance dataset of every world sample."""
SPECS_FILE = "specs.jsonl"
"""The truth of every sample, next to ``samples.jsonl``."""
INFO_FILE = "world.json"
"""The parameters a corpus was written with."""
IMAGES_DIR = "images"
PROGRESS_THRESHOLD = 1000
"""Corpora of at least this many samples show a progress bar by default."""

LANGUAGES = {"latin": "en", "han": "zh"}
"""The annotation language of each script."""


class WorldRecord(BaseModel):
    """The truth of one world sample (a line of ``specs.jsonl``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    """The sample's id."""
    seed: int
    """The seed of :func:`sample_scene` (or of :func:`sample_edit` for an editing sample)."""
    spec: SceneSpec
    """The target image's scene (its id is the sample's id)."""
    source: SceneSpec | None = None
    """Editing: the input image's scene."""
    edit_kind: EditKind | None = None
    """Editing: what the instruction changes."""
    instruction: str | None = None
    """Editing: the instruction."""


class WorldCorpusInfo(BaseModel):
    """What ``world.json`` holds: enough to write the same corpus again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int
    seed: int
    size: int
    caption: CaptionKind
    edit_fraction: float
    split: str
    config: dict[str, Any]
    """The :class:`SceneConfig` as a dict."""
    caption_dropout: float = 0.0
    """The share of text-to-image samples written with an empty caption."""
    shades: dict[str, tuple[int, int, int]] = Field(default_factory=dict)
    """Colour name -> the RGB its objects were drawn in instead of the palette's."""

    def scene_config(self) -> SceneConfig:
        """The :class:`SceneConfig` the scenes were drawn with."""
        return SceneConfig(**self.config)


def reweighted(
    config: SceneConfig,
    *,
    shapes: Mapping[str, float] | None = None,
    colours: Mapping[str, float] | None = None,
) -> SceneConfig:
    """A copy of ``config`` with some shape and colour weights replaced (rare concepts)."""
    updated = replace(
        config,
        shape_weights={**config.shape_weights, **(shapes or {})},
        colour_weights={**config.colour_weights, **(colours or {})},
    )
    updated.validate()
    return updated


def scene_seeds(seed: int, count: int) -> list[int]:
    """The ``count`` distinct scene seeds of a corpus of ``seed`` (below the limit)."""
    if seed < 0 or count < 0:
        raise ValueError(f"seed and count must be >= 0, got {seed} and {count}")
    rng = random.Random(seed)
    seeds: dict[int, None] = {}
    while len(seeds) < count:
        seeds[rng.randrange(CORPUS_SEED_LIMIT)] = None
    return list(seeds)


def evenly_picked(index: int, fraction: float) -> bool:
    """Whether item ``index`` is picked when ``fraction`` of all items are, evenly spread
    (the editing samples of a corpus, the empty captions of its text-to-image samples)."""
    return int((index + 1) * fraction) > int(index * fraction)


def annotation_for(scene: SceneSpec) -> Annotation:
    """The structured annotation of a rendered scene."""
    language = LANGUAGES[scene.texts[0].script] if scene.texts else None
    return Annotation(image_type="synthetic scene", style="flat", language=language)


def _caption(scene: SceneSpec, kind: CaptionKind) -> str:
    caps: Captions = captions(scene)
    return {"rich": caps.rich, "raw": caps.raw, "terse": caps.terse}[kind]


def write_world_corpus(
    directory: str | os.PathLike[str],
    *,
    count: int,
    config: SceneConfig | None = None,
    seed: int,
    size: int = 64,
    caption: CaptionKind = "rich",
    edit_fraction: float = 0.0,
    split: str = "train",
    caption_dropout: float = 0.0,
    shades: Mapping[str, tuple[int, int, int]] | None = None,
    progress: bool | None = None,
) -> list[Sample]:
    """Write a world corpus of ``count`` samples into ``directory``; returns its samples.

    ``config``: what the scenes hold (default :class:`SceneConfig`); ``size``: image side in
    pixels; ``caption``: which caption is each sample's; ``edit_fraction``: the share of
    editing samples; ``caption_dropout``: the share of text-to-image samples whose caption is
    empty (evenly spread; the unconditional prompt that classifier-free guidance needs, learnt
    from real images; their spec still holds the truth); ``shades``: colour name -> the RGB
    its objects are drawn in (:func:`~flywheel.world.scenes.render`; a biased corpus: the
    spec and caption still say the colour's name); ``progress``: show a progress bar
    (None: for ``count`` >= :data:`PROGRESS_THRESHOLD`). Refuses a directory that already
    holds a dataset.
    """
    config = config or SceneConfig()
    config.validate()
    if count < 1 or size < 8:
        raise ValueError(f"count must be >= 1 and size >= 8, got {count} and {size}")
    if caption not in CAPTION_KINDS:
        raise ValueError(f"caption must be one of {CAPTION_KINDS}, got {caption!r}")
    for name, fraction in (("edit_fraction", edit_fraction), ("caption_dropout", caption_dropout)):
        if not 0 <= fraction <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {fraction}")
    if shades and edit_fraction > 0:
        raise ValueError("shades are for text-to-image corpora (edit_fraction 0)")
    root = Path(directory)
    for name in (SAMPLES_FILE, SPECS_FILE):
        if (root / name).exists():
            raise FileExistsError(f"{root / name} exists; write the corpus into a new directory")
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)

    show = count >= PROGRESS_THRESHOLD if progress is None else progress
    indexed: Iterable[tuple[int, int]] = enumerate(scene_seeds(seed, count))
    if show:
        indexed = track(
            list(indexed),
            description=f"world corpus ({count})",
            console=Console(stderr=True),
        )
    samples: list[Sample] = []
    records: list[WorldRecord] = []
    scenes = 0  # text-to-image samples so far
    for index, scene_seed in indexed:
        if evenly_picked(index, edit_fraction):
            sample, record = _edit_sample(root, scene_seed, config, size, caption, split)
        else:
            sample, record = _scene_sample(
                root, scene_seed, config, size, caption, split, shades=shades
            )
            if evenly_picked(scenes, caption_dropout):
                sample = sample.model_copy(update={"caption": ""})
            scenes += 1
        samples.append(sample)
        records.append(record)

    atomic_write_text(root / SPECS_FILE, "".join(r.model_dump_json() + "\n" for r in records))
    info = WorldCorpusInfo(
        count=count,
        seed=seed,
        size=size,
        caption=caption,
        edit_fraction=edit_fraction,
        split=split,
        config=asdict(config),
        caption_dropout=caption_dropout,
        shades=dict(shades or {}),
    )
    atomic_write_text(root / INFO_FILE, info.model_dump_json(indent=2) + "\n")
    write_dataset(root, samples)
    return samples


def _scene_sample(
    root: Path,
    scene_seed: int,
    config: SceneConfig,
    size: int,
    caption: CaptionKind,
    split: str,
    *,
    shades: Mapping[str, tuple[int, int, int]] | None = None,
) -> tuple[Sample, WorldRecord]:
    sample_id = f"world-{scene_seed}"
    scene = sample_scene(scene_seed, config, scene_id=sample_id)
    image = f"{IMAGES_DIR}/{sample_id}.png"
    render(scene, size, size, shades=shades).save(root / image)
    sample = Sample(
        id=sample_id,
        image=image,
        caption=_caption(scene, caption),
        annotation=annotation_for(scene),
        provenance=Provenance(dataset=DATASET, split=split, origin_uri=f"world:{scene_seed}"),
    )
    return sample, WorldRecord(id=sample_id, seed=scene_seed, spec=scene)


def _edit_sample(
    root: Path, scene_seed: int, config: SceneConfig, size: int, caption: CaptionKind, split: str
) -> tuple[Sample, WorldRecord]:
    sample_id = f"world-edit-{scene_seed}"
    pair = sample_edit(scene_seed, config)
    source = pair.source.model_copy(update={"id": f"{sample_id}-source"})
    target = pair.target.model_copy(update={"id": sample_id})
    image, source_image = f"{IMAGES_DIR}/{sample_id}.png", f"{IMAGES_DIR}/{sample_id}-source.png"
    render(target, size, size).save(root / image)
    render(source, size, size).save(root / source_image)
    sample = Sample(
        id=sample_id,
        image=image,
        caption=_caption(target, caption),
        input_images=[source_image],
        instruction=pair.instruction,
        annotation=annotation_for(target),
        provenance=Provenance(dataset=DATASET, split=split, origin_uri=f"world:edit:{scene_seed}"),
    )
    record = WorldRecord(
        id=sample_id,
        seed=scene_seed,
        spec=target,
        source=source,
        edit_kind=pair.kind,
        instruction=pair.instruction,
    )
    return sample, record


def read_specs(directory: str | os.PathLike[str]) -> dict[str, WorldRecord]:
    """The truth of every sample of a world corpus, by sample id, in file order."""
    path = Path(directory) / SPECS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a world corpus (no {SPECS_FILE})")
    records: dict[str, WorldRecord] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    record = WorldRecord.model_validate(json.loads(line))
                except ValueError as error:
                    raise ValueError(f"{path}:{number}: {error}") from None
                records[record.id] = record
    return records


def read_info(directory: str | os.PathLike[str]) -> WorldCorpusInfo:
    """The parameters a world corpus was written with."""
    path = Path(directory) / INFO_FILE
    return WorldCorpusInfo.model_validate_json(path.read_text(encoding="utf-8"))


def scene_tags(spec: SceneSpec) -> tuple[str, ...]:
    """A scene's filterable tags: ``colour:<c>``, ``shape:<s>``, ``kind:<c> <s>`` of each
    object, ``count:<n>`` of each kind with copies, ``text:<script>`` of each text."""
    tags = [f"colour:{o.colour}" for o in spec.objects] + [f"shape:{o.shape}" for o in spec.objects]
    tags += [f"kind:{o.colour} {o.shape}" for o in spec.objects]
    tags += [f"count:{n}" for n in spec.counts().values() if n > 1]
    tags += [f"text:{t.script}" for t in spec.texts]
    return tuple(dict.fromkeys(tags))

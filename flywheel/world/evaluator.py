"""The ground-truth evaluator: what a scene spec asked for, checked in an image.

:func:`evaluate` takes the intended :class:`~flywheel.world.scenes.SceneSpec` and an image
(PIL, a (3, H, W) or (1, 3, H, W) tensor in [0, 1], or an (H, W, 3) uint8 array; any size,
images with a shorter side above :attr:`EvaluatorConfig.max_side` are box-filtered down) and
scores every element the spec asks for. The result (:class:`Evaluation`) is JSON-able: one
:class:`ElementResult` per element, aggregates per element kind, and what was seen.

**Segmentation is exact where it can be.** The background is the most frequent colour of the
border pixels. A rendered pixel is a blend ``p = b + a (c - b)`` of the background ``b`` and
one palette colour ``c`` (:data:`~flywheel.world.scenes.COLOURS`) with coverage ``a``; for
each palette colour the coverage is the projection of ``p - b`` on ``c - b`` (clipped to
[0, 1]), and a pixel belongs to the colour whose blend line passes nearest (residual at most
:attr:`EvaluatorConfig.residual`), provided it is :attr:`EvaluatorConfig.foreground` away
from the background. Pixels covered at least half are connected (8-neighbourhood) per colour
into components; the colour of a component is therefore exact on clean renders.

**Components are classified by a small CNN** (:class:`~flywheel.world.recognizers.ShapeNet`)
into the six shapes or "text"; components smaller than
:attr:`EvaluatorConfig.min_object_area` (a fraction of the canvas) are never objects. Text
components of one colour are grouped into lines (bounding boxes closer than 0.6 of the taller
one's height across, 0.5 down) and each line is read by a CRNN with CTC
(:class:`~flywheel.world.recognizers.TextNet`). Both networks are trained on rendered scenes
by :func:`flywheel.world.evaluator_training.train_evaluator` (``flywheel world
evaluator-train --out PATH``); the shipped weights are
``flywheel/world/weights/evaluator.safetensors``.

**Elements and their scores** (``score`` in [0, 1]; ``passed`` is the strict verdict):

- ``object``, one per asked (colour, shape) kind: at least one component of that kind.
- ``count``, one per kind: the number of components of that kind equals the asked number;
  score ``1 - min(1, |found - asked| / asked)``.
- ``shape`` and ``colour``, one each per asked object: asked objects are matched one-to-one
  to detected objects (Hungarian, cost = colour differs + shape differs + 0.5 x centre
  distance in canvas fractions; a pair that differs in both is no match); the matched
  object's shape and colour are compared with the asked ones (no match: found is None).
- ``relation``, one per relation :func:`~flywheel.world.scenes.relations` derives from the
  spec: both objects' matches must be of their asked kinds, and the centroid separation in
  the asked direction at least ``relation_tolerance x RELATION_MARGIN`` of the canvas (the
  tolerance absorbs pixel-level centroid error; a swapped relation separates negatively).
- ``text``, one per asked text: read lines are matched one-to-one to asked texts by the
  least normalised edit distance; passed when the reading is exact, score ``1 - NED``.

Scene seeds below :data:`TRAIN_SEED_OFFSET` are never trained on: they are the held-out set
(:func:`measure_accuracy`).
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from scipy import ndimage, optimize
from torch import Tensor

from flywheel.world.benchmark import ElementKind
from flywheel.world.recognizers import (
    ALPHABET,
    CROP,
    LINE_HEIGHT,
    LINE_STRETCH,
    LINE_STRIDE,
    SCALE_FEATURES,
    SHAPE_CLASSES,
    TEXT_CLASS,
    ShapeNet,
    TextNet,
    ctc_greedy_decode,
)
from flywheel.world.scenes import (
    COLOURS,
    RELATION_MARGIN,
    SceneConfig,
    SceneSpec,
    relations,
    render,
    sample_scene,
)
from model.reward import levenshtein, normalized_edit_distance

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (K, 3)

WEIGHTS = Path(__file__).parent / "weights" / "evaluator.safetensors"
"""The shipped weights, loaded by default."""

WEIGHTS_FORMAT = "flywheel-world-evaluator/1"

TRAIN_SEED_OFFSET = 10**9
"""Training scenes use seeds from here up; seeds below it are held out for measurement."""

ELEMENT_KINDS: tuple[ElementKind, ...] = get_args(ElementKind)

ImageLike = Image.Image | Tensor | npt.NDArray[np.uint8]


@dataclass(kw_only=True, slots=True)
class EvaluatorConfig:
    """Thresholds of the segmentation and of the checks."""

    foreground: float = 12.0
    """Least RGB distance (0-255 units) from the background for a pixel to be considered."""
    residual: float = 48.0
    """Most RGB distance from a palette colour's blend line for a pixel to take that colour."""
    min_object_area: float = 0.002
    """Smallest object, as a fraction of the canvas area; smaller components are text pieces."""
    relation_tolerance: float = 0.5
    """A relation holds when the centroids separate by this fraction of ``RELATION_MARGIN``."""
    max_side: int = 128
    """Images whose shorter side is larger are box-filtered down to it first."""
    ink: float = 0.2
    """Least coverage of a text stroke's pixel (text lines are grouped from such pixels)."""
    max_lines: int = 8
    """Most text lines read (the largest by covered area)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when a threshold is out of range."""
        if self.foreground < 0 or self.residual <= 0 or not 0 < self.min_object_area < 1:
            raise ValueError("EvaluatorConfig: foreground >= 0, residual > 0, area in (0, 1)")
        if self.relation_tolerance <= 0 or self.max_side < 16 or self.max_lines < 1:
            raise ValueError("EvaluatorConfig: tolerance > 0, max_side >= 16, max_lines >= 1")


# ---- results ------------------------------------------------------------------------------


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ElementResult(_Result):
    """One asked element, what was found for it and the verdict."""

    kind: ElementKind
    subject: str
    """Which element: ``"red circle"``, ``"object 1"``, ``'text "cat"'``, ..."""
    asked: str
    found: str | None
    """What the image shows for it; None when nothing matched."""
    passed: bool
    score: float
    """In [0, 1]; 1 when passed."""
    edit_distance: int | None = None
    """Text only: Levenshtein distance between asked and read."""


class DetectedObject(_Result):
    """A component classified as a shape."""

    shape: str
    colour: str
    x: float
    """Coverage-weighted centroid, a fraction of the canvas width."""
    y: float
    area: float
    """Pixels covered at least half, as a fraction of the canvas."""
    confidence: float


class ReadText(_Result):
    """A text line and its reading."""

    text: str
    colour: str
    x: float
    y: float


class SkillScore(_Result):
    """The elements of one kind, aggregated."""

    elements: int
    passed: int
    accuracy: float
    mean_score: float


class Evaluation(_Result):
    """Everything :func:`evaluate` found for one (spec, image)."""

    scene_id: str
    width: int
    """The image's width as given (it is analysed at most ``max_side`` on its shorter side)."""
    height: int
    elements: list[ElementResult]
    skills: dict[str, SkillScore]
    """Per element kind (only the kinds the spec asks for)."""
    score: float
    """Mean element score (1 for a spec that asks for nothing)."""
    objects: list[DetectedObject]
    texts: list[ReadText]


def summarize(elements: Sequence[ElementResult]) -> dict[str, SkillScore]:
    """Aggregate ``elements`` per kind, in :data:`ELEMENT_KINDS` order."""
    out: dict[str, SkillScore] = {}
    for kind in ELEMENT_KINDS:
        mine = [e for e in elements if e.kind == kind]
        if mine:
            passed = sum(e.passed for e in mine)
            out[kind] = SkillScore(
                elements=len(mine),
                passed=passed,
                accuracy=passed / len(mine),
                mean_score=sum(e.score for e in mine) / len(mine),
            )
    return out


# ---- segmentation -------------------------------------------------------------------------


def to_pil(image: ImageLike) -> Image.Image:
    """``image`` as an RGB PIL image (a float tensor is read as [0, 1], a uint8 one as 0-255)."""
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got {tuple(image.shape)}")
        t = t.float() if t.dtype == torch.uint8 else t.float().clamp(0, 1) * 255
        return Image.fromarray(t.permute(1, 2, 0).round().to(torch.uint8).numpy(), "RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) array, got {image.shape}")
        return Image.fromarray(image.astype(np.uint8), "RGB")
    return image.convert("RGB")


def to_array(image: ImageLike, max_side: int | None = None) -> FloatArray:
    """``image`` as (H, W, 3) float32 RGB in 0-255, box-filtered down to ``max_side``."""
    pil = to_pil(image)
    if max_side is not None and min(pil.size) > max_side:
        scale = max_side / min(pil.size)
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(size, Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.float32)


@dataclass(kw_only=True, slots=True, frozen=True)
class Component:
    """Connected pixels of one palette colour: solid (covered at least half) or ink."""

    colour: int
    """Index into :data:`COLOUR_NAMES`."""
    label: int
    """Its label in its colour's label map."""
    area: int
    """Its pixel count."""
    box: tuple[int, int, int, int]
    """x0, y0, x1, y1 in pixels (x1, y1 exclusive)."""
    x: float
    """Coverage-weighted centroid, a fraction of the width."""
    y: float
    ink: int
    """The label of the ink component that holds it (its own label for an ink component)."""


@dataclass(kw_only=True, slots=True)
class Segmentation:
    """An image split into palette colours and their components."""

    background: tuple[float, float, float]
    coverage: FloatArray
    """(K, H, W): each pixel's coverage by the colour it belongs to (0 elsewhere)."""
    labels: IntArray
    """(K, H, W): solid component labels per colour (0: none)."""
    components: list[Component]
    """Solid components: pixels covered at least half (objects, thick glyph parts)."""
    ink: list[Component]
    """Ink components: pixels covered at least ``EvaluatorConfig.ink`` (text strokes)."""

    @property
    def height(self) -> int:
        return int(self.coverage.shape[1])

    @property
    def width(self) -> int:
        return int(self.coverage.shape[2])


def estimate_background(rgb: FloatArray) -> tuple[float, float, float]:
    """The median of the border pixels in the border's most frequent 16-level colour bin."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])  # (N, 3)
    bins = (border // 16).astype(np.int64)
    keys = bins[:, 0] * 256 + bins[:, 1] * 16 + bins[:, 2]
    values, counts = np.unique(keys, return_counts=True)
    modal = border[keys == values[counts.argmax()]]
    r, g, b = np.median(modal, axis=0).tolist()
    return (float(r), float(g), float(b))


_EIGHT = np.ones((3, 3), dtype=bool)


def _label(
    plane: FloatArray,
    mask: npt.NDArray[np.bool_],
    colour: int,
    ink: IntArray | None,
    centres: tuple[FloatArray, FloatArray],
) -> tuple[IntArray, list[Component]]:
    """8-connected components of ``mask`` with their coverage-weighted centroids."""
    height, width = plane.shape
    labelled, count = ndimage.label(mask, structure=_EIGHT)
    flat = labelled.ravel()
    ys, xs = centres  # (H, W) pixel centres
    areas = np.bincount(flat, minlength=count + 1)
    weights = np.maximum(np.bincount(flat, plane.ravel(), count + 1), 1e-6)
    sum_x = np.bincount(flat, (plane * xs).ravel(), count + 1)
    sum_y = np.bincount(flat, (plane * ys).ravel(), count + 1)
    owner = np.arange(count + 1)
    if ink is not None:  # a solid component lies inside one ink component: read it anywhere
        owner[flat] = ink.ravel()
    components = []
    for i, box in enumerate(ndimage.find_objects(labelled), start=1):
        if box is None:
            continue
        rows, cols = box
        components.append(
            Component(
                colour=colour,
                label=i,
                area=int(areas[i]),
                box=(int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)),
                x=float(sum_x[i] / weights[i]) / width,
                y=float(sum_y[i] / weights[i]) / height,
                ink=int(owner[i]),
            )
        )
    return labelled.astype(np.int32), components


def segment(rgb: FloatArray, config: EvaluatorConfig, *, solid: bool = True) -> Segmentation:
    """Split ``rgb`` (H, W, 3) into palette-colour coverage maps and connected components.

    ``solid=False`` skips the solid components (only ink is wanted).
    """
    background = estimate_background(rgb)
    offset = rgb - np.asarray(background, dtype=np.float32)  # (H, W, 3)
    directions = _PALETTE - np.asarray(background, dtype=np.float32)  # (K, 3)
    norms = np.maximum((directions**2).sum(1), 1.0)  # (K,)
    along = np.einsum("hwc,kc->khw", offset, directions)  # (K, H, W)
    alpha = np.clip(along / norms[:, None, None], 0, 1)
    length = (offset**2).sum(-1)  # (H, W)
    # |offset - alpha d|^2 = |offset|^2 - 2 alpha <offset, d> + alpha^2 |d|^2
    residual = length[None] - 2 * alpha * along + alpha**2 * norms[:, None, None]  # (K, H, W)
    nearest = residual.argmin(0)  # (H, W)
    keep = (length >= config.foreground**2) & (residual.min(0) <= config.residual**2)
    member = (nearest[None] == np.arange(len(COLOUR_NAMES))[:, None, None]) & keep[None]
    coverage = np.where(member, alpha, 0.0).astype(np.float32)  # (K, H, W)
    labels = np.zeros(coverage.shape, dtype=np.int32)
    solids: list[Component] = []
    ink: list[Component] = []
    ys, xs = np.indices(rgb.shape[:2], dtype=np.float32) + 0.5
    for k in range(len(COLOUR_NAMES)):
        plane = coverage[k]
        inked = plane >= config.ink
        if not inked.any():
            continue
        ink_labels, found = _label(plane, inked, k, None, (ys, xs))
        ink += found
        if solid:
            labels[k], found = _label(plane, plane >= 0.5, k, ink_labels, (ys, xs))
            solids += found
    return Segmentation(
        background=background, coverage=coverage, labels=labels, components=solids, ink=ink
    )


# ---- crops --------------------------------------------------------------------------------


def _window(plane: FloatArray, x0: int, y0: int, x1: int, y1: int) -> FloatArray:
    """``plane[..., y0:y1, x0:x1]`` with zeros outside the image."""
    height, width = plane.shape[-2:]
    out = np.zeros((*plane.shape[:-2], y1 - y0, x1 - x0), dtype=np.float32)
    sy0, sy1, sx0, sx1 = max(0, y0), min(height, y1), max(0, x0), min(width, x1)
    if sy1 > sy0 and sx1 > sx0:
        out[..., sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = plane[..., sy0:sy1, sx0:sx1]
    return out


def _resize(patch: FloatArray, height: int, width: int) -> Tensor:
    """(C, h, w) -> (C, height, width), bilinear with antialiasing when shrinking."""
    t = torch.from_numpy(patch)[None]
    return F.interpolate(t, size=(height, width), mode="bilinear", antialias=True)[0]


def component_crop(seg: Segmentation, comp: Component) -> tuple[Tensor, Tensor]:
    """ShapeNet's input for ``comp``: crop (2, CROP, CROP) and scale (SCALE_FEATURES,)."""
    x0, y0, x1, y1 = comp.box
    side = math.ceil(max(x1 - x0, y1 - y0) * 1.3) + 2
    left = round((x0 + x1) / 2 - side / 2)
    top = round((y0 + y1) / 2 - side / 2)
    colour_plane = seg.coverage[comp.colour]
    own = np.where(seg.labels[comp.colour] == comp.label, colour_plane, 0.0).astype(np.float32)
    planes = np.stack([colour_plane, own])
    crop = _resize(_window(planes, left, top, left + side, top + side), CROP, CROP)
    short = min(seg.height, seg.width)
    w, h = x1 - x0, y1 - y0
    scale = torch.tensor(
        [w / short * 4, h / short * 4, math.sqrt(comp.area) / short * 4, h / w, comp.area / (w * h)]
    )
    return crop, scale


def line_crop(plane: FloatArray, box: tuple[int, int, int, int]) -> Tensor:
    """TextNet's input for the line in ``box`` of coverage ``plane``: (1, LINE_HEIGHT, W)."""
    x0, y0, x1, y1 = box
    h = y1 - y0
    pad_x, half = 0.2 * h + 1, 0.6 * h + 1
    centre = (y0 + y1) / 2
    left, right = math.floor(x0 - pad_x), math.ceil(x1 + pad_x)
    top, bottom = math.floor(centre - half), math.ceil(centre + half)
    patch = _window(plane[None], left, top, right, bottom)
    width = round((right - left) * LINE_HEIGHT / (bottom - top) * LINE_STRETCH)
    width = min(max(width, 2 * LINE_STRIDE), 100 * LINE_STRIDE)
    return _resize(patch, LINE_HEIGHT, width)


def stack_lines(lines: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad line crops to the widest: (B, 1, LINE_HEIGHT, W) and widths (B,)."""
    widest = max(line.shape[-1] for line in lines)
    widest = math.ceil(widest / LINE_STRIDE) * LINE_STRIDE
    batch = torch.zeros(len(lines), 1, LINE_HEIGHT, widest)
    for i, line in enumerate(lines):
        batch[i, :, :, : line.shape[-1]] = line
    return batch, torch.tensor([line.shape[-1] for line in lines])


def group_lines(pieces: Sequence[Component]) -> list[tuple[int, tuple[int, int, int, int], int]]:
    """Text pieces grouped into lines per colour: (colour, box, covered area), largest first."""
    parent = list(range(len(pieces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(pieces):
        for j in range(i + 1, len(pieces)):
            b = pieces[j]
            if a.colour != b.colour:
                continue
            tall = max(a.box[3] - a.box[1], b.box[3] - b.box[1])
            dx = max(0, b.box[0] - a.box[2], a.box[0] - b.box[2])
            dy = max(0, b.box[1] - a.box[3], a.box[1] - b.box[3])
            if dx <= 0.6 * tall and dy <= 0.5 * tall:
                parent[find(i)] = find(j)
    groups: dict[int, list[Component]] = {}
    for i, piece in enumerate(pieces):
        groups.setdefault(find(i), []).append(piece)
    lines = []
    for members in groups.values():
        box = (
            min(c.box[0] for c in members),
            min(c.box[1] for c in members),
            max(c.box[2] for c in members),
            max(c.box[3] for c in members),
        )
        lines.append((members[0].colour, box, sum(c.area for c in members)))
    lines.sort(key=lambda line: -line[2])
    return lines


# ---- the evaluator ------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class Evaluator:
    """The trained networks and the thresholds."""

    shape_net: ShapeNet
    text_net: TextNet
    config: EvaluatorConfig = field(default_factory=EvaluatorConfig)


def _architecture() -> dict[str, object]:
    """What the weights depend on besides their shapes: checked when they are loaded."""
    return {
        "shape_classes": list(SHAPE_CLASSES),
        "alphabet": ALPHABET,
        "crop": CROP,
        "scale_features": SCALE_FEATURES,
        "line_height": LINE_HEIGHT,
        "line_stride": LINE_STRIDE,
        "line_stretch": LINE_STRETCH,
    }


def save_evaluator(evaluator: Evaluator, path: Path) -> Path:
    """Write both networks' weights to ``path`` (safetensors, with the classes as metadata)."""
    tensors = {f"shape.{k}": v.contiguous() for k, v in evaluator.shape_net.state_dict().items()}
    tensors |= {f"text.{k}": v.contiguous() for k, v in evaluator.text_net.state_dict().items()}
    metadata = {"format": WEIGHTS_FORMAT, "architecture": json.dumps(_architecture())}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_evaluator(path: Path | None = None, config: EvaluatorConfig | None = None) -> Evaluator:
    """The evaluator with the weights at ``path`` (default: the shipped :data:`WEIGHTS`)."""
    if path is None and config is None:
        return _default_evaluator()
    return _load(path or WEIGHTS, config or EvaluatorConfig())


@functools.cache
def _default_evaluator() -> Evaluator:
    return _load(WEIGHTS, EvaluatorConfig())


def _load(path: Path, config: EvaluatorConfig) -> Evaluator:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(
            f"no evaluator weights at {path}; train them: flywheel world evaluator-train --out PATH"
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not {WEIGHTS_FORMAT} weights; retrain")
    if json.loads(metadata.get("architecture", "{}")) != _architecture():
        raise ValueError(f"{path}: trained for other classes, alphabet or crops; retrain")
    tensors = load_file(str(path))
    shape_net, text_net = ShapeNet(), TextNet()
    shape_net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("shape.")})
    text_net.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text.")})
    shape_net.eval()
    text_net.eval()
    return Evaluator(shape_net=shape_net, text_net=text_net, config=config)


@dataclass(kw_only=True, slots=True)
class _Seen:
    """Detected objects and read lines of one image."""

    objects: list[DetectedObject]
    texts: list[ReadText]


@torch.no_grad()
def _see(rgb: FloatArray, evaluator: Evaluator) -> _Seen:
    config = evaluator.config
    seg = segment(rgb, config)
    height, width = seg.height, seg.width
    min_area = config.min_object_area * height * width
    candidates = [c for c in seg.components if c.area >= min_area]
    objects: list[DetectedObject] = []
    taken: set[tuple[int, int]] = set()  # (colour, ink label) of the objects' ink
    if candidates:
        crops, scales = zip(*(component_crop(seg, c) for c in candidates), strict=True)
        probs = evaluator.shape_net(torch.stack(crops), torch.stack(scales)).softmax(-1)
        confidence, classes = probs.max(-1)
        for comp, k, p in zip(candidates, classes.tolist(), confidence.tolist(), strict=True):
            if k == TEXT_CLASS:
                continue
            taken.add((comp.colour, comp.ink))
            objects.append(
                DetectedObject(
                    shape=SHAPE_CLASSES[k],
                    colour=COLOUR_NAMES[comp.colour],
                    x=comp.x,
                    y=comp.y,
                    area=comp.area / (height * width),
                    confidence=p,
                )
            )
    pieces = [c for c in seg.ink if (c.colour, c.label) not in taken]
    lines = [line for line in group_lines(pieces) if line[2] >= min_area]
    lines = lines[: config.max_lines]
    texts: list[ReadText] = []
    if lines:
        crops_ = [line_crop(seg.coverage[colour], box) for colour, box, _ in lines]
        batch, widths = stack_lines(crops_)
        log_probs, lengths = evaluator.text_net(batch, widths)
        for (colour, box, _), text in zip(
            lines, ctc_greedy_decode(log_probs, lengths), strict=True
        ):
            texts.append(
                ReadText(
                    text=text,
                    colour=COLOUR_NAMES[colour],
                    x=(box[0] + box[2]) / 2 / width,
                    y=(box[1] + box[3]) / 2 / height,
                )
            )
    return _Seen(objects=objects, texts=texts)


def _kind(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def _match_objects(scene: SceneSpec, seen: Sequence[DetectedObject]) -> list[int | None]:
    """For each asked object, the index of its matched detected object (or None)."""
    asked = scene.objects
    if not asked or not seen:
        return [None] * len(asked)
    cost = np.zeros((len(asked), len(seen)))
    for i, a in enumerate(asked):
        for j, d in enumerate(seen):
            distance = math.hypot(a.x - d.x, a.y - d.y)
            cost[i, j] = (a.colour != d.colour) + (a.shape != d.shape) + 0.5 * distance
    rows, cols = optimize.linear_sum_assignment(cost)
    matched: list[int | None] = [None] * len(asked)
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        if asked[i].colour == seen[j].colour or asked[i].shape == seen[j].shape:
            matched[i] = j
    return matched


def _relation_separation(relation: str, a: DetectedObject, b: DetectedObject) -> float:
    """How far ``a`` is from ``b`` in the direction ``relation`` asks (canvas fractions)."""
    return {
        "left of": b.x - a.x,
        "right of": a.x - b.x,
        "above": b.y - a.y,
        "below": a.y - b.y,
    }[relation]


def _kind_elements(scene: SceneSpec, seen: Sequence[DetectedObject]) -> list[ElementResult]:
    """``object`` and ``count`` per asked (colour, shape) kind."""
    found = Counter((d.colour, d.shape) for d in seen)
    elements = []
    for (colour, shape), n in scene.counts().items():
        m, kind = found[(colour, shape)], _kind(colour, shape)
        elements.append(
            ElementResult(
                kind="object",
                subject=kind,
                asked=kind,
                found=kind if m else None,
                passed=m > 0,
                score=float(m > 0),
            )
        )
        elements.append(
            ElementResult(
                kind="count",
                subject=kind,
                asked=str(n),
                found=str(m),
                passed=m == n,
                score=1.0 - min(1.0, abs(m - n) / n),
            )
        )
    return elements


def _attribute_elements(
    scene: SceneSpec, seen: Sequence[DetectedObject], matched: Sequence[int | None]
) -> list[ElementResult]:
    """``shape`` and ``colour`` per asked object, read off its matched detection."""
    elements = []
    for i, (obj, j) in enumerate(zip(scene.objects, matched, strict=True)):
        match = seen[j] if j is not None else None
        subject = f"object {i} ({_kind(obj.colour, obj.shape)})"
        checks: tuple[tuple[ElementKind, str, str | None], ...] = (
            ("shape", obj.shape, match.shape if match else None),
            ("colour", obj.colour, match.colour if match else None),
        )
        for kind, asked, found in checks:
            elements.append(
                ElementResult(
                    kind=kind,
                    subject=subject,
                    asked=asked,
                    found=found,
                    passed=found == asked,
                    score=float(found == asked),
                )
            )
    return elements


def _relation_elements(
    scene: SceneSpec,
    seen: Sequence[DetectedObject],
    matched: Sequence[int | None],
    config: EvaluatorConfig,
) -> list[ElementResult]:
    """``relation`` per relation the spec's centres make clear."""
    threshold = config.relation_tolerance * RELATION_MARGIN
    elements = []
    for i, rel, j in relations(scene):
        a, b = scene.objects[i], scene.objects[j]
        da = _matched_of_kind(seen, matched[i], a.colour, a.shape)
        db = _matched_of_kind(seen, matched[j], b.colour, b.shape)
        found: str | None = None
        ok = False
        if da is not None and db is not None:
            separation = _relation_separation(rel, da, db)
            ok = separation >= threshold
            found = f"separation {separation:+.3f}"
        elements.append(
            ElementResult(
                kind="relation",
                subject=f"{_kind(a.colour, a.shape)} {rel} {_kind(b.colour, b.shape)}",
                asked=rel,
                found=found,
                passed=ok,
                score=float(ok),
            )
        )
    return elements


def _score_elements(scene: SceneSpec, seen: _Seen, config: EvaluatorConfig) -> list[ElementResult]:
    matched = _match_objects(scene, seen.objects)
    return [
        *_kind_elements(scene, seen.objects),
        *_attribute_elements(scene, seen.objects, matched),
        *_relation_elements(scene, seen.objects, matched, config),
        *_score_texts(scene, seen.texts),
    ]


def _matched_of_kind(
    seen: Sequence[DetectedObject], j: int | None, colour: str, shape: str
) -> DetectedObject | None:
    if j is None or seen[j].colour != colour or seen[j].shape != shape:
        return None
    return seen[j]


def _score_texts(scene: SceneSpec, read: Sequence[ReadText]) -> list[ElementResult]:
    asked = scene.texts
    reading: list[str] = [""] * len(asked)
    if asked and read:
        cost = np.array([[normalized_edit_distance(a.text, r.text) for r in read] for a in asked])
        rows, cols = optimize.linear_sum_assignment(cost)
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            reading[i] = read[j].text
    out = []
    for i, (text, found) in enumerate(zip(asked, reading, strict=True)):
        ned = normalized_edit_distance(text.text, found)
        out.append(
            ElementResult(
                kind="text",
                subject=f'text {i} ("{text.text}", {text.script})',
                asked=text.text,
                found=found,
                passed=found == text.text,
                score=1.0 - ned,
                edit_distance=levenshtein(text.text, found),
            )
        )
    return out


def evaluate(
    scene: SceneSpec, image: ImageLike, *, evaluator: Evaluator | None = None
) -> Evaluation:
    """Score every element ``scene`` asks for in ``image``."""
    evaluator = evaluator or load_evaluator()
    evaluator.config.validate()
    pil = to_pil(image)
    seen = _see(to_array(pil, evaluator.config.max_side), evaluator)
    elements = _score_elements(scene, seen, evaluator.config)
    return Evaluation(
        scene_id=scene.id,
        width=pil.width,
        height=pil.height,
        elements=elements,
        skills=summarize(elements),
        score=sum(e.score for e in elements) / len(elements) if elements else 1.0,
        objects=seen.objects,
        texts=seen.texts,
    )


def measure_accuracy(
    scenes: int = 200,
    *,
    size: int = 64,
    first_seed: int = 0,
    config: SceneConfig | None = None,
    evaluator: Evaluator | None = None,
) -> dict[str, SkillScore]:
    """Per-kind accuracy on clean renders of held-out scenes ``first_seed`` onwards."""
    if first_seed + scenes > TRAIN_SEED_OFFSET:
        raise ValueError(f"held-out seeds stay below {TRAIN_SEED_OFFSET}")
    elements: list[ElementResult] = []
    for seed in range(first_seed, first_seed + scenes):
        scene = sample_scene(seed, config)
        elements += evaluate(scene, render(scene, size, size), evaluator=evaluator).elements
    return summarize(elements)

"""Training the ground-truth evaluator's networks on rendered scenes.

:func:`train_evaluator` renders its own data, deterministically by seed. Every scene seed it
draws lies in ``[TRAIN_SEED_OFFSET, CORPUS_SEED_LIMIT)``: never a held-out seed (below
:data:`~flywheel.world.evaluator.TRAIN_SEED_OFFSET`), never a benchmark seed.

- **Scenes** (:attr:`EvaluatorTrainConfig.scenes`) from
  :func:`~flywheel.world.scenes.sample_scene`, rendered at a resolution from
  :attr:`EvaluatorTrainConfig.sizes`, are segmented exactly as at evaluation time; each
  component large enough to be an object is labelled from the spec: the shape of the
  same-coloured object whose circumradius holds its centroid, or "text" when its centroid
  lies in a same-coloured text's drawn box.
- **Text sheets** (:attr:`EvaluatorTrainConfig.sheets`): three texts on one canvas, a top
  and a bottom one as ``sample_scene`` places them and one in the middle; three lines per
  render for the line reader. Some texts are nudged inwards and a fraction
  (:attr:`EvaluatorTrainConfig.random_text_probability`) become random strings of their
  script's characters, so the reader learns characters, not only the word list (a misspelt
  word should be read as written, not as the word it resembles).

Every text's line crop is cut the way evaluation cuts it, from the box of the ink
components inside the text's drawn box. A fraction of the renders is blurred, noised and
colour-shifted (robustness to generated images). :class:`~flywheel.world.recognizers.ShapeNet`
is trained with cross-entropy, :class:`~flywheel.world.recognizers.TextNet` with CTC; both
with Adam and a cosine decay, on batches drawn with a seeded ``torch.Generator``. A fraction
of the crops is held out and the report gives the accuracy on it.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from flywheel.world.evaluator import (
    COLOUR_NAMES,
    TRAIN_SEED_OFFSET,
    Component,
    Evaluator,
    EvaluatorConfig,
    component_crop,
    line_crop,
    save_evaluator,
    segment,
    stack_lines,
    to_array,
)
from flywheel.world.fonts import Script, load_font
from flywheel.world.recognizers import (
    ALPHABET,
    SHAPE_CLASSES,
    TEXT_CLASS,
    ShapeNet,
    TextNet,
    ctc_greedy_decode,
)
from flywheel.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    CORPUS_SEED_LIMIT,
    HAN_WORDS,
    LATIN_WORDS,
    SIZES,
    SUPERSAMPLE,
    TEXT_SIZES,
    SceneConfig,
    SceneSpec,
    SceneText,
    render,
    sample_scene,
)
from training.loop import OptimizerConfig, seeded


@dataclass(kw_only=True, slots=True)
class EvaluatorTrainConfig:
    """How :func:`train_evaluator` renders its data and trains both networks."""

    scenes: int = 1000
    """Rendered scenes: component crops for the shape classifier (and a line each, mostly)."""
    sheets: int = 2000
    """Rendered text sheets, three lines each, for the line reader."""
    sizes: tuple[int, ...] = (64, 64, 64, 96, 128)
    """Square resolutions to render at, drawn uniformly (a repeat weighs one up: 64 x 64 is
    the world generator's resolution, and the hardest for small text)."""
    text_probability: float = 0.9
    """Chance a training scene holds a text."""
    han_probability: float = 0.3
    """Chance a training text is Han."""
    random_text_probability: float = 0.2
    """Chance a sheet's text becomes a random string of its script's characters."""
    augment_probability: float = 0.5
    """Chance a render is blurred, noised and colour-shifted (generated images are softer
    than renders: a VAE's reconstructions, a small generator's samples)."""
    max_blur: float = 0.9
    """Largest Gaussian blur radius of an augmented render, in pixels at 64 x 64 (scaled
    with the resolution)."""
    shape_steps: int = 800
    """Optimizer steps of the shape classifier."""
    shape_batch: int = 64
    text_steps: int = 3000
    """Optimizer steps of the line reader."""
    text_batch: int = 32
    text_ema: float = 0.998
    """Decay of the exponential moving average of the line reader's weights (and norm
    statistics) that training ends with; 0 keeps the last weights."""
    learning_rate: float = 4e-3
    """Adam's peak learning rate; a cosine takes it to 0 over each network's steps."""
    validation_fraction: float = 0.1
    """Crops held out of training to report accuracy on."""

    def validate(self) -> None:
        """Raise ``ValueError`` when a field is out of range."""
        if self.scenes < 10 or self.sheets < 0 or not self.sizes or min(self.sizes) < 32:
            raise ValueError("EvaluatorTrainConfig: scenes >= 10, sheets >= 0, sizes >= 32")
        if min(self.shape_steps, self.text_steps) < 0 or min(self.shape_batch, self.text_batch) < 1:
            raise ValueError("EvaluatorTrainConfig: steps >= 0 and batches >= 1")
        if not 0 < self.validation_fraction < 1 or self.learning_rate <= 0:
            raise ValueError("EvaluatorTrainConfig: validation_fraction in (0, 1), lr > 0")
        if not 0 <= self.augment_probability <= 1 or self.max_blur < 0:
            raise ValueError("EvaluatorTrainConfig: augment_probability in [0, 1], max_blur >= 0")
        if not 0 <= self.text_ema < 1:
            raise ValueError("EvaluatorTrainConfig: text_ema in [0, 1)")


@dataclass(kw_only=True, slots=True)
class TrainReport:
    """What :func:`train_evaluator` did."""

    components: int
    """Component crops rendered (training + validation)."""
    lines: int
    """Line crops rendered (training + validation)."""
    shape_loss: list[float]
    """Cross-entropy per step."""
    text_loss: list[float]
    """CTC loss per step."""
    shape_accuracy: float
    """Component class accuracy on the held-out crops."""
    text_accuracy: float
    """Exact-reading rate on the held-out lines."""
    seconds: float
    path: Path | None


@dataclass(kw_only=True, slots=True)
class _Data:
    crops: list[Tensor] = field(default_factory=list)
    scales: list[Tensor] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    lines: list[Tensor] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def text_box(text: SceneText, width: int, height: int) -> tuple[float, float, float, float]:
    """The pixel box (x0, y0, x1, y1) :func:`~flywheel.world.scenes.render` draws ``text`` in."""
    s = SUPERSAMPLE
    font = load_font(text.font, max(4, round(TEXT_SIZES[text.size] * height * s)))
    left, top, right, bottom = font.getbbox(text.text, anchor="mm")
    cx, cy = text.x * width * s, text.y * height * s
    return ((cx + left) / s, (cy + top) / s, (cx + right) / s, (cy + bottom) / s)


def _augment(image: Image.Image, rng: random.Random, max_blur: float) -> Image.Image:
    """Blur, Gaussian noise and a colour shift, scaled to the resolution."""
    radius = rng.uniform(0.0, max_blur) * image.height / 64
    if radius > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    noise = np.random.default_rng(rng.getrandbits(32))
    array = np.asarray(image, dtype=np.float32)
    array = array + noise.normal(0.0, rng.uniform(0.0, 4.0), array.shape).astype(np.float32)
    array = array + np.array([rng.uniform(-6, 6) for _ in range(3)], dtype=np.float32)
    return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), "RGB")


def _random_string(rng: random.Random, script: Script) -> str:
    """A few characters of ``script``'s words, in random order."""
    words = HAN_WORDS if script == "han" else LATIN_WORDS
    characters = sorted(set("".join(words)))
    length = rng.randint(1, 3) if script == "han" else rng.randint(2, 6)
    return "".join(rng.choice(characters) for _ in range(length))


def _sheet(rng: random.Random, config: EvaluatorTrainConfig, size: int) -> SceneSpec:
    """Three texts: a top and a bottom one placed as the world places them, one in the middle.

    The texts come from :func:`~flywheel.world.scenes.sample_scene` (so their sizes, fonts and
    rows follow the world); the middle one takes any colour. Some are nudged inwards by up to
    0.02 and some become random strings (when these fit the canvas).
    """
    scene_config = SceneConfig(text_probability=1.0, han_probability=config.han_probability)
    rows: dict[str, SceneText] = {}
    while len(rows) < 3:
        scene = sample_scene(rng.randrange(TRAIN_SEED_OFFSET, CORPUS_SEED_LIMIT), scene_config)
        if not scene.texts:
            continue
        text = scene.texts[0]
        if text.size != "small" and rng.random() < 0.5:
            continue  # small text, the hardest to read, is drawn twice as often
        row = "top" if text.y < 0.5 else "bottom"
        if row in rows:
            row = "middle"
            text = text.model_copy(update={"y": 0.5, "colour": rng.choice(list(COLOURS))})
        if row in rows:
            continue
        if rng.random() < 0.5:
            nudge = rng.uniform(0.0, 0.02)
            inwards = {"top": nudge, "middle": nudge - 0.01, "bottom": -nudge}[row]
            text = text.model_copy(update={"y": text.y + inwards})
        if rng.random() < config.random_text_probability:
            other = text.model_copy(update={"text": _random_string(rng, text.script)})
            x0, _, x1, _ = text_box(other, size, size)
            if x0 >= 1 and x1 <= size - 1:
                text = other
        rows[row] = text
    background = rng.choice(list(BACKGROUNDS))
    return SceneSpec(id="sheet", background=background, texts=tuple(rows.values()))


def _collect(scene: SceneSpec, image: Image.Image, data: _Data, *, components: bool) -> None:
    """Append the labelled component crops and the line crops of one render to ``data``."""
    config = EvaluatorConfig()
    seg = segment(to_array(image), config, solid=components)
    height, width = seg.height, seg.width
    boxes = [text_box(t, width, height) for t in scene.texts]

    def in_text(comp: Component, i: int) -> bool:
        x0, y0, x1, y1 = boxes[i]
        cx, cy = comp.x * width, comp.y * height
        colour = COLOUR_NAMES[comp.colour] == scene.texts[i].colour
        return colour and x0 - 2 <= cx <= x1 + 2 and y0 - 2 <= cy <= y1 + 2

    if components:
        min_area = config.min_object_area * height * width
        radius = min(width, height) / 2
        for comp in seg.components:
            if comp.area < min_area:
                continue
            label: int | None = None
            for obj in scene.objects:
                far = math.hypot((comp.x - obj.x) * width, (comp.y - obj.y) * height)
                if obj.colour == COLOUR_NAMES[comp.colour] and far <= SIZES[obj.size] * radius:
                    label = SHAPE_CLASSES.index(obj.shape)
            if label is None and any(in_text(comp, i) for i in range(len(boxes))):
                label = TEXT_CLASS
            if label is not None:
                crop, scale = component_crop(seg, comp)
                data.crops.append(crop)
                data.scales.append(scale)
                data.classes.append(label)
    for i, text in enumerate(scene.texts):
        members = [c for c in seg.ink if in_text(c, i)]
        if not members:
            continue
        box = (
            min(c.box[0] for c in members),
            min(c.box[1] for c in members),
            max(c.box[2] for c in members),
            max(c.box[3] for c in members),
        )
        data.lines.append(line_crop(seg.coverage[members[0].colour], box))
        data.texts.append(text.text)


def _progress(enabled: bool) -> Progress:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=Console(stderr=True), disable=not enabled)


def _render_data(config: EvaluatorTrainConfig, seed: int, display: Progress) -> _Data:
    scene_config = SceneConfig(
        text_probability=config.text_probability,
        han_probability=config.han_probability,
        max_kinds=3,
    )
    rng = random.Random(seed)
    data = _Data()
    task = display.add_task("render", total=config.scenes + config.sheets, info="")
    for i in range(config.scenes + config.sheets):
        size = rng.choice(config.sizes)
        if i < config.scenes:
            scene = sample_scene(rng.randrange(TRAIN_SEED_OFFSET, CORPUS_SEED_LIMIT), scene_config)
        else:
            scene = _sheet(rng, config, size)
        image = render(scene, size, size)
        if rng.random() < config.augment_probability:
            image = _augment(image, rng, config.max_blur)
        _collect(scene, image, data, components=i < config.scenes)
        display.update(task, advance=1, info=f"{len(data.crops)} crops, {len(data.lines)} lines")
    return data


def _set_lr(optimizer: torch.optim.Optimizer, schedule: OptimizerConfig, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = schedule.learning_rate(step)


def _cosine(peak: float, total: int) -> OptimizerConfig:
    """The learning rate of a network's steps: a cosine from ``peak`` to 0 over ``total``."""
    return OptimizerConfig(lr=peak, decay_steps=max(1, total), min_lr_ratio=0.0)


def _train_shapes(
    net: ShapeNet,
    data: _Data,
    train: list[int],
    config: EvaluatorTrainConfig,
    generator: torch.Generator,
    display: Progress,
) -> list[float]:
    crops, scales = torch.stack(data.crops), torch.stack(data.scales)  # (N, 2, C, C), (N, 3)
    classes = torch.tensor(data.classes)  # (N,)
    pool = torch.tensor(train)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    schedule = _cosine(config.learning_rate, config.shape_steps)
    task = display.add_task("shapes", total=config.shape_steps, info="")
    losses = []
    net.train()
    for step in range(config.shape_steps):
        batch = pool[torch.randint(len(pool), (config.shape_batch,), generator=generator)]
        _set_lr(optimizer, schedule, step)
        loss = F.cross_entropy(net(crops[batch], scales[batch]), classes[batch])
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
        display.update(task, advance=1, info=f"loss {losses[-1]:.3f}")
    net.eval()
    return losses


def _train_text(
    net: TextNet,
    data: _Data,
    train: list[int],
    config: EvaluatorTrainConfig,
    generator: torch.Generator,
    display: Progress,
) -> list[float]:
    targets = [torch.tensor([ALPHABET.index(c) + 1 for c in text]) for text in data.texts]
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    schedule = _cosine(config.learning_rate, config.text_steps)
    task = display.add_task("text", total=config.text_steps, info="")
    losses = []
    ema = get_ema_multi_avg_fn(config.text_ema)  # type: ignore[no-untyped-call]
    average = AveragedModel(net, multi_avg_fn=ema, use_buffers=True)
    net.train()
    for step in range(config.text_steps):
        picks = torch.randint(len(train), (config.text_batch,), generator=generator).tolist()
        batch = [train[k] for k in picks]
        lines, widths = stack_lines([data.lines[i] for i in batch])
        log_probs, lengths = net(lines, widths)  # (T, B, classes), (B,)
        wanted = [targets[i] for i in batch]
        _set_lr(optimizer, schedule, step)
        loss = F.ctc_loss(
            log_probs,
            torch.cat(wanted),
            lengths,
            torch.tensor([len(t) for t in wanted]),
            zero_infinity=True,
        )
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        optimizer.step()
        average.update_parameters(net)
        losses.append(float(loss.detach()))
        display.update(task, advance=1, info=f"loss {losses[-1]:.3f}")
    if config.text_ema > 0:
        net.load_state_dict(average.module.state_dict())
    net.eval()
    return losses


@torch.no_grad()
def _validate(
    evaluator: Evaluator, data: _Data, shapes: list[int], lines: list[int]
) -> tuple[float, float]:
    shape_accuracy = text_accuracy = 1.0
    if shapes:
        logits = evaluator.shape_net(
            torch.stack([data.crops[i] for i in shapes]),
            torch.stack([data.scales[i] for i in shapes]),
        )
        truth = torch.tensor([data.classes[i] for i in shapes])
        shape_accuracy = float((logits.argmax(-1) == truth).float().mean())
    if lines:
        batch, widths = stack_lines([data.lines[i] for i in lines])
        read = ctc_greedy_decode(*evaluator.text_net(batch, widths))
        right = sum(r == data.texts[i] for r, i in zip(read, lines, strict=True))
        text_accuracy = right / len(lines)
    return shape_accuracy, text_accuracy


def _split(n: int, fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of ``n`` items."""
    order = list(range(n))
    rng.shuffle(order)
    held = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
    return sorted(order[held:]), sorted(order[:held])


def train_evaluator(
    out: Path | None,
    *,
    seed: int = 0,
    config: EvaluatorTrainConfig | None = None,
    progress: bool = False,
) -> tuple[Evaluator, TrainReport]:
    """Render training data, train both networks, write their weights to ``out`` (if given).

    Deterministic by ``seed``: the scenes, resolutions, augmentations, initialisation and
    batches all follow from it.
    """
    config = config or EvaluatorTrainConfig()
    config.validate()
    started = time.monotonic()
    with _progress(progress) as display:
        data = _render_data(config, seed, display)
        if not data.classes or not data.texts:
            raise ValueError("the rendered data holds no components or no lines; add scenes")
        rng = random.Random(seed + 1)
        shape_train, shape_held = _split(len(data.classes), config.validation_fraction, rng)
        line_train, line_held = _split(len(data.texts), config.validation_fraction, rng)
        nets = seeded(seed, lambda: nn.ModuleList([ShapeNet(), TextNet()]))
        shape_net, text_net = cast(ShapeNet, nets[0]), cast(TextNet, nets[1])
        generator = torch.Generator().manual_seed(seed)
        shape_loss = _train_shapes(shape_net, data, shape_train, config, generator, display)
        text_loss = _train_text(text_net, data, line_train, config, generator, display)
    evaluator = Evaluator(shape_net=shape_net, text_net=text_net)
    shape_accuracy, text_accuracy = _validate(evaluator, data, shape_held, line_held)
    path = save_evaluator(evaluator, out) if out is not None else None
    report = TrainReport(
        components=len(data.classes),
        lines=len(data.texts),
        shape_loss=shape_loss,
        text_loss=text_loss,
        shape_accuracy=shape_accuracy,
        text_accuracy=text_accuracy,
        seconds=time.monotonic() - started,
        path=path,
    )
    return evaluator, report

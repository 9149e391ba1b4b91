"""Procedural scenes whose truth is known: a structured spec, its rendering and its captions.

A :class:`SceneSpec` is a canvas (size, background colour) with objects (shape, colour, size,
centre) and texts (the string, its script and font, size, colour, centre). Everything is in
canvas fractions, so one spec renders at any resolution. :func:`sample_scene` draws a spec
from a :class:`SceneConfig` and a seed (the same seed, the same scene); :func:`render` draws
it with Pillow (4x supersampled, box-filtered down); :func:`captions` writes its three
captions: the rich structured caption the generator is trained on, a raw short caption,
and a terse user prompt. :func:`sample_edit` makes an editing triple (source scene,
instruction, target scene): change an attribute, add or remove an object, replace a text.

Spatial relations are derived from the centres (:func:`relations`): object A is "left of"
B when A's centre is at least :data:`RELATION_MARGIN` of the canvas width left of B's, and
so on for right, above and below.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

from flywheel.world.fonts import FONTS, Script, fonts_for, load_font

Shape = Literal["circle", "square", "triangle", "diamond", "hexagon", "star"]
SHAPES: tuple[Shape, ...] = ("circle", "square", "triangle", "diamond", "hexagon", "star")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
    "black": (20, 20, 20),
}
"""Colours of objects and texts, by name."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "grey": (200, 200, 200),
    "cream": (245, 232, 200),
    "sky": (200, 225, 248),
}
"""Background colours, pale and far from every object colour."""

SIZES: dict[str, float] = {"small": 0.16, "medium": 0.24, "large": 0.34}
"""An object's size: its extent as a fraction of the canvas' shorter side."""

TEXT_SIZES: dict[str, float] = {"small": 0.14, "medium": 0.18, "large": 0.22}
"""A text's size: its font size as a fraction of the canvas height."""

LATIN_WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "sale", "open", "cafe", "book", "tea", "moon", "star", "shop", "art",
    "jazz", "park", "rain", "bus", "map", "exit", "love", "fish", "hello", "zoo", "taxi",
    "bike", "milk", "gold", "news", "pizza", "yoga", "film",
)  # fmt: skip
"""Words a Latin text is drawn from."""

HAN_WORDS: tuple[str, ...] = (
    "山水", "天空", "大海", "花園", "月光", "火車", "小鳥", "日出", "中心", "書店", "大門",
    "白雲", "江河", "木馬", "人生", "土地", "田野", "石頭", "雨天", "風車",
)  # fmt: skip
"""Words a Han text is drawn from (two characters each)."""

GRID = ("left", "centre", "right")
ROWS = ("top", "middle", "bottom")
RELATION_MARGIN = 0.15
"""Minimum centre separation (canvas fraction) for a left/right or above/below relation."""

Relation = Literal["left of", "right of", "above", "below"]

CORPUS_SEED_LIMIT = 2**40
"""World corpora (:mod:`flywheel.world.corpus`) draw scene seeds below this; the benchmark
suites (:mod:`flywheel.world.benchmark`) draw theirs above it: no benchmark scene is trained on."""


class SceneObject(BaseModel):
    """One filled shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: Shape
    colour: str
    size: str
    x: float = Field(ge=0, le=1)
    """Centre, as a fraction of the canvas width from the left."""
    y: float = Field(ge=0, le=1)
    """Centre, as a fraction of the canvas height from the top."""


class SceneText(BaseModel):
    """One line of rendered text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1)
    script: Script
    font: str
    size: str
    colour: str
    x: float = Field(ge=0, le=1)
    y: float = Field(ge=0, le=1)


class SceneSpec(BaseModel):
    """Everything there is to know about one scene."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    background: str
    objects: tuple[SceneObject, ...] = ()
    texts: tuple[SceneText, ...] = ()

    def counts(self) -> Counter[tuple[str, str]]:
        """How many objects of each (colour, shape)."""
        return Counter((o.colour, o.shape) for o in self.objects)


@dataclass(kw_only=True, slots=True)
class SceneConfig:
    """How scenes are drawn: what they hold and how often."""

    shape_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SHAPES, 1.0))
    """Relative frequency of each shape (a rare concept: a small weight)."""
    colour_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COLOURS, 1.0))
    """Relative frequency of each object colour."""
    min_kinds: int = 1
    """Fewest distinct (shape, colour) kinds of object in a scene."""
    max_kinds: int = 2
    """Most distinct kinds of object in a scene."""
    max_count: int = 3
    """Most copies of one kind (a count of 2 or 3 is the counting skill)."""
    count_probability: float = 0.3
    """Chance that a kind appears more than once."""
    text_probability: float = 0.5
    """Chance that a scene holds a text."""
    han_probability: float = 0.3
    """Chance that a text is Han rather than Latin."""
    max_placement_tries: int = 200
    """Tries to place an object without overlapping the others before the scene is redrawn."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if set(self.shape_weights) - set(SHAPES) or not any(self.shape_weights.values()):
            raise ValueError(f"shape_weights must weigh some of {SHAPES}")
        if set(self.colour_weights) - set(COLOURS) or not any(self.colour_weights.values()):
            raise ValueError(f"colour_weights must weigh some of {tuple(COLOURS)}")
        if not 1 <= self.min_kinds <= self.max_kinds or self.max_count < 1:
            raise ValueError("SceneConfig: 1 <= min_kinds <= max_kinds and max_count >= 1")
        for name in ("count_probability", "text_probability", "han_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SceneConfig.{name} must be in [0, 1]")


# ---- sampling ---------------------------------------------------------------------------


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    names = [k for k, w in weights.items() if w > 0]
    return rng.choices(names, weights=[weights[k] for k in names])[0]


def _extent(obj: SceneObject) -> float:
    return SIZES[obj.size]


def _overlaps(x: float, y: float, r: float, placed: Sequence[tuple[float, float, float]]) -> bool:
    return any(math.hypot(x - px, y - py) < (r + pr) * 0.6 + 0.04 for px, py, pr in placed)


def _place(
    rng: random.Random, extent: float, placed: list[tuple[float, float, float]], tries: int
) -> tuple[float, float] | None:
    """A centre for a thing of ``extent`` that keeps clear of ``placed`` and of the edges."""
    half = extent / 2 + 0.02
    for _ in range(tries):
        x, y = rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)
        if not _overlaps(x, y, extent, placed):
            placed.append((x, y, extent))
            return x, y
    return None


def free_centre(scene: SceneSpec, extent: float, *, grid: int = 24) -> tuple[float, float] | None:
    """The first centre, scanning a ``grid`` x ``grid`` lattice row by row, at which a thing
    of ``extent`` keeps clear of the scene's objects and of the edges as :func:`sample_scene`
    keeps them (None if there is none); the scene's texts are not considered."""
    placed = [(o.x, o.y, _extent(o)) for o in scene.objects]
    half = extent / 2 + 0.02
    steps = [half + (1 - 2 * half) * i / (grid - 1) for i in range(grid)]
    for y in steps:
        for x in steps:
            if not _overlaps(x, y, extent, placed):
                return round(x, 4), round(y, 4)
    return None


_LATIN_ADVANCE = {"m": 1.0, "w": 0.9}
"""Latin letters wider than :data:`_LATIN_EM` in some Latin font (em)."""
_LATIN_EM = 0.65
"""An upper bound on the advance of the other lowercase letters in every Latin font (em)."""


def _text_extent(text: str, size: str, script: Script) -> float:
    """An upper bound on the width of ``text`` at ``size`` in any font of ``script``.

    In canvas-height fractions. Han glyphs are one em wide; the bound on Latin letters is
    fixed (not measured) so that a scene's layout does not depend on the font engine.
    """
    if script == "han":
        em = float(len(text))
    else:
        em = sum(_LATIN_ADVANCE.get(c, _LATIN_EM) for c in text)
    return TEXT_SIZES[size] * em


def sample_scene(seed: int, config: SceneConfig | None = None, *, scene_id: str = "") -> SceneSpec:
    """The scene of ``seed`` under ``config`` (deterministic)."""
    config = config or SceneConfig()
    config.validate()
    rng = random.Random(seed)
    for _ in range(100):
        scene = _try_scene(rng, config, scene_id or f"scene-{seed}")
        if scene is not None:
            return scene
    raise RuntimeError(f"seed {seed}: no scene fits after 100 tries; loosen the config")


def _try_scene(rng: random.Random, config: SceneConfig, scene_id: str) -> SceneSpec | None:
    placed: list[tuple[float, float, float]] = []
    texts: list[SceneText] = []
    if rng.random() < config.text_probability:
        script: Script = "han" if rng.random() < config.han_probability else "latin"
        word = rng.choice(HAN_WORDS if script == "han" else LATIN_WORDS)
        size = rng.choice(list(TEXT_SIZES))
        width = _text_extent(word, size, script)
        if width < 0.9:
            # A top or bottom line, clear of the edge (glyphs reach half an em from the middle).
            margin = round(0.6 * TEXT_SIZES[size] + 0.02, 4)
            y = rng.choice((margin, 1 - margin))
            x = rng.uniform(width / 2 + 0.04, 1 - width / 2 - 0.04)
            placed.append((x, y, width))
            texts.append(
                SceneText(
                    text=word,
                    script=script,
                    font=rng.choice(fonts_for(script)),
                    size=size,
                    colour=rng.choice(("black", "blue", "red")),
                    x=x,
                    y=y,
                )
            )
    objects: list[SceneObject] = []
    kinds: set[tuple[str, str]] = set()
    for _ in range(rng.randint(config.min_kinds, config.max_kinds)):
        shape, colour = _weighted(rng, config.shape_weights), _weighted(rng, config.colour_weights)
        if (shape, colour) in kinds:
            continue
        kinds.add((shape, colour))
        size = rng.choice(list(SIZES))
        count = 1
        if config.max_count > 1 and rng.random() < config.count_probability:
            count = rng.randint(2, config.max_count)
        for _ in range(count):
            centre = _place(rng, SIZES[size], placed, config.max_placement_tries)
            if centre is None:
                return None
            objects.append(
                SceneObject(shape=shape, colour=colour, size=size, x=centre[0], y=centre[1])
            )
    if len(kinds) < config.min_kinds:
        return None
    background = rng.choice(list(BACKGROUNDS))
    return SceneSpec(id=scene_id, background=background, objects=tuple(objects), texts=tuple(texts))


# ---- relations and captions ---------------------------------------------------------------


def relation(a: SceneObject, b: SceneObject) -> list[Relation]:
    """The relations of ``a`` to ``b`` that the centres make clear."""
    found: list[Relation] = []
    if b.x - a.x >= RELATION_MARGIN:
        found.append("left of")
    elif a.x - b.x >= RELATION_MARGIN:
        found.append("right of")
    if b.y - a.y >= RELATION_MARGIN:
        found.append("above")
    elif a.y - b.y >= RELATION_MARGIN:
        found.append("below")
    return found


def relations(scene: SceneSpec) -> list[tuple[int, Relation, int]]:
    """(i, relation, j) for every pair of objects of different kinds with a clear relation."""
    out: list[tuple[int, Relation, int]] = []
    objects = scene.objects
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if j <= i or (a.shape, a.colour) == (b.shape, b.colour):
                continue
            out.extend((i, rel, j) for rel in relation(a, b))
    return out


def region(x: float, y: float) -> str:
    """The named region of the 3 x 3 grid a centre falls in ("top left", "centre", ...)."""
    column = GRID[min(2, int(x * 3))]
    row = ROWS[min(2, int(y * 3))]
    if row == "middle" and column == "centre":
        return "centre"
    if row == "middle":
        return f"middle {column}"
    return f"{row} {column}" if column != "centre" else f"{row} centre"


_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else f"{shape}es" if shape.endswith("x") else f"{shape}s"


def _kind_phrase(colour: str, shape: str, n: int, size: str | None = None) -> str:
    sized = f"{size} " if size else ""
    if n == 1:
        article = "an" if (sized or colour)[0] in "aeiou" else "a"
        return f"{article} {sized}{colour} {shape}"
    return f"{_NUMBERS.get(n, str(n))} {sized}{colour} {_plural(shape, n)}"


def _text_phrase(text: SceneText, detailed: bool) -> str:
    what = "the word" if text.script == "latin" else "the Chinese characters"
    if not detailed:
        return f'{what} "{text.text}"'
    where = "at the top" if text.y < 0.5 else "at the bottom"
    return f'{what} "{text.text}" written in {text.colour} {text.font} letters {where}'


@dataclass(kw_only=True, slots=True, frozen=True)
class Captions:
    """The three captions of a scene."""

    rich: str
    """Structured and complete: every object with size, colour, shape, count and place, the
    clear relations, every text with its font, colour and place, the background."""
    raw: str
    """A short caption as a person would write it: kinds, counts and texts."""
    terse: str
    """A terse user prompt: the main kinds only, no counts, sizes, places or texts' details."""


def captions(scene: SceneSpec) -> Captions:
    """The rich, raw and terse captions of ``scene``."""
    groups: dict[tuple[str, str, str], list[SceneObject]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.colour, obj.shape, obj.size), []).append(obj)
    rich_parts = []
    for (colour, shape, size), objs in groups.items():
        places = ", ".join(region(o.x, o.y) for o in objs)
        rich_parts.append(f"{_kind_phrase(colour, shape, len(objs), size)} at the {places}")
    rich = f"A picture with a {scene.background} background showing " + (
        "; ".join(rich_parts) if rich_parts else "no objects"
    )
    rels = relations(scene)
    if rels:
        said = []
        for i, rel, j in rels[:3]:
            a, b = scene.objects[i], scene.objects[j]
            said.append(f"the {a.colour} {a.shape} is {rel} the {b.colour} {b.shape}")
        rich += ". " + "; ".join(said).capitalize()
    if scene.texts:
        rich += ". It reads " + " and ".join(_text_phrase(t, True) for t in scene.texts)
    rich += "."

    kinds = [_kind_phrase(c, s, n) for (c, s), n in scene.counts().items()]
    raw = " and ".join(kinds) if kinds else "an empty background"
    if scene.texts:
        raw += " with " + " and ".join(_text_phrase(t, False) for t in scene.texts)
    terse_kinds = list(dict.fromkeys(f"{o.colour} {o.shape}" for o in scene.objects))
    terse = ", ".join(terse_kinds) if terse_kinds else "background"
    if scene.texts:
        terse += ", some text"
    return Captions(rich=rich, raw=raw, terse=terse)


# ---- rendering ----------------------------------------------------------------------------

SUPERSAMPLE = 4


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The vertices of ``shape`` centred at (cx, cy) with circumradius ``r`` (pixels)."""
    if shape == "square":
        h = r / math.sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a)))
            for a in (-90, 30, 150)
        ]
    if shape == "hexagon":
        return [
            (cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a)))
            for a in range(0, 360, 60)
        ]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = math.radians(-90 + 36 * k)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def render(
    scene: SceneSpec,
    width: int = 64,
    height: int = 64,
    *,
    shades: Mapping[str, tuple[int, int, int]] | None = None,
) -> Image.Image:
    """``scene`` as an RGB image of ``width`` x ``height`` pixels. ``shades``: colour name ->
    the RGB its objects are drawn in instead of :data:`COLOURS`' (a corpus whose makers saw a
    colour otherwise: the reward model's shade bias); texts keep the palette's."""
    palette = {**COLOURS, **(shades or {})}
    s = SUPERSAMPLE
    big = Image.new("RGB", (width * s, height * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    side = min(width, height) * s
    for obj in scene.objects:
        cx, cy, r = obj.x * width * s, obj.y * height * s, SIZES[obj.size] * side / 2
        colour = palette[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=colour)
    for text in scene.texts:
        if text.font not in FONTS:
            raise ValueError(f"unknown font {text.font!r}")
        font = load_font(text.font, max(4, round(TEXT_SIZES[text.size] * height * s)))
        draw.text(
            (text.x * width * s, text.y * height * s),
            text.text,
            fill=COLOURS[text.colour],
            font=font,
            anchor="mm",
        )
    return big.resize((width, height), Image.Resampling.BOX)


# ---- editing ------------------------------------------------------------------------------

EditKind = Literal["attribute", "add", "remove", "text"]
EDIT_KINDS: tuple[EditKind, ...] = ("attribute", "add", "remove", "text")


@dataclass(kw_only=True, slots=True, frozen=True)
class EditPair:
    """An editing example: the instruction turns ``source`` into ``target``."""

    kind: EditKind
    instruction: str
    source: SceneSpec
    target: SceneSpec


def sample_edit(
    seed: int, config: SceneConfig | None = None, *, kind: EditKind | None = None
) -> EditPair:
    """An editing triple of ``kind`` (or a kind drawn by the seed) on the scene of ``seed``.

    When the scene does not admit the edit (no text to replace, no object to remove), the
    next attempt draws another scene (and, with ``kind`` None, another kind: a config
    without texts still yields edits).
    """
    config = config or SceneConfig()
    rng = random.Random(seed * 7919 + 17)
    for attempt in range(100):
        chosen: EditKind = rng.choice(EDIT_KINDS) if kind is None else kind
        source = sample_scene(seed + attempt * 1_000_003, config, scene_id=f"edit-{seed}-source")
        pair = _try_edit(rng, source, chosen, config)
        if pair is not None:
            return pair
    what = f"{kind} edit" if kind else "edit"
    raise RuntimeError(f"seed {seed}: no {what} found in 100 scenes")


def _try_edit(
    rng: random.Random, source: SceneSpec, kind: EditKind, config: SceneConfig
) -> EditPair | None:
    target_id = source.id.replace("-source", "-target")
    objects = list(source.objects)
    counts = source.counts()
    unique = [i for i, o in enumerate(objects) if counts[(o.colour, o.shape)] == 1]
    if kind == "attribute":
        if not unique:
            return None
        i = rng.choice(unique)
        old = objects[i]
        taken = {(o.colour, o.shape) for o in objects}
        colours = [c for c in COLOURS if c != old.colour and (c, old.shape) not in taken]
        if not colours:
            return None
        new_colour = rng.choice(colours)
        objects[i] = old.model_copy(update={"colour": new_colour})
        instruction = f"make the {old.colour} {old.shape} {new_colour}"
    elif kind == "remove":
        if not unique or len(objects) < 2:
            return None
        i = rng.choice(unique)
        old = objects.pop(i)
        instruction = f"remove the {old.colour} {old.shape}"
    elif kind == "add":
        placed = [(o.x, o.y, SIZES[o.size]) for o in objects]
        placed += [(t.x, t.y, _text_extent(t.text, t.size, t.script)) for t in source.texts]
        taken = {(o.colour, o.shape) for o in objects}
        shape = _weighted(rng, config.shape_weights)
        colour = _weighted(rng, config.colour_weights)
        if (colour, shape) in taken:
            return None
        size = rng.choice(list(SIZES))
        centre = _place(rng, SIZES[size], placed, config.max_placement_tries)
        if centre is None:
            return None
        new = SceneObject(shape=shape, colour=colour, size=size, x=centre[0], y=centre[1])
        objects.append(new)
        instruction = f"add a {size} {colour} {shape} at the {region(*centre)}"
    else:
        if not source.texts:
            return None
        old_text = source.texts[0]
        words = HAN_WORDS if old_text.script == "han" else LATIN_WORDS
        # A word no wider than the old one keeps clear of the objects and inside the canvas.
        width = _text_extent(old_text.text, old_text.size, old_text.script)
        fitting = [
            w
            for w in words
            if w != old_text.text
            and _text_extent(w, old_text.size, old_text.script) <= width + 1e-9
        ]
        if not fitting:
            return None
        new_word = rng.choice(fitting)
        texts = (old_text.model_copy(update={"text": new_word}), *source.texts[1:])
        target = source.model_copy(update={"id": target_id, "texts": texts})
        instruction = f'replace the text "{old_text.text}" with "{new_word}"'
        return EditPair(kind=kind, instruction=instruction, source=source, target=target)
    target = source.model_copy(update={"id": target_id, "objects": tuple(objects)})
    return EditPair(kind=kind, instruction=instruction, source=source, target=target)

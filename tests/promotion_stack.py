"""A team's stack whose models are already trained, for the promotion test
(:mod:`tests.test_team_promotion`): the shipped world base's files copied as the team's own
models, read by the non-world adapters, with a corpus, suites, a judge and users of the team's.

======================  ==========================================================================
``[generator]``         ``flywheel``: a generator directory (``generator.json``,
                        ``transformer.safetensors``, ``vae.safetensors``; the packaged MiniLM
                        condition), 64x64 images, a copy of ``flywheel/world/weights/world-base``
``[enhancer]``          ``causal_lm``: a copy of ``world-enhancer`` (a byte-level Qwen3 LM that
                        gives terse prompts back, and garbles the users' colour words)
``[reward]``            ``open_clip``: a copy of ``world-reward``
``[corpus]``            ``directory``: 64x64 PNGs of one coloured shape on a pale background,
                        captioned as the generator was trained (:func:`rich_caption`); every
                        colour and shape, except the combinations of :data:`MISSING`
``[suites]``            ``jsonl``: a standard and a regression suite of terse prompts in the
                        captions' colour words
``[judge]``             ``http``: :class:`ColourJudge`, the dominant colour of the image against
                        the colour the prompt names (the users' words included)
``[degrader]``          ``rules``: the captions' colour words swapped for the users' (or kept)
``[launcher]``          ``in_process``: flywheel's built-in ``pe_sft`` (its settings from the
                        cycle's ``prompt_enhancer.settings``, the system prompt the enhancer's)
======================  ==========================================================================

The users ask, in their own colour words (:data:`USER_WORDS`), for the colour and shape
combinations the corpus does not show (:data:`MISSING`): no pair the prompt-enhancer track
builds from the corpus can repeat one of their prompts, so a round that fixes them has learnt
the words, not the prompts. The files of the world's weights are copied by path; nothing here
imports ``flywheel.world``.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from flywheel.ports import CorpusItem, SuitePrompt
from tests.team_stack import JUDGE_PATH, JudgeServer, _toml

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "flywheel" / "world" / "weights"
"""The shipped world weights, copied (as files) to be the team's models."""
SIZE = 64
"""Side of the generator's images and of the corpus' (pixels)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 205, 30),
    "orange": (245, 135, 30),
    "black": (20, 20, 20),
}
"""The team's colours (RGB), as its captions name them."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "grey": (200, 200, 200),
    "cream": (245, 232, 200),
    "sky": (200, 225, 248),
}
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
SIZE_FRACTION = 0.34
"""A shape's extent as a fraction of the side (every one is large: the team's icons)."""
PLACES: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top centre": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "middle left": (0.25, 0.5),
    "centre": (0.5, 0.5),
    "middle right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom centre": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
"""Where a shape is (x, y as fractions of the side)."""
USER_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "jade"),
    "blue": ("navy", "azure"),
    "yellow": ("golden", "lemon"),
    "orange": ("tangerine", "amber"),
    "black": ("ebony", "charcoal"),
}
"""The words the team's users say for its colours (the generator was never conditioned on
them)."""
MISSING: dict[str, tuple[str, ...]] = {
    "blue": ("circle", "star", "hexagon"),
    "green": ("square", "diamond", "star"),
    "yellow": ("triangle", "hexagon", "circle"),
    "black": ("diamond", "square", "triangle"),
}
"""Colour -> the shapes the corpus never shows in it: what the users ask for."""
PER_COMBINATION = 8
"""Corpus items per colour and shape shown."""

GENERATOR_DIR = "models/generator"
ENHANCER_DIR = "models/enhancer"
REWARD_DIR = "models/reward"
CORPUS_DIR = "data/corpus"
SUITES_DIR = "suites"
APP_IMAGES = "app-images"
PROJECT_FILE = "flywheel.toml"
ENHANCER_SYSTEM_PROMPT = "Rewrite the image prompt as a rich, detailed caption."
"""What the world's enhancer was trained with (``training.pe_sft.DEBUG_SYSTEM_PROMPT``)."""

REGRESSION_SUITE = [
    (colour, shape)
    for colour in COLOURS
    for shape in ("circle", "square", "triangle")
    if shape not in MISSING.get(colour, ())
]
"""Terse prompts in the captions' words, of what the corpus shows (12)."""
STANDARD_SUITE = [(colour, shape) for colour in COLOURS for shape in ("diamond", "star")]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def user_prompts() -> list[str]:
    """What the users asked for and disliked: each missing combination in each of the colour's
    user words ("a navy circle", "an azure circle", ...), 24 prompts."""
    return [
        f"{article(word)} {word} {shape}"
        for colour, shapes in MISSING.items()
        for shape in shapes
        for word in USER_WORDS[colour]
    ]


# ---- drawing ---------------------------------------------------------------------------------


def _outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    corners = {"triangle": 3, "diamond": 4, "hexagon": 6}
    if shape in corners:
        count = corners[shape]
        start = -np.pi / 2
        return [
            (
                x + r * np.cos(start + 2 * np.pi * k / count),
                y + r * np.sin(start + 2 * np.pi * k / count),
            )
            for k in range(count)
        ]
    if shape == "star":
        return [
            (
                x + (r if k % 2 == 0 else r / 2.4) * np.cos(-np.pi / 2 + np.pi * k / 5),
                y + (r if k % 2 == 0 else r / 2.4) * np.sin(-np.pi / 2 + np.pi * k / 5),
            )
            for k in range(10)
        ]
    raise ValueError(f"no outline for {shape!r}")


def draw(colour: str, shape: str, background: str, place: str) -> Image.Image:
    """One shape on a plain background, as the caption says (``SIZE`` x ``SIZE``)."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    fx, fy = PLACES[place]
    x, y, r = fx * SIZE, fy * SIZE, SIZE_FRACTION * SIZE / 2
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        pen.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        pen.polygon(_outline(shape, x, y, r), fill=fill)
    return image


def rich_caption(colour: str, shape: str, background: str, place: str) -> str:
    """The caption style the generator was trained on."""
    return (
        f"A picture with a {background} background showing a large {colour} {shape} at the {place}."
    )


def write_corpus(directory: Path, *, seed: int = 0) -> Path:
    """``PER_COMBINATION`` train items of each colour and shape but :data:`MISSING`'s (192),
    backgrounds and places drawn with ``seed``; the directory."""
    from flywheel.adapters.datasets import write_records

    rng = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    scenes = [
        (colour, shape)
        for colour in COLOURS
        for shape in SHAPES
        if shape not in MISSING.get(colour, ())
        for _ in range(PER_COMBINATION)
    ]
    rng.shuffle(scenes)
    items = []
    for number, (colour, shape) in enumerate(scenes):
        background = rng.choice(sorted(BACKGROUNDS))
        place = rng.choice(sorted(PLACES))
        name = f"train-{number:03d}"
        draw(colour, shape, background, place).save(directory / "images" / f"{name}.png")
        items.append(
            CorpusItem(
                id=name,
                image=f"images/{name}.png",
                rich_caption=rich_caption(colour, shape, background, place),
                raw_caption=f"{colour} {shape}",
                tags=[f"colour:{colour}", f"shape:{shape}"],
                split="train",
                provenance={"source": "team-icons", "licence": "cc0"},
            )
        )
    write_records(directory, items)
    return directory


def app_image(root: Path, name: str, colour: str, shape: str) -> str:
    """An image the app generated and the user disliked, ``root/app-images/<name>.png``; its
    ``file://`` URI."""
    path = root / APP_IMAGES / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    draw(colour, shape, "white", "centre").save(path)
    return path.resolve().as_uri()


def write_suites(directory: Path) -> tuple[Path, Path]:
    """The standard and regression suites (JSONL); their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, plan in (("standard", STANDARD_SUITE), ("regression", REGRESSION_SUITE)):
        prompts = [
            SuitePrompt(
                id=f"{name[:3]}-{number:02d}",
                prompt=f"a {colour} {shape}",
                spec={"elements": [f"a {colour} {shape}"]},
                tags=[f"colour:{colour}", f"shape:{shape}", "skill:colour"],
                skill="colour",
            )
            for number, (colour, shape) in enumerate(plan, start=1)
        ]
        path = directory / f"{name}.jsonl"
        path.write_text(
            "".join(p.model_dump_json(exclude_defaults=True) + "\n" for p in prompts), "utf-8"
        )
        paths.append(path)
    return paths[0], paths[1]


# ---- the judge -------------------------------------------------------------------------------

_PALETTE = {name: np.array(rgb, dtype=np.float64) / 255 for name, rgb in COLOURS.items()}
_WORDS = {name: name for name in COLOURS} | {
    word: colour for colour, words in USER_WORDS.items() for word in words
}
_COLOUR_WORD = re.compile(r"\b(" + "|".join(sorted(_WORDS, key=len, reverse=True)) + r")\b", re.I)
FOREGROUND_DISTANCE = 0.2
"""A pixel this far (RGB in [0, 1]) from the background's colour belongs to the object."""
MIN_FOREGROUND = 6
"""Fewer object pixels than this: no object."""


def object_colour(pixels: NDArray[np.float64]) -> NDArray[np.float64] | None:
    """The colour of the object in ``pixels`` (H, W, 3 in [0, 1]): the median of its pixels
    farthest from the background (the median of a 3-pixel frame); None when there is none."""
    frame = np.concatenate(
        [
            pixels[:3].reshape(-1, 3),
            pixels[-3:].reshape(-1, 3),
            pixels[:, :3].reshape(-1, 3),
            pixels[:, -3:].reshape(-1, 3),
        ]
    )
    distance = np.linalg.norm(pixels - np.median(frame, axis=0), axis=-1)
    mask = distance > FOREGROUND_DISTANCE
    if int(mask.sum()) < MIN_FOREGROUND:
        return None
    core = mask & (distance >= np.median(distance[mask]))
    return cast("NDArray[np.float64]", np.median(pixels[core], axis=0))


def judge_element(pixels: NDArray[np.float64], element: str) -> dict[str, Any]:
    """An element naming a colour (its first colour word; a user's word counts as the colour
    it means) passes when the object's colour is nearest to it; score
    ``d_other / (d_named + d_other)``."""
    found = _COLOUR_WORD.search(element)
    if found is None:
        return {"element": element, "passed": False, "score": 0.0, "reason": "names no colour"}
    seen = object_colour(pixels)
    if seen is None:
        return {"element": element, "passed": False, "score": 0.0, "reason": "no object"}
    named = _WORDS[found.group(1).lower()]
    distances = {name: float(np.linalg.norm(seen - rgb)) for name, rgb in _PALETTE.items()}
    other = min(d for name, d in distances.items() if name != named)
    total = distances[named] + other
    score = 0.5 if total == 0 else other / total
    nearest = min(distances, key=lambda name: distances[name])
    return {
        "element": element,
        "passed": score > 0.5,
        "score": round(min(1.0, max(0.0, score)), 6),
        "reason": f"object nearest {nearest}",
    }


def judge_elements(pixels: NDArray[np.float64], elements: Sequence[str]) -> list[dict[str, Any]]:
    """Each element judged by :func:`judge_element` (the object's colour)."""
    return [judge_element(pixels, element) for element in elements]


class ColourJudge(JudgeServer):
    """The team stack's ``flywheel-judge/1`` service (:class:`tests.team_stack.JudgeServer`)
    judging the object's colour against the colour the prompt names."""

    def __init__(self) -> None:
        super().__init__(JUDGE_PATH, judge=judge_elements, model="object-colour")


# ---- the stack -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PromotionStack:
    project: Path

    @property
    def root(self) -> Path:
        return self.project.parent


def _copy_weights(name: str, target: Path) -> None:
    shutil.copytree(WEIGHTS / name, target)


def build_promotion_stack(root: Path, *, judge_url: str) -> PromotionStack:
    """Everything the team brings, under ``root``, and its ``flywheel.toml``."""
    root.mkdir(parents=True, exist_ok=True)
    _copy_weights("world-base", root / GENERATOR_DIR)
    _copy_weights("world-enhancer", root / ENHANCER_DIR)
    _copy_weights("world-reward", root / REWARD_DIR)
    write_corpus(root / CORPUS_DIR)
    write_suites(root / SUITES_DIR)
    (root / APP_IMAGES).mkdir(parents=True, exist_ok=True)
    synonyms = ", ".join(
        f"{colour} = [{', '.join(_toml(w) for w in (*USER_WORDS[colour], colour))}]"
        for colour in COLOURS
    )
    text = f"""\
# A team's trained stack (tests/promotion_stack.py): every part a non-world adapter.

[project]
name = "team-icons"

[images]
file_roots = [{_toml(APP_IMAGES)}]

[generator]
adapter = "flywheel"
path = {_toml(GENERATOR_DIR)}

[judge]
adapter = "http"
url = {_toml(judge_url)}
timeout_s = 30.0
retries = 1
backoff_s = 0.05
max_backoff_s = 0.2
batch_size = 8

[suites]
adapter = "jsonl"
standard = {_toml(SUITES_DIR + "/standard.jsonl")}
regression = {_toml(SUITES_DIR + "/regression.jsonl")}

[reward]
adapter = "open_clip"
path = {_toml(REWARD_DIR)}

[enhancer]
adapter = "causal_lm"
path = {_toml(ENHANCER_DIR)}
system_prompt = {_toml(ENHANCER_SYSTEM_PROMPT)}
max_input_tokens = 384
max_new_tokens = 128
batch_size = 8
dtype = "float32"

[corpus]
adapter = "directory"
path = {_toml(CORPUS_DIR)}
name = "team-icons"

# Each colour's own word is among its users' words: a pair keeps it now and then, so the
# enhancer also learns the captions' words (prompts it served well must stay so).
[degrader]
adapter = "rules"
keep_clauses = 1
max_words = 12
synonyms = {{ {synonyms} }}

[launcher]
adapter = "in_process"
"""
    project = root / PROJECT_FILE
    project.write_text(text, encoding="utf-8")
    return PromotionStack(project=project)


def colour_named(prompt: str) -> str | None:
    """The colour a prompt's first colour word means (a user's word included)."""
    found = _COLOUR_WORD.search(prompt)
    return None if found is None else _WORDS[found.group(1).lower()]


def wrong_colour(colour: str) -> str:
    """A colour unlike ``colour`` (what the app drew instead)."""
    return "orange" if colour != "orange" else "blue"


def shape_named(prompt: str, shapes: Sequence[str] = SHAPES) -> str:
    return next(shape for shape in shapes if shape in prompt.split())

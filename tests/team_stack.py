"""The team's stack of the acid test: a whole project of non-world adapters, built for real.

:func:`build_team_stack` writes, under one root, everything a team brings to flywheel and the
``flywheel.toml`` naming it — every table a non-world adapter:

======================  ==========================================================================
``[generator]``         ``diffusers``: a tiny seeded ``QwenImagePipeline`` (``save_pretrained``),
                        32x32 images in 2 steps
``[enhancer]``          ``causal_lm``: the tiny byte-level Qwen3 of :func:`build_pe_debug`
``[reward]``            ``open_clip``: tiny CLIP towers with seeded random weights, exported in
                        open_clip's local-directory layout
``[corpus]``            ``directory``: 60 train + 40 pool 32x32 PNGs of one coloured shape on a
                        textured background, rich and raw captions, ``colour:`` / ``shape:``
                        tags; purple is rare in train (2) and plentiful in the pool (15)
``[suites]``            ``jsonl``: a standard suite (12 prompts) and a regression suite (8), each
                        prompt's spec one colour element the judge checks
``[judge]``             ``http``: the :class:`JudgeServer` at the URL given
``[degrader]``          ``rules``: with synonyms (purple -> violet, red -> crimson)
``[launcher]``          ``command``: ``{python} trainer.py --manifest {manifest}``, the team's
                        trainer (:func:`trainer_main`), run in its own process
======================  ==========================================================================

:class:`JudgeServer` is a real ``flywheel-judge/1`` service on 127.0.0.1: an element naming a
colour passes when the image's dominant non-background colour is nearest to it. A test can
make it stall or go down (:meth:`JudgeServer.fail`) and heal it again.
:func:`app_image` draws an image an app would send with its feedback.

**The trainer** (:func:`trainer_main`) reads the round manifest (relative paths from the
manifest's directory) and trains for real, writing a line per step to stdout:

- ``pe_sft``: flywheel's own in-process runner (``RECIPE_RUNNERS["pe_sft"]``) on the manifest;
- ``continued_pretraining``: rectified-flow (flow-matching) steps on the base pipeline's
  transformer over ``artefacts["dataset"]`` (a :mod:`training.data` directory);
- ``diffusion_dpo``: Diffusion-DPO steps (Wallace et al. 2023) against a frozen copy of the
  base transformer over ``artefacts["preferences"]`` (JSONL of prompt, chosen, rejected);

then ``save_pretrained`` of the whole pipeline into ``output_dir`` and ``metrics.json``
(``loss_first``, ``loss_last``, ``steps``, and ``eval_loss_before`` / ``eval_loss_after``: the
loss of a fixed batch with fixed noise, comparable across the round). Steps come from
``budget[recipe]`` (or ``pretrain`` / ``dpo``, or the budget's only entry); ``settings`` keys
read: :class:`GeneratorRoundSettings` (others ignored). A preference's images are ``file://``
URIs, paths (relative to the JSONL's directory) or ``{"uri": ...}``. Generator rounds keep no
state in ``work_dir``: a relaunch starts over. A bad manifest exits 2 with a one-line error
(the launcher reports the log's last line), a failed round 1.

``trainer.py`` itself is three lines: it puts the repository on ``sys.path`` and calls
:func:`trainer_main`, so that the trainer is typed and linted here. Nothing it imports imports
``flywheel.world``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import math
import re
import shlex
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, cast
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError
from torch import Tensor

from flywheel.ports import CorpusItem, RoundManifest, SuitePrompt

REPO = Path(__file__).resolve().parents[1]
"""The repository root (the trainer script puts it on ``sys.path``)."""
SIZE = 32
"""Side of every image of the stack (corpus, app images, generated), pixels."""
STEPS = 2
"""Sampling steps of the generator."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 40),
    "orange": (240, 135, 25),
    "purple": (135, 45, 175),
}
"""The colours shapes come in (RGB)."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (232, 232, 232),
    "black": (28, 28, 28),
}
"""The backgrounds' base colours (textured when drawn)."""
SYNONYMS: dict[str, list[str]] = {"purple": ["violet"], "red": ["crimson"]}
"""The users' words for some colours (the degrader's synonyms; the judge reads them too)."""
SHAPES = ("square", "circle", "triangle")
RARE_COLOUR = "purple"
"""Rare in the train split, plentiful in the pool: the pretraining-gap track's concept."""
TRAIN_ITEMS = 60
POOL_ITEMS = 40
RARE_IN_TRAIN = 2
RARE_IN_POOL = 15
NEAR_DUPLICATE_BITS = 4
"""``[filters] near_duplicate_bits``; drawn images are kept further apart than this."""

GENERATOR_DIR = "models/generator"
ENHANCER_DIR = "models/enhancer"
REWARD_DIR = "models/reward"
CORPUS_DIR = "data/corpus"
SUITES_DIR = "suites"
APP_IMAGES = "app-images"
TRAINER = "trainer.py"
PROJECT_FILE = "flywheel.toml"
ENHANCER_SYSTEM_PROMPT = "Rewrite the image prompt as a rich, detailed caption."
"""The enhancer's system prompt (``training.pe_sft.DEBUG_SYSTEM_PROMPT``: short, cheap on a
CPU); a ``pe_sft`` round of this stack trains with it too."""
JUDGE_PATH = "/v1/judge"
PROTOCOL = "flywheel-judge/1"

STANDARD_SUITE = [
    ("red", "square"),
    ("green", "circle"),
    ("blue", "triangle"),
    ("yellow", "square"),
    ("orange", "circle"),
    ("purple", "square"),
    ("red", "circle"),
    ("green", "triangle"),
    ("blue", "square"),
    ("yellow", "circle"),
    ("purple", "circle"),
    ("orange", "triangle"),
]
REGRESSION_SUITE = [
    ("red", "triangle"),
    ("green", "square"),
    ("blue", "circle"),
    ("yellow", "triangle"),
    ("orange", "square"),
    ("purple", "triangle"),
    ("blue", "square"),
    ("red", "square"),
]


# ---- drawing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scene:
    """What one drawn image shows."""

    colour: str
    shape: str
    background: str
    size: str
    """``large`` or ``small``."""
    where: str
    """``top left``, ``centre``, ``bottom centre``, ..."""

    def rich_caption(self) -> str:
        return (
            f"A picture with a {self.background} background showing a {self.size} "
            f"{self.colour} {self.shape} at the {self.where}."
        )

    def raw_caption(self) -> str:
        return f"{self.colour} {self.shape}"

    def tags(self) -> list[str]:
        return [f"colour:{self.colour}", f"shape:{self.shape}"]


def _place(centre: float) -> int:
    return min(2, int(3 * centre / SIZE))


def _where(x: float, y: float) -> str:
    row = ("top", "middle", "bottom")[_place(y)]
    column = ("left", "centre", "right")[_place(x)]
    if row == "middle" and column == "centre":
        return "centre"
    return f"{row} {column}"


def draw_scene(
    rng: np.random.Generator, colour: str, shape: str, background: str
) -> tuple[Image.Image, Scene]:
    """A ``SIZE`` x ``SIZE`` RGB image of one ``colour`` ``shape`` at a random place and size on
    a textured ``background`` (a random gradient and pixel noise), and what it shows."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / (SIZE - 1) - 0.5
    slope = rng.uniform(-24, 24, size=2)
    base = np.array(BACKGROUNDS[background], dtype=np.float64)
    pixels = base + (slope[0] * xs + slope[1] * ys)[..., None] + rng.normal(0, 7, (SIZE, SIZE, 3))
    large = bool(rng.random() < 0.5)
    side = int(rng.integers(14, 19) if large else rng.integers(8, 12))
    margin = 2 + side / 2
    x, y = (float(v) for v in rng.uniform(margin, SIZE - margin, size=2))
    box = (x - side / 2, y - side / 2, x + side / 2, y + side / 2)
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "triangle":
        draw.polygon([(x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    inside = np.asarray(mask, dtype=np.float64)[..., None] / 255
    tint = np.array(COLOURS[colour], dtype=np.float64) + rng.integers(-14, 15, size=3)
    fill = tint + rng.normal(0, 5, (SIZE, SIZE, 3))
    pixels = inside * fill + (1 - inside) * pixels
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    scene = Scene(
        colour=colour,
        shape=shape,
        background=background,
        size="large" if large else "small",
        where=_where(x, y),
    )
    return image, scene


def _as_tensor(image: Image.Image) -> Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class _Drawer:
    """Draws scenes that are never near-duplicates (by the filter chain's difference hash) of
    one drawn before: a draw within a few bits of one is drawn again."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.hashes: list[int] = []

    def draw(self, colour: str, shape: str) -> tuple[Image.Image, Scene]:
        from flywheel.media.filters import difference_hash

        for _ in range(100):
            background = str(self.rng.choice(sorted(BACKGROUNDS)))
            image, scene = draw_scene(self.rng, colour, shape, background)
            digest = difference_hash(_as_tensor(image))
            if all((digest ^ h).bit_count() > NEAR_DUPLICATE_BITS + 2 for h in self.hashes):
                self.hashes.append(digest)
                return image, scene
        raise RuntimeError(f"could not draw a {colour} {shape} unlike the others")


def _colour_plan(count: int, rare: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (colour, shape) pairs, ``rare`` of them the rare colour, shuffled."""
    common = [c for c in COLOURS if c != RARE_COLOUR]
    plan = [(RARE_COLOUR, SHAPES[k % len(SHAPES)]) for k in range(rare)]
    plan += [
        (common[k % len(common)], SHAPES[(k // len(common)) % len(SHAPES)])
        for k in range(count - rare)
    ]
    order = np.random.default_rng(seed).permutation(len(plan))
    return [plan[int(k)] for k in order]


def write_corpus(directory: Path, *, seed: int = 0) -> Path:
    """The dataset directory of the stack (``records.jsonl`` and ``images/``); returns it."""
    from flywheel.adapters.datasets import write_records

    drawer = _Drawer(seed)
    items: list[CorpusItem] = []
    (directory / "images").mkdir(parents=True, exist_ok=True)
    splits = (("train", TRAIN_ITEMS, RARE_IN_TRAIN), ("pool", POOL_ITEMS, RARE_IN_POOL))
    for split, count, rare in splits:
        for number, (colour, shape) in enumerate(_colour_plan(count, rare, seed + len(split))):
            image, scene = drawer.draw(colour, shape)
            name = f"{split}-{number:03d}"
            image.save(directory / "images" / f"{name}.png")
            items.append(
                CorpusItem(
                    id=name,
                    image=f"images/{name}.png",
                    rich_caption=scene.rich_caption(),
                    raw_caption=scene.raw_caption(),
                    tags=scene.tags(),
                    split="train" if split == "train" else "pool",
                    provenance={"source": "team-shapes", "licence": "cc0"},
                )
            )
    write_records(directory, items)
    return directory


def app_image(root: Path, name: str, colour: str) -> str:
    """Draw a ``colour`` shape (a synonym such as ``violet`` counts) as an app's image
    ``root/app-images/<name>.png``; returns its ``file://`` URI."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"image name {name!r}: letters, digits, '.', '_' and '-' only")
    canonical = _canonical_colour(colour)
    if canonical not in COLOURS:
        raise ValueError(f"unknown colour {colour!r} (known: {', '.join(COLOURS)})")
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    image, _ = draw_scene(rng, canonical, shape, "grey")
    path = root / APP_IMAGES / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path.resolve().as_uri()


# ---- the judge -------------------------------------------------------------------------------

PALETTE: dict[str, NDArray[np.float64]] = {
    name: np.array(rgb, dtype=np.float64) / 255 for name, rgb in (COLOURS | BACKGROUNDS).items()
}
"""Every colour the judge tells apart, in [0, 1]."""
_WORDS = {name: name for name in PALETTE} | {
    word: name for name, words in SYNONYMS.items() for word in words
}
_COLOUR_WORD = re.compile(
    r"\b(" + "|".join(sorted(_WORDS, key=len, reverse=True)) + r")\b", re.IGNORECASE
)
FOREGROUND_DISTANCE = 0.25
"""A pixel this far (RGB in [0, 1]) from the background's colour belongs to a shape."""


def _canonical_colour(word: str) -> str | None:
    return _WORDS.get(word.lower())


def dominant_colour(pixels: NDArray[np.float64]) -> NDArray[np.float64] | None:
    """The median colour of the pixels of ``pixels`` (H, W, 3, in [0, 1]) unlike the
    background (the median of a 2-pixel frame); None when under 2 % of them are."""
    frame = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    background = np.median(frame, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    foreground = pixels[distance > FOREGROUND_DISTANCE]
    if len(foreground) < 0.02 * distance.size:
        return None
    return cast("NDArray[np.float64]", np.median(foreground, axis=0))


def judge_elements(pixels: NDArray[np.float64], elements: Sequence[str]) -> list[dict[str, Any]]:
    """The verdict of each element on an image (H, W, 3, in [0, 1]).

    An element naming a colour (its first colour word; ``violet`` is purple) scores
    ``d_other / (d_named + d_other)`` — the dominant colour's distance to the nearest other
    colour of :data:`PALETTE` against its distance to the named one — and passes above 0.5,
    that is when the named colour is the nearest. An element naming no colour, or an image
    with no shape on its background, fails with score 0."""
    dominant = dominant_colour(pixels)
    verdicts: list[dict[str, Any]] = []
    for element in elements:
        found = _COLOUR_WORD.search(element)
        if found is None:
            verdicts.append(
                {"element": element, "passed": False, "score": 0.0, "reason": "names no colour"}
            )
            continue
        if dominant is None:
            verdicts.append(
                {"element": element, "passed": False, "score": 0.0, "reason": "no shape found"}
            )
            continue
        named = _WORDS[found.group(1).lower()]
        distances = {n: float(np.linalg.norm(dominant - rgb)) for n, rgb in PALETTE.items()}
        other = min(d for n, d in distances.items() if n != named)
        total = distances[named] + other
        score = 0.5 if total == 0 else other / total
        nearest = min(distances, key=lambda n: distances[n])
        hex_colour = "#" + "".join(f"{round(float(v) * 255):02x}" for v in dominant)
        verdicts.append(
            {
                "element": element,
                "passed": score > 0.5,
                "score": round(min(1.0, max(0.0, score)), 6),
                "reason": f"dominant colour {hex_colour}, nearest {nearest}",
            }
        )
    return verdicts


ElementJudge = Callable[[NDArray[np.float64], Sequence[str]], list[dict[str, Any]]]
"""Per-element verdicts (``passed``, ``score``, ``reason``) of an RGB image in [0, 1]."""


def _judge_item(item: object, judge: ElementJudge) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError("an item is not an object")
    item_id, prompt, png = item.get("id"), item.get("prompt"), item.get("image_png")
    if not isinstance(item_id, str) or not isinstance(prompt, str) or not isinstance(png, str):
        raise ValueError("an item needs string id, prompt and image_png")
    spec = item.get("spec")
    elements = spec.get("elements") if isinstance(spec, dict) else None
    if elements is None:
        elements = [prompt]
    if not isinstance(elements, list) or not all(isinstance(e, str) and e for e in elements):
        raise ValueError(f"item {item_id}: spec.elements must be a list of strings")
    try:
        with Image.open(io.BytesIO(base64.b64decode(png, validate=True))) as decoded:
            pixels = np.asarray(decoded.convert("RGB"), dtype=np.float64) / 255
    except (binascii.Error, OSError, ValueError) as exc:
        raise ValueError(f"item {item_id}: image_png is not a PNG ({exc})") from None
    return {"id": item_id, "elements": judge(pixels, elements)}


@dataclass(kw_only=True, slots=True)
class JudgeFault:
    """How a :class:`JudgeServer` misbehaves (:meth:`JudgeServer.fail`)."""

    mode: Literal["stall", "down"]
    """``stall``: the request gets no answer until the fault is healed (or ``stall_s``
    passed), so a client's timeout expires; ``down``: it is answered 503 at once."""
    matching: str = ""
    """Only requests with an item whose prompt contains this are hit ("" : every request)."""
    after: int = 0
    """Matching requests answered well before the fault starts."""
    stall_s: float = 60.0
    """Longest a stalled request is held."""
    seen: int = 0
    """Matching requests so far."""
    hit: int = 0
    """Requests the fault answered (or held)."""


class _JudgeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, path: str, judge: ElementJudge, model: str) -> None:
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.path = path
        self.judge = judge
        self.model = model
        self.lock = threading.Lock()
        self.requests = 0
        self.items = 0
        self.errors: list[str] = []
        self.fault: JudgeFault | None = None
        self.healed = threading.Event()
        self.healed.set()

    def faulted(self, body: object) -> JudgeFault | None:
        """The fault that hits a request of ``body`` (counted), or None."""
        with self.lock:
            fault = self.fault
            if fault is None:
                return None
            items = body.get("items") if isinstance(body, dict) else None
            prompts = [
                str(item.get("prompt", "")) for item in items or [] if isinstance(item, dict)
            ]
            if not any(fault.matching in prompt for prompt in prompts):
                return None
            fault.seen += 1
            if fault.seen <= fault.after:
                return None
            fault.hit += 1
            return fault

    def handle_error(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.errors.append(traceback.format_exc())


class _JudgeHandler(BaseHTTPRequestHandler):
    server: _JudgeHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: :class:`JudgeServer` counts what came."""

    def _json(self, status: int, data: object) -> None:
        body = json.dumps(data).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up
            pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        with self.server.lock:
            self.server.requests += 1
        if self.path != self.server.path:
            self._json(404, {"error": f"no {self.path}"})
            return
        try:
            body = json.loads(raw)
            fault = self.server.faulted(body)
            if fault is not None:
                if fault.mode == "stall":
                    self.server.healed.wait(fault.stall_s)
                state = "stalled" if fault.mode == "stall" else "down"
                self._json(503, {"error": f"the judge is {state} (a test's fault)"})
                return
            if not isinstance(body, dict) or body.get("protocol") != PROTOCOL:
                raise ValueError(f"not a {PROTOCOL} request")
            items = body.get("items")
            if not isinstance(items, list) or not items:
                raise ValueError("items must be a non-empty list")
            verdicts = [_judge_item(item, self.server.judge) for item in items]
        except ValueError as exc:  # JSONDecodeError included
            self._json(400, {"error": " ".join(str(exc).split())})
            return
        with self.server.lock:
            self.server.items += len(verdicts)
        self._json(200, {"protocol": PROTOCOL, "verdicts": verdicts, "model": self.server.model})


class JudgeServer:
    """A ``flywheel-judge/1`` service on 127.0.0.1 (an ephemeral port), in a thread, for the
    ``with`` block: ``url`` is where to POST; ``requests`` and ``items`` count what came;
    :meth:`fail` makes it stall or go down (for some prompts, after some requests) until
    :meth:`heal`. ``judge`` gives each image's per-element verdicts (default: the dominant
    colour, :func:`judge_elements`); ``model`` is the name the answers carry."""

    def __init__(
        self,
        path: str = JUDGE_PATH,
        *,
        judge: ElementJudge = judge_elements,
        model: str = "dominant-colour",
    ) -> None:
        self._server = _JudgeHTTPServer(path, judge, model)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}{path}"

    @property
    def requests(self) -> int:
        """POSTs received (bad ones included)."""
        with self._server.lock:
            return self._server.requests

    @property
    def items(self) -> int:
        """Images judged."""
        with self._server.lock:
            return self._server.items

    def fail(
        self,
        mode: Literal["stall", "down"],
        *,
        matching: str = "",
        after: int = 0,
        stall_s: float = 60.0,
    ) -> JudgeFault:
        """Misbehave from now on (see :class:`JudgeFault`) until :meth:`heal`; the fault, whose
        ``hit`` counts the requests it answered."""
        fault = JudgeFault(mode=mode, matching=matching, after=after, stall_s=stall_s)
        with self._server.lock:
            self._server.fault = fault
            if mode == "stall":
                self._server.healed.clear()
        return fault

    def heal(self) -> None:
        """Judge well again; stalled requests are let go (answered 503: their clients have
        given up)."""
        with self._server.lock:
            self._server.fault = None
            self._server.healed.set()

    @property
    def errors(self) -> list[str]:
        """Tracebacks of the service's own failures (a bug of the test when not empty)."""
        with self._server.lock:
            return list(self._server.errors)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.heal()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# ---- the stack -------------------------------------------------------------------------------


def _suite(name: str, plan: Sequence[tuple[str, str]]) -> list[SuitePrompt]:
    return [
        SuitePrompt(
            id=f"{name}-{number:02d}",
            prompt=f"a {colour} {shape} on a grey background",
            spec={"elements": [f"a {colour} {shape}"]},
            tags=[f"colour:{colour}", f"shape:{shape}", "skill:colour"],
            skill="colour",
        )
        for number, (colour, shape) in enumerate(plan, start=1)
    ]


def write_suites(directory: Path) -> tuple[Path, Path]:
    """The standard and regression suites (JSONL); their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    suites = (("standard", "std", STANDARD_SUITE), ("regression", "reg", REGRESSION_SUITE))
    for name, prefix, plan in suites:
        path = directory / f"{name}.jsonl"
        lines = [p.model_dump_json(exclude_defaults=True) + "\n" for p in _suite(prefix, plan)]
        path.write_text("".join(lines), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def write_reward(directory: Path, *, seed: int = 0) -> Path:
    """Tiny open_clip towers (:func:`model.reward.debug_towers`) with seeded random weights,
    in open_clip's local-directory layout (``open_clip_config.json`` +
    ``open_clip_model.safetensors``, as :mod:`training.alignment` exports a trained one)."""
    from safetensors.torch import save_file

    from model.reward import AlignmentRewardConfig, build_alignment_reward, debug_towers
    from training.alignment import CONFIG_FILE, WEIGHTS_FILE

    towers = debug_towers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reward = build_alignment_reward(AlignmentRewardConfig(architecture=towers))
    weights = {k: v.detach().contiguous() for k, v in reward.clip.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(directory / WEIGHTS_FILE))
    config = {"model_cfg": towers.open_clip_model_cfg(), "preprocess_cfg": {}}
    (directory / CONFIG_FILE).write_text(json.dumps(config) + "\n", encoding="utf-8")
    return directory


TRAINER_SCRIPT = '''\
"""The team's trainer: one flywheel training round, from its manifest, in this process.

Usage: python trainer.py --manifest ROUND.json (see tests/team_stack.py, trainer_main)."""

import sys

sys.path.insert(0, {repo!r})

from tests.team_stack import trainer_main  # noqa: E402

sys.exit(trainer_main(sys.argv[1:]))
'''


def _toml(value: str) -> str:
    """``value`` as a TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(value)


def build_team_stack(root: Path, *, judge_url: str) -> Path:
    """Write the team's stack under ``root`` (models, data, suites, trainer, the app images'
    folder) and its project file; returns the project file's path."""
    from model.prompt_enhancer import build_pe_debug
    from model.torchvision_compat import import_torchvision
    from tests.adapters.test_diffusers_generator import _qwen_image

    root.mkdir(parents=True, exist_ok=True)
    import_torchvision()
    _qwen_image(root / GENERATOR_DIR)
    build_pe_debug(root / ENHANCER_DIR)
    write_reward(root / REWARD_DIR)
    write_corpus(root / CORPUS_DIR)
    write_suites(root / SUITES_DIR)
    (root / APP_IMAGES).mkdir(parents=True, exist_ok=True)
    trainer = root / TRAINER
    trainer.write_text(TRAINER_SCRIPT.format(repo=str(REPO)), encoding="utf-8")
    command = f"{{python}} {shlex.quote(str(trainer.resolve()))} --manifest {{manifest}}"
    synonyms = ", ".join(
        f"{word} = [{', '.join(_toml(s) for s in users)}]" for word, users in SYNONYMS.items()
    )
    text = f"""\
# The team's stack of the acid test (tests/team_stack.py): every part a non-world adapter.

[project]
name = "team-shapes"

[images]
file_roots = [{_toml(APP_IMAGES)}]

[filters]
min_side = 16
near_duplicate_bits = {NEAR_DUPLICATE_BITS}
min_entropy_bits = 1.0
min_caption_tokens = 3
max_caption_tokens = 64

[generator]
adapter = "diffusers"
path = {_toml(GENERATOR_DIR)}
height = {SIZE}
width = {SIZE}
num_inference_steps = {STEPS}
dtype = "float32"
batch_size = 4

[judge]
adapter = "http"
url = {_toml(judge_url)}
timeout_s = 5.0
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
max_input_tokens = 512
max_new_tokens = 32
batch_size = 8
dtype = "float32"

[corpus]
adapter = "directory"
path = {_toml(CORPUS_DIR)}
name = "team-shapes"

[degrader]
adapter = "rules"
keep_clauses = 1
max_words = 12
synonyms = {{ {synonyms} }}

[launcher]
adapter = "command"
command = {_toml(command)}
timeout_s = 900
kill_grace_s = 5
"""
    project = root / PROJECT_FILE
    project.write_text(text, encoding="utf-8")
    return project


# ---- the team's trainer ----------------------------------------------------------------------


class ManifestError(ValueError):
    """A round manifest the trainer cannot run (said in one line)."""


class GeneratorRoundSettings(BaseModel):
    """The ``settings`` of a generator round this trainer reads (other keys are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    lr: float = Field(default=1e-3, gt=0)
    """AdamW learning rate of the transformer (high: the stack's pipeline is tiny)."""
    batch_size: int = Field(default=8, ge=1)
    """Samples (pairs, for DPO) per step, drawn without replacement per step."""
    seed: int = 0
    resolution: int = Field(default=SIZE, ge=8)
    """Side the images are resized to (a multiple of the VAE's factor times 2)."""
    max_sequence_length: int = Field(default=256, ge=8, le=1024)
    """Most text tokens of a caption."""
    beta: float = Field(default=500.0, gt=0)
    """Diffusion-DPO's KL weight."""


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _resolve(value: str, base: Path) -> str:
    if "://" in value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def read_round(path: Path) -> RoundManifest:
    """The manifest at ``path``, relative paths resolved against its directory;
    :class:`ManifestError` when it cannot be read or is not one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        manifest = RoundManifest.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}" for e in exc.errors()
        )
        raise ManifestError(f"{path}: not a round manifest ({problems})") from None
    base = path.absolute().parent
    return manifest.model_copy(
        update={
            "base_checkpoint": _resolve(manifest.base_checkpoint, base),
            "artefacts": {k: _resolve(v, base) for k, v in manifest.artefacts.items()},
            "output_dir": _resolve(manifest.output_dir, base),
            "work_dir": _resolve(manifest.work_dir, base),
        }
    )


def _say(line: str) -> None:
    print(line, flush=True)


def _steps(manifest: RoundManifest, *names: str) -> int:
    for name in names:
        if name in manifest.budget:
            steps = manifest.budget[name]
            break
    else:
        if len(manifest.budget) != 1:
            raise ManifestError(f"budget names no steps for {' or '.join(names)}")
        (steps,) = manifest.budget.values()
    if steps < 1:
        raise ManifestError(f"budget: {steps} steps for {manifest.recipe}; at least 1")
    return steps


def _artefact(manifest: RoundManifest, name: str) -> Path:
    value = manifest.artefacts.get(name)
    if value is None:
        raise ManifestError(f"a {manifest.recipe} round needs artefacts[{name!r}]")
    if "://" in value:
        raise ManifestError(f"artefacts[{name!r}] = {value!r}: a local path, please")
    path = Path(value)
    if not path.exists():
        raise ManifestError(f"artefacts[{name!r}]: {path} does not exist")
    return path


def _write_metrics(output_dir: Path, metrics: dict[str, JsonValue]) -> None:
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", "utf-8")


# ---- pe_sft: flywheel's own runner -----------------------------------------------------------


def _follow(path: Path, total: int, stop: threading.Event) -> None:
    """Print a line per step as the training loop appends it to ``path``."""
    offset = 0
    while True:
        finished = stop.is_set()
        if path.is_file():
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(complete)
            for line in complete.decode().splitlines():
                record = json.loads(line)
                _say(f"pe_sft step {record['step']}/{total} loss {float(record['loss']):.5f}")
        if finished:
            return
        stop.wait(0.1)


PE_SFT_DEFAULTS: dict[str, JsonValue] = {
    "lr": 3e-3,
    "batch_size": 4,
    "max_length": 384,
    "system_prompt": ENHANCER_SYSTEM_PROMPT,
}
"""The team's settings for its tiny enhancer where a ``pe_sft`` manifest gives none (the
runner's own defaults suit a large model: a learning rate of 1e-5, flywheel's long system
prompt, which the stack's enhancer is not served with)."""


def _train_pe_sft(manifest: RoundManifest) -> dict[str, JsonValue]:
    """The ``pe_sft`` recipe with flywheel's in-process runner (over :data:`PE_SFT_DEFAULTS`);
    its metrics."""
    from flywheel.adapters.launchers import RECIPE_RUNNERS, PESFTRoundSettings
    from training.loop import METRICS_FILE

    _artefact(manifest, "pairs")
    settings = PE_SFT_DEFAULTS | manifest.settings
    try:
        PESFTRoundSettings.model_validate(settings)
    except ValidationError as exc:
        raise ManifestError(f"settings: {_one_line(str(exc))}") from None
    manifest = manifest.model_copy(update={"settings": settings})
    total = _steps(manifest, "pe_sft")
    stop = threading.Event()
    follower = threading.Thread(
        target=_follow, args=(Path(manifest.work_dir) / "pe_sft" / METRICS_FILE, total, stop)
    )
    follower.start()
    try:
        metrics = RECIPE_RUNNERS["pe_sft"](manifest)
    finally:
        stop.set()
        follower.join()
    return metrics


# ---- generator recipes: flow matching, Diffusion-DPO -----------------------------------------


def _load_rgb(path: Path, size: int) -> Tensor:
    """An image file as (3, size, size) in [-1, 1]."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return _as_tensor(image) * 2 - 1


class _Unreadable(Exception):
    """An image this trainer does not read (a pair with one is skipped)."""


def _image_path(value: object, base: Path) -> Path:
    """A preference's image: a ``file://`` URI, a path (relative to ``base``) or
    ``{"uri": ...}``; :class:`_Unreadable` for other URIs (the team's images are on disk)."""
    if isinstance(value, dict):
        value = value.get("uri")
    if not isinstance(value, str) or not value:
        raise ManifestError(f"preferences: {value!r} is not an image URI")
    parsed = urlparse(value)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme:
        raise _Unreadable(f"{value}: only file:// URIs and paths are read")
    path = Path(value)
    return path if path.is_absolute() else base / path


class _Pipeline:
    """The base pipeline's parts a training step needs; the transformer is trained."""

    def __init__(self, directory: Path, device: torch.device, settings: GeneratorRoundSettings):
        from model.torchvision_compat import import_torchvision

        import_torchvision()  # before diffusers: see model.torchvision_compat
        from diffusers import DiffusionPipeline

        try:
            pipeline = DiffusionPipeline.from_pretrained(
                str(directory), local_files_only=True, dtype=torch.float32
            )
        except (OSError, ValueError) as exc:
            raise ManifestError(f"base_checkpoint {directory}: does not load ({exc})") from None
        for part in ("transformer", "vae", "encode_prompt", "_pack_latents"):
            if not hasattr(pipeline, part):
                name = type(pipeline).__name__
                raise ManifestError(f"base_checkpoint {directory}: a {name} has no {part}")
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.device = device
        self.settings = settings
        factor = 2 * int(pipeline.vae_scale_factor)
        if settings.resolution % factor:
            raise ManifestError(
                f"settings.resolution {settings.resolution}: not a multiple of {factor}"
            )
        self.transformer: torch.nn.Module = pipeline.transformer
        for frozen in ("vae", "text_encoder"):
            if getattr(pipeline, frozen, None) is not None:
                getattr(pipeline, frozen).requires_grad_(False)
        config = pipeline.vae.config
        self.mean = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def latents(self, images: Tensor) -> tuple[Tensor, list[list[tuple[int, int, int]]]]:
        """Images (B, 3, H, W) in [-1, 1] -> packed normalised latents (B, tokens, channels)
        and the transformer's ``img_shapes``."""
        encoded = self.pipeline.vae.encode(images.to(self.device).unsqueeze(2)).latent_dist.mode()
        latents = ((encoded - self.mean) / self.std)[:, :, 0]  # (B, C, h, w)
        batch, channels, height, width = latents.shape
        packed = self.pipeline._pack_latents(latents, batch, channels, height, width)
        return packed, [[(1, height // 2, width // 2)]] * batch

    @torch.no_grad()
    def text(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        embeds, mask = self.pipeline.encode_prompt(
            prompts, device=self.device, max_sequence_length=self.settings.max_sequence_length
        )
        return embeds, mask

    def velocity(
        self,
        transformer: torch.nn.Module,
        noisy: Tensor,
        sigma: Tensor,
        text: tuple[Tensor, Tensor | None],
        shapes: list[list[tuple[int, int, int]]],
    ) -> Tensor:
        out = transformer(
            hidden_states=noisy,
            timestep=sigma,  # the pipeline passes t / 1000 = sigma
            encoder_hidden_states=text[0],
            encoder_hidden_states_mask=text[1],
            img_shapes=shapes,
            return_dict=False,
        )
        return cast(Tensor, out[0])


def _noise(latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Rectified flow's noise and logit-normal sigma (one per sample) for ``latents``."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    sigma = torch.sigmoid(torch.randn(latents.shape[0], generator=generator)).to(latents.device)
    return noise, sigma


def _per_sample_error(prediction: Tensor, target: Tensor) -> Tensor:
    return (prediction - target).pow(2).flatten(1).mean(dim=1)


def _flow_matching_loss(
    model: _Pipeline, images: Tensor, prompts: list[str], generator: torch.Generator
) -> Tensor:
    """Rectified flow: x_t = sigma * noise + (1 - sigma) * x_0, the transformer predicts the
    velocity noise - x_0 (the scheduler's convention), mean squared error."""
    latents, shapes = model.latents(images)
    noise, sigma = _noise(latents, generator)
    noisy = sigma.view(-1, 1, 1) * noise + (1 - sigma.view(-1, 1, 1)) * latents
    prediction = model.velocity(model.transformer, noisy, sigma, model.text(prompts), shapes)
    return _per_sample_error(prediction, noise - latents).mean()


def _dpo_loss(
    model: _Pipeline,
    reference: torch.nn.Module,
    chosen: Tensor,
    rejected: Tensor,
    prompts: list[str],
    generator: torch.Generator,
) -> Tensor:
    """Diffusion-DPO (Wallace et al. 2023) in the rectified-flow parametrisation: the chosen
    and the rejected image of a pair get the same noise and sigma;
    loss = -log sigmoid(-beta / 2 * ((e_w - e_l) - (e_w_ref - e_l_ref))), e the velocity
    errors of the model and of the frozen base (the reference)."""
    latents_w, shapes = model.latents(chosen)
    latents_l, _ = model.latents(rejected)
    noise, sigma = _noise(latents_w, generator)
    text = model.text(prompts)
    both = torch.cat([latents_w, latents_l])
    noise2, sigma2 = torch.cat([noise, noise]), torch.cat([sigma, sigma])
    noisy = sigma2.view(-1, 1, 1) * noise2 + (1 - sigma2.view(-1, 1, 1)) * both
    text2 = (
        torch.cat([text[0], text[0]]),
        None if text[1] is None else torch.cat([text[1], text[1]]),
    )
    target = noise2 - both
    errors = _per_sample_error(
        model.velocity(model.transformer, noisy, sigma2, text2, shapes * 2), target
    )
    with torch.no_grad():
        reference_errors = _per_sample_error(
            model.velocity(reference, noisy, sigma2, text2, shapes * 2), target
        )
    count = len(prompts)
    margin = (errors[:count] - errors[count:]) - (
        reference_errors[:count] - reference_errors[count:]
    )
    return -torch.nn.functional.logsigmoid(-0.5 * model.settings.beta * margin).mean()


def _train_generator(manifest: RoundManifest) -> dict[str, JsonValue]:
    """``continued_pretraining`` (flow matching on a dataset) or ``diffusion_dpo`` (on
    preference pairs): steps on the base pipeline's transformer, the whole pipeline saved."""
    started = time.monotonic()
    try:
        settings = GeneratorRoundSettings.model_validate(manifest.settings)
    except ValidationError as exc:
        raise ManifestError(f"settings: {_one_line(str(exc))}") from None
    if manifest.recipe == "continued_pretraining":
        steps = _steps(manifest, "continued_pretraining", "pretrain")
        data = _dataset(_artefact(manifest, "dataset"), settings.resolution)
    else:
        steps = _steps(manifest, "diffusion_dpo", "dpo")
        data = _preferences(_artefact(manifest, "preferences"), settings.resolution)
    base = Path(manifest.base_checkpoint)
    if not (base / "model_index.json").is_file():
        raise ManifestError(f"base_checkpoint {base}: not a diffusers pipeline directory")
    device = torch.device(manifest.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        _say(f"{manifest.device} is not available here: training on the cpu")
        device = torch.device("cpu")
    model = _Pipeline(base, device, settings)
    reference = copy.deepcopy(model.transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.transformer.parameters(), lr=settings.lr, weight_decay=0.0)
    count = len(data.prompts)
    batch = min(settings.batch_size, count)

    def loss_of(picks: Tensor, generator: torch.Generator) -> Tensor:
        prompts = [data.prompts[int(i)] for i in picks]
        if data.rejected is None:
            return _flow_matching_loss(model, data.images[picks], prompts, generator)
        rejected = data.rejected[picks]
        return _dpo_loss(model, reference, data.images[picks], rejected, prompts, generator)

    def evaluation() -> float:
        """The loss on a fixed batch with fixed noise: comparable before and after."""
        model.transformer.eval()
        with torch.no_grad():
            generator = torch.Generator().manual_seed(settings.seed + 10_000)
            value = float(loss_of(torch.arange(batch), generator))
        model.transformer.train()
        return value

    objective = "flow_matching" if data.rejected is None else "diffusion_dpo"
    _say(f"{manifest.recipe}: {objective} on {count} sample(s), {steps} step(s) of {batch}")
    eval_before = evaluation()  # leaves the transformer in training mode
    generator = torch.Generator().manual_seed(settings.seed)
    losses: list[float] = []
    for step in range(1, steps + 1):
        picks = torch.randperm(count, generator=generator)[:batch]
        loss = loss_of(picks, generator)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"step {step}: the loss is {value}")
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.transformer.parameters(), 1.0)
        optimizer.step()
        losses.append(value)
        _say(f"{manifest.recipe} step {step}/{steps} loss {losses[-1]:.5f}")
    eval_after = evaluation()
    model.transformer.eval()
    output = Path(manifest.output_dir)
    model.pipeline.save_pretrained(str(output))
    _say(f"{manifest.recipe}: eval loss {eval_before:.5f} -> {eval_after:.5f}; saved {output}")
    return {
        "recipe": manifest.recipe,
        "objective": objective,
        "steps": steps,
        "samples": count,
        "skipped": data.skipped,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "seconds": round(time.monotonic() - started, 2),
    }


@dataclass(frozen=True, slots=True)
class _Data:
    """What a generator round trains on."""

    prompts: list[str]
    images: Tensor
    """(N, 3, H, W) in [-1, 1]: the dataset's images, or the preferred image of each pair."""
    rejected: Tensor | None = None
    """Diffusion-DPO: the rejected image of each pair."""
    skipped: int = 0
    """Preference pairs left out (an image not on disk or not an image)."""


def _dataset(directory: Path, size: int) -> _Data:
    """The captioned text-to-image samples of a :mod:`training.data` directory."""
    from training.data import DatasetError, read_dataset

    try:
        samples = [s for s in read_dataset(directory) if not s.is_editing and s.caption]
    except DatasetError as exc:
        raise ManifestError(f"artefacts['dataset']: {exc}") from None
    if not samples:
        raise ManifestError(f"artefacts['dataset']: {directory} has no captioned image")
    images = torch.stack([_load_rgb(directory / s.image, size) for s in samples])
    return _Data(prompts=[s.caption for s in samples], images=images)


def _preferences(path: Path, size: int) -> _Data:
    """The pairs of a preferences JSONL (``{"prompt", "chosen", "rejected"}`` a line)."""
    prompts: list[str] = []
    chosen: list[Tensor] = []
    rejected: list[Tensor] = []
    skipped = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where}: not JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ManifestError(f"{where}: needs prompt, chosen and rejected")
        try:
            good = _load_rgb(_image_path(record.get("chosen"), path.parent), size)
            bad = _load_rgb(_image_path(record.get("rejected"), path.parent), size)
        except (_Unreadable, OSError) as exc:
            skipped += 1
            _say(f"{where}: pair skipped ({_one_line(str(exc))})")
            continue
        prompts.append(record["prompt"])
        chosen.append(good)
        rejected.append(bad)
    if not prompts:
        raise ManifestError(f"{path}: no preference pair with readable images ({skipped} skipped)")
    return _Data(
        prompts=prompts,
        images=torch.stack(chosen),
        rejected=torch.stack(rejected),
        skipped=skipped,
    )


RECIPES: dict[str, Callable[[RoundManifest], dict[str, JsonValue]]] = {
    "pe_sft": _train_pe_sft,
    "continued_pretraining": _train_generator,
    "diffusion_dpo": _train_generator,
}
"""What this trainer runs (``flow_grpo`` is not among them)."""


def trainer_main(argv: Sequence[str] | None = None) -> int:
    """``trainer.py --manifest ROUND.json``: run the round; 0 when done, 2 (with one line on
    stderr) when the manifest cannot be run, 1 when training failed."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--manifest":
        print("trainer: usage: trainer.py --manifest ROUND.json", file=sys.stderr, flush=True)
        return 2
    path = Path(args[1])
    try:
        manifest = read_round(path)
        run = RECIPES.get(manifest.recipe)
        if run is None:
            known = ", ".join(sorted(RECIPES))
            raise ManifestError(f"recipe {manifest.recipe!r} is not trained here (known: {known})")
        _say(f"round {manifest.round_id} ({manifest.recipe}) from {manifest.base_checkpoint}")
        metrics = run(manifest)
        _write_metrics(Path(manifest.output_dir), metrics)
    except ManifestError as exc:
        print(f"trainer: error: {_one_line(str(exc))}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:
        traceback.print_exc()
        print(
            f"trainer: failed: {type(exc).__name__}: {_one_line(str(exc))}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    _say(f"round {manifest.round_id} done: {json.dumps(metrics)}")
    return 0

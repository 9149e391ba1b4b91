"""World configurations as files: what a world makes rare, how its users talk, what its reward
model cannot see.

A world file (TOML) is one :class:`WorldDefinition`; ``flywheel world base --world FILE``
builds a base generator, reward model and prompt enhancer from it
(:func:`flywheel.world.base_model.world_base_config`), and the build records the world it was
made from (``world.toml`` in the build directory and in its generator directory), so that
whatever runs on a base reads its world back with :func:`world_of`. Two worlds ship in
``flywheel/world/worlds/``: ``default.toml`` (the shipped base's world) and ``other.toml``
(other rare concepts, other users' words, another reward bias).

:func:`load_world` turns a TOML syntax error or a validation error into one
:class:`WorldFileError` naming the file and the field (``other.toml: rare.colours.pink: not a
colour of the world (red, green, ...)``); :func:`dump_world` writes a world back as TOML
(``load(dump(w)) == w``). Object sizes are not part of a world: the renderer, the scene
placement and the trained ground-truth evaluator share one set
(:data:`flywheel.world.scenes.SIZES`).
"""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from flywheel.world.corpus import CaptionKind
from flywheel.world.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES, SceneConfig
from flywheel.world.vocabulary import Vocabulary
from training.io import atomic_write_text

WORLDS_DIR = Path(__file__).with_name("worlds")
"""Where the shipped world files are."""
DEFAULT_WORLD_FILE = WORLDS_DIR / "default.toml"
"""The shipped base's world: purple rare, the default users' words, a terse-caption reward."""
OTHER_WORLD_FILE = WORLDS_DIR / "other.toml"
"""Another world: other rare concepts, other users' words, another reward bias."""
WORLD_FILE = "world.toml"
"""The world a build was made from, in its build directory and its generator directory."""

RecipeName = Literal["world-base", "world-base-debug"]
"""The recipes a world can be built with (:data:`flywheel.world.base_model.RECIPES`)."""

CAPTION_BLIND_SPOTS: dict[CaptionKind, tuple[str, ...]] = {
    "rich": (),
    "raw": ("relation", "size"),
    "terse": ("count", "relation", "size"),
}
"""What a reward model trained on each caption kind cannot see: rich captions say every
object's size, colour, shape, count and place and the relations; raw ones the kinds and their
counts ("two red circles and a blue square"); terse ones the kinds only ("red circle, blue
square")."""

CAPTION_WORDS = frozenset((*COLOURS, *BACKGROUNDS, *SHAPES, *SIZES))
"""The colour, background, shape and size words of the captions: no users' word may be one."""

USER_WORD = re.compile(r"[a-z]{2,24}")
"""A users' word: one lower-case word of Latin letters."""


class WorldFileError(ValueError):
    """A world file that cannot be read: its message is one line naming the file and the
    field."""


class FieldProblem(ValueError):
    """A cross-field check's failure, naming the field (a dotted path below the model that
    raised it) it is about."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _known_colour(name: str) -> str:
    if name not in COLOURS:
        raise ValueError(f"not a colour of the world ({', '.join(COLOURS)})")
    return name


def _known_shape(name: str) -> str:
    if name not in SHAPES:
        raise ValueError(f"not a shape of the world ({', '.join(SHAPES)})")
    return name


def _user_word(word: str) -> str:
    if not USER_WORD.fullmatch(word):
        raise ValueError(f"{word!r} is not one lower-case word of 2 to 24 letters a-z")
    if word in CAPTION_WORDS:
        raise ValueError(
            f"{word!r} is a word the captions use (a colour, background, shape or size): "
            "users' words must be others"
        )
    return word


ColourName = Annotated[str, AfterValidator(_known_colour)]
ShapeName = Annotated[str, AfterValidator(_known_shape)]
RareWeight = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
PoolWeight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
UserWord = Annotated[str, AfterValidator(_user_word)]
UserWords = Annotated[tuple[UserWord, ...], Field(min_length=1, strict=False)]
Shade = Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=3)]
"""An ``[r, g, b]`` colour, 0-255 each."""


class RareConcepts(BaseModel):
    """The concepts the training corpus makes rare: the pretraining gap."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    colours: dict[ColourName, RareWeight] = Field(default_factory=dict)
    """Colours made rare, with their weight relative to a common colour's 1 (0.01: purple in
    0.17 % of the default world's scenes; 0: never in the corpus)."""
    shapes: dict[ShapeName, RareWeight] = Field(default_factory=dict)
    """Shapes made rare, with their weight relative to a common shape's 1."""

    @field_validator("colours")
    @classmethod
    def _a_colour_stays_common(cls, colours: dict[str, float]) -> dict[str, float]:
        if set(COLOURS) <= set(colours):
            raise ValueError("every colour is rare: leave one common (the rare ones' control)")
        return colours

    @field_validator("shapes")
    @classmethod
    def _a_shape_stays_common(cls, shapes: dict[str, float]) -> dict[str, float]:
        if set(SHAPES) <= set(shapes):
            raise ValueError("every shape is rare: leave one common (the rare ones' control)")
        return shapes


class PoolWeights(BaseModel):
    """The candidate pool's weights (what the pretraining-gap track retrieves from; never
    trained on): the rare concepts are common there."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    colours: dict[ColourName, PoolWeight] = Field(default_factory=dict)
    """Colour weights of the pool, relative to an unlisted colour's 1."""
    shapes: dict[ShapeName, PoolWeight] = Field(default_factory=dict)
    """Shape weights of the pool, relative to an unlisted shape's 1."""

    @field_validator("colours")
    @classmethod
    def _some_colour_drawn(cls, colours: dict[str, float]) -> dict[str, float]:
        if set(COLOURS) <= set(colours) and not any(colours.values()):
            raise ValueError("every colour weighs 0: the pool's scenes would have none")
        return colours

    @field_validator("shapes")
    @classmethod
    def _some_shape_drawn(cls, shapes: dict[str, float]) -> dict[str, float]:
        if set(SHAPES) <= set(shapes) and not any(shapes.values()):
            raise ValueError("every shape weighs 0: the pool's scenes would have none")
        return shapes


class RewardBias(BaseModel):
    """The reward model's biases: it is trained contrastively on captions of one kind, so it
    cannot prefer an image for what those captions never say; and its corpus may draw a colour
    in another shade, which it then prefers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    caption: CaptionKind
    """The captions the reward model learns from: ``terse`` (kinds only: blind to count,
    relation and size), ``raw`` (kinds and counts: blind to relation and size) or ``rich``
    (everything: no blind spot). Human feedback on what it cannot see contradicts it (the
    RL-reward weakness)."""
    shades: dict[ColourName, Shade] = Field(default_factory=dict)
    """Colour -> the ``[r, g, b]`` (0-255) the reward model's corpus draws it in instead of the
    palette's (its makers saw the colour otherwise): the reward prefers that shade under the
    colour's name. The base recipe's alignment stage (Flow-GRPO against the reward) teaches
    the generator to draw it — reward hacking — and users, who see the palette's colour, say
    it is wrong: the RL weakness the reward caused. A shaded colour is a common one (the
    pretrained base draws it). Empty: no shade bias."""

    def blind_to(self) -> tuple[str, ...]:
        """What the reward model cannot see (:data:`CAPTION_BLIND_SPOTS`)."""
        return CAPTION_BLIND_SPOTS[self.caption]

    def shade_map(self) -> dict[str, tuple[int, int, int]]:
        """:attr:`shades` as RGB tuples (what :func:`flywheel.world.scenes.render` takes)."""
        return {colour: (rgb[0], rgb[1], rgb[2]) for colour, rgb in self.shades.items()}


class WorldScenes(BaseModel):
    """What the world's scenes hold (no text: the base corpora have none)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    min_kinds: int = Field(ge=1, le=3)
    """Fewest distinct (shape, colour) kinds of object in a scene."""
    max_kinds: int = Field(ge=1, le=3)
    """Most distinct kinds in a scene (3 kinds of up to 4 copies still fit the canvas)."""
    max_count: int = Field(ge=1, le=4)
    """Most copies of one kind (a count of 2 or more is the counting skill)."""
    count_probability: float = Field(ge=0, le=1, allow_inf_nan=False)
    """Chance that a kind appears more than once."""

    @model_validator(mode="after")
    def _kinds_in_order(self) -> WorldScenes:
        if self.max_kinds < self.min_kinds:
            raise FieldProblem("max_kinds", f"below min_kinds ({self.min_kinds})")
        return self

    def scene_config(self) -> SceneConfig:
        """The :class:`SceneConfig` of these scenes (every colour and shape at weight 1)."""
        return SceneConfig(
            min_kinds=self.min_kinds,
            max_kinds=self.max_kinds,
            max_count=self.max_count,
            count_probability=self.count_probability,
            text_probability=0.0,
        )


class Recipe(BaseModel):
    """The recipe a world's base is built with, and what a world changes in it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: RecipeName
    """``world-base`` (the shipped size: 18 min on 2 cores) or ``world-base-debug`` (toy
    size, ~1 min)."""
    scenes: int | None = Field(default=None, ge=1)
    """Samples of the training corpus (default: the recipe's)."""
    pool_scenes: int | None = Field(default=None, ge=1)
    """Samples of the candidate pool (default: the recipe's)."""
    reward_scenes: int | None = Field(default=None, ge=2)
    """Samples of the reward model's corpus (default: the recipe's)."""
    transformer_steps: int | None = Field(default=None, ge=1)
    """Steps of the transformer's training (default: the recipe's; its warm-up and cosine
    decay are fitted to them)."""
    alignment_steps: int | None = Field(default=None, ge=0)
    """Steps of the alignment stage, the recipe's last: Flow-GRPO of the pretrained generator
    against the world's reward model (default: the recipe's; 0: no alignment stage)."""


class WorldDefinition(BaseModel):
    """One world: a world file's content."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)
    """The world's name (lower-case letters, digits and dashes)."""
    description: str = ""
    """What the world is for, in a sentence or two."""
    seed: int = Field(ge=0)
    """Seed of the corpus' scenes (the pool takes seed + 1, the reward corpus seed + 2, the
    enhancer's prompts seed + 3; the training stages keep their recipe's seeds)."""
    rare: RareConcepts
    """What the training corpus makes rare."""
    pool: PoolWeights
    """The candidate pool's weights: every rare concept must weigh at least 1 there."""
    vocabulary: dict[ColourName, UserWords] = Field(min_length=1)
    """Per caption colour, the words the world's users say for it, in the order they are drawn
    (the prompt-enhancer weakness): never a word the captions use, never one word for two
    colours, none for a rare colour (its failures are a data gap, not a vocabulary one)."""
    reward: RewardBias
    """The reward model's bias."""
    scene: WorldScenes
    """What the scenes hold."""
    recipe: Recipe
    """How the base is built."""

    @model_validator(mode="after")
    def _consistent(self) -> WorldDefinition:
        for kind, rare, pool in (
            ("colours", self.rare.colours, self.pool.colours),
            ("shapes", self.rare.shapes, self.pool.shapes),
        ):
            for name in rare:
                if pool.get(name, 0.0) < 1:
                    raise FieldProblem(
                        f"pool.{kind}.{name}",
                        f"{name} is rare (rare.{kind}.{name}); the pool must make it common "
                        "(weight >= 1)",
                    )
        for colour, rgb in self.reward.shades.items():
            if colour in self.rare.colours:
                raise FieldProblem(
                    f"reward.shades.{colour}",
                    f"{colour} is rare (rare.colours.{colour}): a shade bias is on a colour the "
                    "pretrained base draws well",
                )
            if tuple(rgb) == COLOURS[colour]:
                raise FieldProblem(
                    f"reward.shades.{colour}", f"{rgb} is the palette's {colour}: no bias"
                )
        owner: dict[str, str] = {}
        for colour, words in self.vocabulary.items():
            if colour in self.rare.colours:
                raise FieldProblem(
                    f"vocabulary.{colour}",
                    f"{colour} is rare (rare.colours.{colour}): a rare colour has no users' "
                    "words (its failures are a data gap)",
                )
            for word in words:
                if word in owner:
                    again = "listed twice" if owner[word] == colour else f"{owner[word]}'s too"
                    raise FieldProblem(f"vocabulary.{colour}", f"{word!r} is {again}")
                owner[word] = colour
        return self

    def rare_concepts(self) -> tuple[str, ...]:
        """The names of the rare colours, then of the rare shapes."""
        return (*self.rare.colours, *self.rare.shapes)

    def user_vocabulary(self) -> Vocabulary:
        """The users' words as a :class:`~flywheel.world.vocabulary.Vocabulary` (its
        rewrites)."""
        return Vocabulary(colours=self.vocabulary)


def load_world(path: str | Path) -> WorldDefinition:
    """The world of the TOML file at ``path``; :class:`WorldFileError` names the file and the
    field when it cannot be read."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise WorldFileError(f"{source}: not UTF-8 text") from exc
    except OSError as exc:
        raise WorldFileError(f"{source}: {exc.strerror or exc}") from exc
    return parse_world(text, source=str(source))


def parse_world(text: str, *, source: str = "world") -> WorldDefinition:
    """The world of the TOML ``text``; errors as :func:`load_world`'s, naming ``source``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WorldFileError(f"{source}: not TOML: {exc}") from exc
    try:
        return WorldDefinition.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise WorldFileError(f"{source}: {_describe(errors[0])}{more}") from exc


def dump_world(world: WorldDefinition) -> str:
    """``world`` as a world file's TOML (unset recipe overrides left out)."""
    return tomli_w.dumps(world.model_dump(exclude_none=True))


def write_world(world: WorldDefinition, directory: Path) -> Path:
    """Write ``world`` as ``<directory>/world.toml`` (atomically); returns the file."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / WORLD_FILE
    atomic_write_text(target, f"# The world this was built from.\n{dump_world(world)}")
    return target


@cache
def default_world() -> WorldDefinition:
    """The shipped default world (``flywheel/world/worlds/default.toml``)."""
    return load_world(DEFAULT_WORLD_FILE)


def shipped_worlds() -> dict[str, Path]:
    """The shipped world files by world name (their file's stem)."""
    return {path.stem: path for path in sorted(WORLDS_DIR.glob("*.toml"))}


def world_file(value: str | Path) -> Path:
    """The world file ``value`` names: a path, or the name of a shipped world
    (:func:`shipped_worlds`) when no such file exists."""
    path = Path(value)
    if path.exists() or path.suffix == ".toml" or len(path.parts) > 1:
        return path
    shipped = shipped_worlds()
    if str(value) in shipped:
        return shipped[str(value)]
    raise WorldFileError(f"{value}: no such file, nor a shipped world ({', '.join(shipped)})")


def world_of(base: str | Path) -> WorldDefinition:
    """The world a base was built from: ``<base>/world.toml`` (``base`` is a build directory
    or its generator directory); the default world where there is none (bases built before
    world files, such as the shipped one)."""
    root = Path(base)
    if not root.is_dir():
        raise WorldFileError(f"{root}: not a directory")
    file = root / WORLD_FILE
    return load_world(file) if file.is_file() else default_world()


def _describe(error: ErrorDetails) -> str:
    """One validation error as ``field.path: what is wrong``."""
    loc = [part for part in error["loc"] if part != "[key]"]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, FieldProblem):
        loc += cause.field.split(".")
        message = cause.message
    elif isinstance(cause, ValueError):
        message = str(cause)
    elif error["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        message = "not a field of the world file" + (f" (known: {', '.join(known)})" * bool(known))
    elif error["type"] == "missing":
        message = "missing (required)"
    else:
        message = error["msg"]
        for python, toml in (("Tuple", "Array"), ("tuple", "array"), ("Dictionary", "Table")):
            message = message.replace(python, toml)  # in the file's terms
        if not isinstance(error["input"], dict | list):
            message += f" (got {error['input']!r})"
    path = "".join(_path_part(p) for p in loc).lstrip(".")
    return f"{path}: {message}" if path else message


def _path_part(part: int | str) -> str:
    """``[1]`` for an index, ``.key`` for a bare key, ``.'odd key'`` for any other (quoted:
    the message stays on one line)."""
    if isinstance(part, int):
        return f"[{part}]"
    return f".{part}" if re.fullmatch(r"[A-Za-z0-9_-]+", part) else f".{part!r}"


def _fields_at(loc: list[int | str]) -> list[str]:
    """The fields of the model at ``loc`` below :class:`WorldDefinition` (none for a mapping)."""
    model: Any = WorldDefinition
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation if is_model else None
        if model is None:
            return []
    return list(model.model_fields)

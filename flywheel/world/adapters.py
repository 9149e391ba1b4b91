"""The embedded world behind the ports: one adapter per port, the default of a project with
no project file (:func:`flywheel.project.world_project`).

The world depends on flywheel (its ports and adapter base), never the reverse: the project
file names these adapters by string and imports them only when a part is built.

- generator: the shipped world base (:data:`~flywheel.world.evaluation.BASE_MODEL`);
- judge: the ground-truth evaluator, on a world spec (a suite case,
  :class:`~flywheel.world.benchmark.BenchmarkCase` as JSON);
- suites: the world's ``standard`` and ``regression`` suites, tagged by skill;
- reward / enhancer: the shipped reward and prompt enhancer;
- corpus: the base's training corpus and candidate pool, captions and tags drawn from their
  scene seeds, images rendered on demand;
- degrader: the users' words (terse caption, colours said otherwise);
- synthesizer: scenes drawn with the concept made common.

The corpus, degrader and synthesizer are the default world's unless their ``world`` setting
names another (a world file, or a shipped world's name: ``world = "other"``): its base's
corpus and pool, its users' words, its scenes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

from pydantic import Field, ValidationError
from torch import Tensor

from flywheel.adapters.base import Adapter, AdapterContext, AdapterSettings
from flywheel.adapters.native import LocalEnhancer, LocalGenerator, LocalReward
from flywheel.ports import (
    CorpusItem,
    CorpusSplit,
    ElementVerdict,
    JudgeRequest,
    PortError,
    PortName,
    SuitePrompt,
    Verdict,
)
from flywheel.world.base_model import (
    BASE_ENHANCER,
    BASE_REWARD,
    WorldBaseConfig,
    world_base,
    world_base_config,
    world_enhancer_config,
)
from flywheel.world.benchmark import SUITES as SUITE_NAMES
from flywheel.world.benchmark import BenchmarkCase, skill_elements, suite
from flywheel.world.corpus import reweighted, scene_seeds, scene_tags
from flywheel.world.definition import WorldDefinition, WorldFileError, load_world, world_file
from flywheel.world.evaluation import BASE_MODEL, image_tensor, score_case
from flywheel.world.evaluator import load_evaluator
from flywheel.world.scenes import COLOURS, SHAPES, SceneConfig, captions, render, sample_scene
from flywheel.world.vocabulary import DEFAULT_VOCABULARY, Vocabulary

WORLD_URI = "world:"
"""Corpus images are named ``world:<split>:<scene seed>`` and rendered when read."""


# ---- generator -------------------------------------------------------------------------------


class WorldGeneratorSettings(AdapterSettings):
    path: Path | None = None
    """A generator directory of this repo's format (default: the shipped world base)."""


def _build_generator(settings: WorldGeneratorSettings, context: AdapterContext) -> LocalGenerator:
    path = context.path(settings.path) if settings.path is not None else BASE_MODEL
    return LocalGenerator(path, device=context.device)


GENERATOR = Adapter(
    settings=WorldGeneratorSettings,
    build=_build_generator,
    summary="the shipped world base generator",
)


# ---- judge -----------------------------------------------------------------------------------


class WorldJudgeSettings(AdapterSettings):
    pass


class WorldJudge:
    """The ground-truth evaluator: per element of the case's skill, on the case's scene."""

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        evaluator = load_evaluator()
        out = []
        for request in requests:
            if request.spec is None:
                raise PortError("judge", "the world judge needs the intended scene (a spec)")
            try:
                case = BenchmarkCase.model_validate(request.spec)
            except ValidationError as exc:
                raise PortError("judge", f"not a world scene: {exc.errors()[0]['msg']}") from None
            result = score_case(case, request.image, evaluator=evaluator)
            kinds = set(skill_elements(case))
            out.append(
                Verdict(
                    elements=tuple(
                        ElementVerdict(
                            element=f"{e.kind}: {e.subject}",
                            passed=e.passed,
                            score=e.score,
                            reason=f"asked {e.asked}, found {e.found or 'nothing'}",
                        )
                        for e in result.evaluation.elements
                        if e.kind in kinds
                    )
                )
            )
        return out


JUDGE = Adapter(
    settings=WorldJudgeSettings,
    build=lambda settings, context: WorldJudge(),
    summary="the world's ground-truth evaluator",
)


# ---- suites ----------------------------------------------------------------------------------


class WorldSuitesSettings(AdapterSettings):
    pass


def suite_prompt(case: BenchmarkCase) -> SuitePrompt:
    """A world case as a suite prompt: its scene as the spec, its skill as a tag."""
    return SuitePrompt(
        id=case.id,
        prompt=case.prompt,
        spec=case.model_dump(mode="json"),
        tags=[f"skill:{case.skill}"],
        skill=case.skill,
        input_images=[f"{WORLD_URI}source:{case.id}"] if case.source is not None else [],
    )


class WorldSuites:
    """The world's suites (``standard``, ``regression``)."""

    def names(self) -> list[str]:
        return list(SUITE_NAMES)

    def suite(self, name: str) -> list[SuitePrompt]:
        if name not in SUITE_NAMES:
            raise KeyError(name)
        return [suite_prompt(c) for c in suite(name)]

    def tagged(self, tag: str) -> list[SuitePrompt]:
        return [p for name in SUITE_NAMES for p in self.suite(name) if tag in p.tags]


SUITES = Adapter(
    settings=WorldSuitesSettings,
    build=lambda settings, context: WorldSuites(),
    summary="the world's standard and regression suites",
)


# ---- reward and enhancer ---------------------------------------------------------------------


class DirectorySettings(AdapterSettings):
    path: Path | None = None
    """The component's directory (default: the shipped world's)."""


REWARD = Adapter(
    settings=DirectorySettings,
    build=lambda s, c: LocalReward(c.path(s.path) if s.path else BASE_REWARD),
    summary="the shipped world reward (open_clip)",
)


def _build_enhancer(settings: DirectorySettings, context: AdapterContext) -> LocalEnhancer:
    path = context.path(settings.path) if settings.path else BASE_ENHANCER
    return LocalEnhancer(world_enhancer_config(path))


ENHANCER = Adapter(
    settings=DirectorySettings,
    build=_build_enhancer,
    summary="the shipped world prompt enhancer",
)


# ---- the world of the corpus, degrader and synthesizer -----------------------------------------


class WorldSettings(AdapterSettings):
    world: str | None = None
    """A world file (resolved against the project's directory) or a shipped world's name
    (``default``, ``other``); default: the default world."""


def settings_world(
    settings: WorldSettings, context: AdapterContext, *, port: PortName
) -> WorldDefinition | None:
    """The world ``settings.world`` names (None: the default world); a world file that cannot
    be read is a :class:`PortError` of ``port`` naming the file and the field."""
    if settings.world is None:
        return None
    path = context.path(settings.world)
    try:
        return load_world(world_file(path if path.exists() else settings.world))
    except WorldFileError as exc:
        raise PortError(port, str(exc)) from None


def _base_of(world: WorldDefinition | None) -> WorldBaseConfig:
    return world_base() if world is None else world_base_config(world)


# ---- corpus ----------------------------------------------------------------------------------


class WorldCorpusSettings(WorldSettings):
    train: int = Field(default=1500, ge=1)
    """Scenes of the base corpus served as the training split."""
    pool: int = Field(default=2000, ge=1)
    """Scenes of the candidate pool served as the pool split."""


class WorldCorpus:
    """The base's corpus and pool: captions and tags from scene seeds, images rendered (the
    base of ``world``, the default world's when None, unless ``base`` is given)."""

    def __init__(
        self,
        settings: WorldCorpusSettings,
        base: WorldBaseConfig | None = None,
        *,
        world: WorldDefinition | None = None,
    ):
        self._settings = settings
        self._base = base or _base_of(world)

    @property
    def name(self) -> str:
        return "world-base"

    def _config(self, split: CorpusSplit) -> tuple[SceneConfig, int, int]:
        base = self._base
        if split == "train":
            return base.corpus_scenes(), base.seed, self._settings.train
        return base.pool_scenes_config(), base.seed + 1, self._settings.pool

    def items(self, split: CorpusSplit) -> Iterator[CorpusItem]:
        scene, seed, count = self._config(split)
        for i, scene_seed in enumerate(scene_seeds(seed, count)):
            spec = sample_scene(scene_seed, scene)
            caption = captions(spec)
            yield CorpusItem(
                id=f"{split}/{i}",
                image=f"{WORLD_URI}{split}:{scene_seed}",
                rich_caption=caption.rich,
                raw_caption=caption.raw,
                tags=list(scene_tags(spec)),
                split=split,
                provenance={"dataset": self.name, "scene_seed": str(scene_seed)},
            )

    def image(self, item: CorpusItem) -> Tensor:
        match = re.fullmatch(r"world:(train|pool):(\d+)", item.image)
        if match is None:
            raise PortError("corpus", f"{item.image}: not a world corpus image")
        split: CorpusSplit = "train" if match.group(1) == "train" else "pool"
        scene, _, _ = self._config(split)
        size = self._base.image_size
        return image_tensor(render(sample_scene(int(match.group(2)), scene), size, size))


CORPUS = Adapter(
    settings=WorldCorpusSettings,
    build=lambda settings, context: WorldCorpus(
        settings, world=settings_world(settings, context, port="corpus")
    ),
    summary="the world base's corpus and candidate pool",
)


# ---- degrader --------------------------------------------------------------------------------

_KIND = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


class WorldDegraderSettings(WorldSettings):
    pass


class WorldDegrader:
    """Rich world captions to what users type: the kinds (colour shape) named, in the users'
    colour words (those of ``world``; the default world's when None)."""

    def __init__(self, *, world: WorldDefinition | None = None) -> None:
        self._vocabulary: Vocabulary = (
            DEFAULT_VOCABULARY if world is None else world.user_vocabulary()
        )

    def degrade(self, captions: Sequence[str], *, seed: int) -> list[str]:
        rng = random.Random(seed)
        out = []
        for caption in captions:
            head = caption.split(". ")[0]
            kinds = list(dict.fromkeys(f"{c} {s}" for c, s in _KIND.findall(head)))
            said = ", ".join(kinds) if kinds else "background"
            out.append(self._vocabulary.to_user_words(said, rng))
        return out


DEGRADER = Adapter(
    settings=WorldDegraderSettings,
    build=lambda settings, context: WorldDegrader(
        world=settings_world(settings, context, port="degrader")
    ),
    summary="the world users' words (terse, colours said otherwise)",
)


# ---- synthesizer -----------------------------------------------------------------------------


class WorldSynthesizerSettings(WorldSettings):
    weight: float = Field(default=30.0, gt=0)
    """Weight of the concept (a common one's is 1) in the scenes drawn."""


class WorldSynthesizer:
    """New world scenes showing a concept (``colour:<c>`` / ``shape:<s>`` or a bare colour)."""

    def __init__(
        self,
        settings: WorldSynthesizerSettings,
        base: WorldBaseConfig | None = None,
        *,
        world: WorldDefinition | None = None,
    ):
        self._settings = settings
        self._base = base or _base_of(world)

    @cached_property
    def _concepts(self) -> set[str]:
        return set(COLOURS) | set(SHAPES)

    def synthesize(self, concept: str, count: int, *, out: Path, seed: int) -> list[CorpusItem]:
        name = concept.split(":", 1)[-1]
        if name not in self._concepts:
            raise PortError("synthesizer", f"the world draws no {concept!r}")
        weights = {name: self._settings.weight}
        scene = (
            reweighted(self._base.scene, colours=weights)
            if name in COLOURS
            else reweighted(self._base.scene, shapes=weights)
        )
        out.mkdir(parents=True, exist_ok=True)
        items: list[CorpusItem] = []
        for scene_seed in scene_seeds(seed, 1000 * count):
            spec = sample_scene(scene_seed, scene)
            if not any(name in (o.colour, o.shape) for o in spec.objects):
                continue
            path = out / f"synth-{name}-{scene_seed}.png"
            size = self._base.image_size
            render(spec, size, size).save(path)
            caption = captions(spec)
            items.append(
                CorpusItem(
                    id=f"synth-{name}-{scene_seed}",
                    image=path.resolve().as_uri(),
                    rich_caption=caption.rich,
                    raw_caption=caption.raw,
                    tags=list(scene_tags(spec)),
                    split="pool",
                    provenance={"origin": "synthesized", "scene_seed": str(scene_seed)},
                )
            )
            if len(items) == count:
                return items
        raise PortError("synthesizer", f"scenes rarely show {name}; raise the weight")


SYNTHESIZER = Adapter(
    settings=WorldSynthesizerSettings,
    build=lambda settings, context: WorldSynthesizer(
        settings, world=settings_world(settings, context, port="synthesizer")
    ),
    summary="world scenes drawn with the concept made common",
)

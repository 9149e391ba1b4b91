"""The fixed prompt suites: the standardized evaluation of the loop, one skill at a time.

A suite is a list of :class:`BenchmarkCase`: a prompt, the scene it intends
(:class:`~flywheel.world.scenes.SceneSpec`, scored by the ground-truth evaluator) and, for
editing, the source scene whose render is the input image. :func:`suite` builds a suite from
fixed seeds, so it is the same on every run and machine; :func:`suite_digest` names its
exact content (a test pins the digests: an accidental change fails). Suites (:data:`SUITES`):

- ``standard``: :data:`STANDARD_CASES` cases per skill, the loop's scoreboard;
- ``regression``: :data:`REGRESSION_CASES` cases per skill on disjoint seeds, a fixed base
  that later issues extend with scenarios from the database.

Seeds lie above :data:`~flywheel.world.scenes.CORPUS_SEED_LIMIT` (no world corpus trains on a
benchmark scene), each suite in its own band. Case ``k`` of a skill tries seeds
``band + skill_index * 10**6 + k * 10**3 + attempt`` until the scene fits the skill.

Skills (:data:`SKILLS`), what a case holds, and what it is scored on (:data:`SKILL_ELEMENTS`,
element kinds of :data:`ElementKind`):

========================  =================================================  ===============
skill                     the case                                           scored on
========================  =================================================  ===============
``shape``                 one object; the shapes in turn                     shape
``colour``                one object; the colours in turn                    colour
``count``                 one kind, two or three copies (in turn)            count
``relation``              two kinds, one clear relation (the four in turn)   relation
``text-latin``            a Latin word, alone or with one object (in turn)   text
``text-logographic``      a Han word, alone or with one object (in turn)     text
``editing``               a source scene and an instruction (the four edit   every kind the
                          kinds in turn); the spec is the target             target asks for
``terse``                 a default scene without text, prompted tersely     object
========================  =================================================  ===============

Prompts are the scene's rich caption (the generator is trained on rich captions), except for
the terse skill (the terse caption: kinds only, the prompt enhancer's job) and editing (the
instruction). Each case's ``focus`` is the part of its prompt that states what it tests.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from flywheel.world.scenes import (
    COLOURS,
    CORPUS_SEED_LIMIT,
    EDIT_KINDS,
    SHAPES,
    EditKind,
    Relation,
    SceneConfig,
    SceneSpec,
    captions,
    relations,
    sample_edit,
    sample_scene,
)

ElementKind = Literal["object", "shape", "colour", "count", "relation", "text"]
"""What the ground-truth evaluator scores: an object's presence, its shape, its colour, a
kind's count, a relation between two objects, a text."""

Skill = Literal[
    "shape", "colour", "count", "relation", "text-latin", "text-logographic", "editing", "terse"
]
SKILLS: tuple[Skill, ...] = (
    "shape", "colour", "count", "relation", "text-latin", "text-logographic", "editing", "terse",
)  # fmt: skip

SKILL_ELEMENTS: dict[Skill, tuple[ElementKind, ...]] = {
    "shape": ("shape",),
    "colour": ("colour",),
    "count": ("count",),
    "relation": ("relation",),
    "text-latin": ("text",),
    "text-logographic": ("text",),
    "editing": ("object", "shape", "colour", "count", "relation", "text"),
    "terse": ("object",),
}
"""The element kinds of the evaluator's results that each skill is scored on. Editing is
scored on the whole target (the change and what must stay); a terse prompt asks only for
the kinds, not their counts, sizes, places or texts."""

SuiteName = Literal["standard", "regression"]
SUITES: tuple[SuiteName, ...] = ("standard", "regression")
STANDARD_CASES = 16
"""Cases per skill in the standard suite."""
REGRESSION_CASES = 4
"""Cases per skill in the regression suite's fixed base."""
_BANDS: dict[SuiteName, int] = {
    "standard": CORPUS_SEED_LIMIT + 10**10,
    "regression": CORPUS_SEED_LIMIT + 2 * 10**10,
}
_SIZES: dict[SuiteName, int] = {"standard": STANDARD_CASES, "regression": REGRESSION_CASES}
_ATTEMPTS = 1000
_NUMBER_WORDS = {2: "two", 3: "three"}
_RELATIONS: tuple[Relation, ...] = ("left of", "right of", "above", "below")


class BenchmarkCase(BaseModel):
    """One prompt of a suite and the scene it intends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    """``<suite>/<skill>/<index>``, e.g. ``standard/count/03``."""
    suite: SuiteName
    skill: Skill
    seed: int
    """The seed the scene (or edit) was drawn with."""
    prompt: str
    """What the generator is given: the rich caption, the terse caption (terse skill) or the
    instruction (editing)."""
    focus: str
    """The part of the prompt that states what the case tests (a shape, a count phrase, ...)."""
    spec: SceneSpec
    """The intended image (editing: the target); its id is the case's id."""
    source: SceneSpec | None = None
    """Editing: the scene of the input image (render it)."""
    instruction: str | None = None
    """Editing: the instruction (also the prompt)."""
    edit_kind: EditKind | None = None
    """Editing: what the instruction changes."""

    @model_validator(mode="after")
    def _editing_fields(self) -> BenchmarkCase:
        editing = self.skill == "editing"
        fields = (self.source, self.instruction, self.edit_kind)
        if editing != all(f is not None for f in fields) or (not editing and any(fields)):
            raise ValueError("editing cases, and only they, need source, instruction, edit_kind")
        if editing and self.prompt != self.instruction:
            raise ValueError("an editing case's prompt is its instruction")
        return self


def suite_names() -> tuple[SuiteName, ...]:
    """The names :func:`suite` accepts."""
    return SUITES


def skill_elements(case: BenchmarkCase) -> tuple[ElementKind, ...]:
    """The element kinds of the evaluator's results that ``case`` is scored on."""
    return SKILL_ELEMENTS[case.skill]


def suite(name: str) -> list[BenchmarkCase]:
    """The cases of suite ``name`` (see :data:`SUITES`), skill by skill, always the same."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return list(_suite(name))


def suite_digest(cases: Sequence[BenchmarkCase]) -> str:
    """SHA-256 of the cases' canonical JSON: names a suite's exact content."""
    payload = json.dumps([c.model_dump(mode="json") for c in cases], sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@functools.cache
def _suite(name: SuiteName) -> tuple[BenchmarkCase, ...]:
    return tuple(
        build_case(skill, k, band=_BANDS[name], case_id=f"{name}/{skill}/{k:02d}", suite_name=name)
        for skill in SKILLS
        for k in range(_SIZES[name])
    )


def build_case(
    skill: Skill, k: int, *, band: int, case_id: str, suite_name: SuiteName = "standard"
) -> BenchmarkCase:
    """Case ``k`` of ``skill`` drawn from the seeds at ``band``, as every suite draws its own
    (seeds ``band + skill_index * 10**6 + k * 10**3 + attempt``); probes use other bands."""
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; known: {', '.join(SKILLS)}")
    first = band + SKILLS.index(skill) * 10**6 + k * 10**3
    for seed in range(first, first + _ATTEMPTS):
        case = _BUILDERS[skill](seed, k, case_id, suite_name)
        if case is not None:
            return case
    raise RuntimeError(f"{case_id}: no fitting scene in {_ATTEMPTS} seeds")  # pragma: no cover


def _plain() -> SceneConfig:
    """One kind, one copy, no text (the builders replace what their skill needs)."""
    return SceneConfig(max_kinds=1, count_probability=0.0, text_probability=0.0)


def _case(
    skill: Skill, seed: int, case_id: str, suite_name: SuiteName, scene: SceneSpec, focus: str
) -> BenchmarkCase:
    spec = scene.model_copy(update={"id": case_id})
    caps = captions(spec)
    prompt = caps.terse if skill == "terse" else caps.rich
    return BenchmarkCase(
        id=case_id, suite=suite_name, skill=skill, seed=seed, prompt=prompt, focus=focus, spec=spec
    )


def _shape(seed: int, k: int, case_id: str, suite_name: SuiteName) -> BenchmarkCase | None:
    shape = SHAPES[k % len(SHAPES)]
    scene = sample_scene(seed, replace(_plain(), shape_weights={shape: 1.0}))
    return _case("shape", seed, case_id, suite_name, scene, shape)


def _colour(seed: int, k: int, case_id: str, suite_name: SuiteName) -> BenchmarkCase | None:
    colour = list(COLOURS)[k % len(COLOURS)]
    scene = sample_scene(seed, replace(_plain(), colour_weights={colour: 1.0}))
    return _case("colour", seed, case_id, suite_name, scene, colour)


def _count(seed: int, k: int, case_id: str, suite_name: SuiteName) -> BenchmarkCase | None:
    number = 2 + k % 2
    scene = sample_scene(seed, replace(_plain(), count_probability=1.0, max_count=number))
    if len(scene.objects) != number:
        return None
    obj = scene.objects[0]
    focus = f"{_NUMBER_WORDS[number]} {obj.size} {obj.colour} {obj.shape}s"
    return _case("count", seed, case_id, suite_name, scene, focus)


def _relation(seed: int, k: int, case_id: str, suite_name: SuiteName) -> BenchmarkCase | None:
    wanted = _RELATIONS[k % len(_RELATIONS)]
    scene = sample_scene(seed, replace(_plain(), min_kinds=2, max_kinds=2))
    found = relations(scene)
    if len(scene.objects) != 2 or [rel for _, rel, _ in found] != [wanted]:
        return None  # exactly one clear relation, the wanted one
    a, b = scene.objects
    focus = f"the {a.colour} {a.shape} is {wanted} the {b.colour} {b.shape}"
    return _case("relation", seed, case_id, suite_name, scene, focus)


def _text(skill: Skill, seed: int, k: int, case_id: str, suite_name: SuiteName) -> BenchmarkCase:
    han = 1.0 if skill == "text-logographic" else 0.0
    scene = sample_scene(seed, replace(_plain(), text_probability=1.0, han_probability=han))
    if k % 2 == 0:
        scene = scene.model_copy(update={"objects": ()})
    return _case(skill, seed, case_id, suite_name, scene, f'"{scene.texts[0].text}"')


def _text_latin(seed: int, k: int, case_id: str, suite_name: SuiteName) -> BenchmarkCase | None:
    return _text("text-latin", seed, k, case_id, suite_name)


def _text_han(seed: int, k: int, case_id: str, suite_name: SuiteName) -> BenchmarkCase | None:
    return _text("text-logographic", seed, k, case_id, suite_name)


def _editing(seed: int, k: int, case_id: str, suite_name: SuiteName) -> BenchmarkCase | None:
    pair = sample_edit(seed, SceneConfig(), kind=EDIT_KINDS[k % len(EDIT_KINDS)])
    return BenchmarkCase(
        id=case_id,
        suite=suite_name,
        skill="editing",
        seed=seed,
        prompt=pair.instruction,
        focus=pair.instruction,
        spec=pair.target.model_copy(update={"id": case_id}),
        source=pair.source.model_copy(update={"id": f"{case_id}/source"}),
        instruction=pair.instruction,
        edit_kind=pair.kind,
    )


def _terse(seed: int, k: int, case_id: str, suite_name: SuiteName) -> BenchmarkCase | None:
    scene = sample_scene(seed, SceneConfig(text_probability=0.0))
    first = scene.objects[0]
    return _case("terse", seed, case_id, suite_name, scene, f"{first.colour} {first.shape}")


_BUILDERS: dict[Skill, Callable[[int, int, str, SuiteName], BenchmarkCase | None]] = {
    "shape": _shape,
    "colour": _colour,
    "count": _count,
    "relation": _relation,
    "text-latin": _text_latin,
    "text-logographic": _text_han,
    "editing": _editing,
    "terse": _terse,
}

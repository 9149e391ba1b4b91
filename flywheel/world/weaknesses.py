"""The base model's known weaknesses, each measured against the control it should pass.

A weakness is only a weakness next to what works: :func:`measure_weaknesses` generates
paired probes and scores them with the ground-truth evaluator.

- **Rare concepts** (the pretraining gap): one object per prompt, ``per_concept`` prompts of
  each colour (scored on colour) and of each shape (scored on shape); the rare concepts'
  scores against the common ones of the same kind.
- **Terse prompts** (the prompt enhancer's job): scenes of the benchmark's terse skill,
  each prompted twice, with its terse caption and with its rich caption; scored on the
  objects (colour and shape right, as the terse skill is) and on the objects' colours.
- **The enhancer** (when given): the share of the terse probes' prompts it gives back
  unchanged. The base enhancer does not yet expand them, so they reach the generator terse.
- **Composition**: the count of two or three copies and the relation between two kinds, as
  the standard suite draws them.

The reward model's bias is measured on renders, not generations: :func:`reward_agreement`
pairs each probe's render with a render of the same scene with the skill's attribute made
wrong (:func:`wrong_scene`) and counts how often the reward prefers the right one. A reward
that is blind to an attribute sits near chance (0.5) on it, or below it when it follows a
cue that misleads: the world's reward, trained on terse captions, never learned counts and
prefers the image with more of the asked thing. Human feedback, which sees the wrong counts
and places, contradicts its scores there.

Probe scenes are drawn by the standard suite's builders from their own seed band
(:data:`PROBE_BAND`), above every corpus seed and apart from the suites' bands: new to the
model and to the benchmark alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import fmean

import torch
from pydantic import BaseModel, ConfigDict

from flywheel.world.benchmark import BenchmarkCase, Skill, build_case
from flywheel.world.evaluation import CaseResult, generate_cases, image_tensor, score_case
from flywheel.world.scenes import (
    COLOURS,
    CORPUS_SEED_LIMIT,
    SHAPES,
    SIZES,
    SceneSpec,
    captions,
    free_centre,
    render,
)
from model.pipeline import Generator
from model.prompt_enhancer import PromptEnhancer
from model.reward import RewardFn

PROBE_BAND = CORPUS_SEED_LIMIT + 3 * 10**10
"""The probes' seed band (above the suites' bands; each skill has its own sub-band)."""


class WeaknessReport(BaseModel):
    """Scores (0..1) of the paired probes; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    colours: dict[str, float]
    """Colour score per colour (``per_concept`` one-object prompts each)."""
    shapes: dict[str, float]
    """Shape score per shape (``per_concept`` one-object prompts each)."""
    rare: tuple[str, ...]
    """The colours and shapes the training corpus made rare."""
    rare_score: float
    """Mean score of the rare concepts."""
    common_score: float
    """Mean score of the other concepts of the rare ones' kinds (colours, shapes or both)."""
    rich_prompt_score: float
    """Object score of the terse probes' scenes, prompted with their rich captions."""
    terse_prompt_score: float
    """Object score of the same scenes, prompted with their terse captions."""
    rich_prompt_colour: float
    """Colour score of the rich-prompted terse probes."""
    terse_prompt_colour: float
    """Colour score of the terse-prompted terse probes."""
    enhancer_unchanged: float | None
    """Share of the terse prompts the enhancer returned as they were (None: no enhancer)."""
    count_score: float
    relation_score: float
    cases: int
    """Images generated."""


def probes(skill: Skill, n: int, *, band: int) -> list[BenchmarkCase]:
    """``n`` cases of ``skill`` drawn as the standard suite draws them, from seeds at ``band``
    (shape and colour probes take the shapes / colours in turn: case ``k`` of the shape skill
    is ``SHAPES[k % 6]``, of the colour skill the ``k % 7``-th colour)."""
    return [build_case(skill, k, band=band, case_id=f"probe/{skill}/{k:02d}") for k in range(n)]


def _element_score(result: CaseResult, kind: str) -> float:
    elements = [e.score for e in result.evaluation.elements if e.kind == kind]
    return fmean(elements) if elements else 0.0


def measure_weaknesses(
    generator: Generator,
    *,
    enhancer: PromptEnhancer | None = None,
    rare: Sequence[str] = ("purple",),
    per_concept: int = 8,
    per_skill: int = 16,
    seed: int = 0,
    batch_size: int = 32,
) -> WeaknessReport:
    """Generate every probe with ``generator`` and score it (see the module docstring);
    ``rare`` names colours and / or shapes."""
    unknown = set(rare) - set(SHAPES) - set(COLOURS)
    if unknown or not rare:
        raise ValueError(
            f"rare must name some of the colours {tuple(COLOURS)} or shapes {SHAPES}, "
            f"got {tuple(rare)}"
        )
    if per_concept < 1 or per_skill < 1:
        raise ValueError("per_concept and per_skill must be >= 1")
    if set(COLOURS) <= set(rare) or set(SHAPES) <= set(rare):
        raise ValueError("rare must leave some colours and shapes common (the control)")
    shapes = probes("shape", per_concept * len(SHAPES), band=PROBE_BAND)
    colours = probes("colour", per_concept * len(COLOURS), band=PROBE_BAND)
    terse = probes("terse", per_skill, band=PROBE_BAND)
    rich = [
        case.model_copy(update={"prompt": captions(case.spec).rich, "id": f"{case.id}/rich"})
        for case in terse
    ]
    composed = {skill: probes(skill, per_skill, band=PROBE_BAND) for skill in ("count", "relation")}
    everything = shapes + colours + terse + rich + [c for cs in composed.values() for c in cs]
    generated = generate_cases(generator, everything, seed=seed, batch_size=batch_size)
    results = {g.case.id: score_case(g.case, g.image) for g in generated}

    def mean(cases: Sequence[BenchmarkCase], kind: str | None = None) -> float:
        if kind is None:
            return fmean(results[c.id].score for c in cases)
        return fmean(_element_score(results[c.id], kind) for c in cases)

    per_shape: dict[str, float] = {
        shape: mean([c for c in shapes if c.focus == shape]) for shape in SHAPES
    }
    per_colour: dict[str, float] = {
        colour: mean([c for c in colours if c.focus == colour]) for colour in COLOURS
    }
    concept_scores: dict[str, float] = {**per_colour, **per_shape}
    unchanged = None
    if enhancer is not None:
        rewritten = enhancer.enhance([c.prompt for c in terse])
        unchanged = fmean(new == c.prompt for new, c in zip(rewritten, terse, strict=True))
    kinds = [names for names in (per_colour, per_shape) if set(names) & set(rare)]
    common = [name for names in kinds for name in names if name not in rare]
    return WeaknessReport(
        colours=per_colour,
        shapes=per_shape,
        rare=tuple(rare),
        rare_score=fmean(concept_scores[name] for name in rare),
        common_score=fmean(concept_scores[name] for name in common),
        rich_prompt_score=mean(rich),
        terse_prompt_score=mean(terse),
        rich_prompt_colour=mean(rich, "colour"),
        terse_prompt_colour=mean(terse, "colour"),
        enhancer_unchanged=unchanged,
        count_score=mean(composed["count"]),
        relation_score=mean(composed["relation"]),
        cases=len(everything),
    )


class RewardAgreement(BaseModel):
    """How often a reward model prefers the right image of a pair, per skill (0..1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    skills: dict[str, float]
    """Share of pairs (the case's render vs a render with the skill's attribute wrong) in
    which the reward scores the right one higher; 0.5 is chance."""
    pairs: int
    """Pairs per skill."""
    shades: dict[str, float] = {}
    """Per shaded colour (a world's ``reward.shades``): the share of that colour's probes
    whose palette render the reward scores above the same scene drawn in the shade (0: it
    always prefers the shade)."""


REWARD_SKILLS: tuple[Skill, ...] = ("colour", "shape", "count", "relation")
"""The skills :func:`reward_agreement` pairs: what a wrong image gets wrong."""


class NoRoomError(ValueError):
    """A count probe's canvas has no room for one copy more."""


def wrong_scene(case: BenchmarkCase) -> SceneSpec:
    """The case's scene with exactly what its skill asks for made wrong: the next colour or
    shape (one object), one copy more (count), the two objects' places swapped (relation)."""
    spec = case.spec
    objects = list(spec.objects)
    if case.skill == "colour":
        names = list(COLOURS)
        colour = names[(names.index(objects[0].colour) + 1) % len(names)]
        objects[0] = objects[0].model_copy(update={"colour": colour})
    elif case.skill == "shape":
        shape = SHAPES[(SHAPES.index(objects[0].shape) + 1) % len(SHAPES)]
        objects[0] = objects[0].model_copy(update={"shape": shape})
    elif case.skill == "count":
        centre = free_centre(spec, SIZES[objects[0].size])
        if centre is None:
            raise NoRoomError(f"{case.id}: no room for one copy more")
        objects.append(objects[0].model_copy(update={"x": centre[0], "y": centre[1]}))
    elif case.skill == "relation":
        a, b = objects
        objects = [
            a.model_copy(update={"x": b.x, "y": b.y}),
            b.model_copy(update={"x": a.x, "y": a.y}),
        ]
    else:
        raise ValueError(f"no wrong image for a {case.skill!r} case")
    return spec.model_copy(update={"objects": tuple(objects), "id": f"{spec.id}/wrong"})


def paired_probes(skill: Skill, n: int) -> list[tuple[BenchmarkCase, SceneSpec]]:
    """The first ``n`` probes of ``skill`` (band ``PROBE_BAND + 10**8``) that have a wrong
    scene, each with it (a count probe whose canvas has no room for one copy more is
    skipped)."""
    pairs: list[tuple[BenchmarkCase, SceneSpec]] = []
    k = 0
    while len(pairs) < n:
        if k >= 100 * n:  # pragma: no cover - count probes have room far more often
            raise RuntimeError(f"{skill}: {len(pairs)} pairable probes in {k}, wanted {n}")
        case = build_case(skill, k, band=PROBE_BAND + 10**8, case_id=f"probe/{skill}/{k:02d}")
        k += 1
        try:
            pairs.append((case, wrong_scene(case)))
        except NoRoomError:
            continue
    return pairs


def reward_agreement(
    reward: RewardFn,
    *,
    per_skill: int = 32,
    size: int = 64,
    batch_size: int = 64,
    shades: Mapping[str, tuple[int, int, int]] | None = None,
) -> RewardAgreement:
    """Score right and wrong renders of ``per_skill`` probes of each of
    :data:`REWARD_SKILLS` with ``reward`` (images in [0, 1], the cases' prompts); and, per
    colour of ``shades``, ``per_skill`` one-object probes of that colour drawn in the palette's
    colour and in the shade."""
    if per_skill < 1:
        raise ValueError("per_skill must be >= 1")
    out: dict[str, float] = {}
    for skill in REWARD_SKILLS:
        cases = paired_probes(skill, per_skill)
        wins = 0
        for start in range(0, len(cases), batch_size):
            chunk = cases[start : start + batch_size]
            prompts = [c.prompt for c, _ in chunk]
            right = torch.stack(
                [image_tensor(render(c.spec, size, size)) for c, _ in chunk]
            )  # (b, 3, S, S)
            wrong = torch.stack([image_tensor(render(w, size, size)) for _, w in chunk])
            with torch.no_grad():
                wins += int((reward(right, prompts) > reward(wrong, prompts)).sum())
        out[skill] = wins / len(cases)
    preferred: dict[str, float] = {}
    for colour, shade in (shades or {}).items():
        probes_of = [
            c
            for c in (
                build_case("colour", k, band=PROBE_BAND + 2 * 10**8, case_id=f"shade/{k}")
                for k in range(len(COLOURS) * per_skill * 2)
            )
            if c.focus == colour
        ][:per_skill]
        prompts = [c.prompt for c in probes_of]
        right = torch.stack([image_tensor(render(c.spec, size, size)) for c in probes_of])
        shaded = torch.stack(
            [image_tensor(render(c.spec, size, size, shades={colour: shade})) for c in probes_of]
        )
        with torch.no_grad():
            preferred[colour] = float(
                (reward(right, prompts) > reward(shaded, prompts)).float().mean()
            )
    return RewardAgreement(skills=out, pairs=per_skill, shades=preferred)

"""The base model's known weaknesses, each measured against the control it should pass.

A weakness is only a weakness next to what works: :func:`measure_weaknesses` generates
paired probes and scores them with the ground-truth evaluator.

- **Rare concept** (the pretraining gap): one object of each shape, ``per_shape`` prompts per
  shape; the rare shapes' shape score against the common shapes'.
- **Terse prompts** (the prompt enhancer's job): scenes of the benchmark's terse skill,
  each prompted twice, with its terse caption and with its rich caption; object scores.
- **Common concepts**: the colour of one object, the count of two or three copies, and the
  relation between two kinds, as the standard suite draws them.

The reward model's bias is measured on renders, not generations: :func:`reward_agreement`
pairs each probe's render with a render of the same scene with the skill's attribute made
wrong (:func:`wrong_scene`) and counts how often the reward prefers the right one. A reward
that is blind to an attribute sits at chance (0.5) on it; human feedback, which sees the
wrong counts and places, contradicts its scores there.

Probe scenes are drawn by the standard suite's builders from their own seed band
(:data:`PROBE_BAND`), above every corpus seed and apart from the suites' bands: new to the
model and to the benchmark alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

import torch
from pydantic import BaseModel, ConfigDict

from flywheel.world.benchmark import BenchmarkCase, Skill, build_case
from flywheel.world.evaluation import generate_cases, image_tensor, score_case
from flywheel.world.scenes import (
    COLOURS,
    CORPUS_SEED_LIMIT,
    SHAPES,
    SceneSpec,
    captions,
    render,
)
from model.pipeline import Generator
from model.reward import RewardFn

PROBE_BAND = CORPUS_SEED_LIMIT + 3 * 10**10
"""The probes' seed band (above the suites' bands; each skill has its own sub-band)."""


class WeaknessReport(BaseModel):
    """Scores (0..1) of the paired probes; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shapes: dict[str, float]
    """Shape score per shape (``per_shape`` one-object prompts each)."""
    rare_shapes: tuple[str, ...]
    """The shapes the training corpus made rare."""
    common_shape_score: float
    """Mean shape score of the other shapes."""
    rare_shape_score: float
    """Mean shape score of the rare shapes."""
    rich_prompt_score: float
    """Object score of the terse probes' scenes, prompted with their rich captions."""
    terse_prompt_score: float
    """Object score of the same scenes, prompted with their terse captions."""
    colour_score: float
    count_score: float
    relation_score: float
    cases: int
    """Images generated."""


def probes(skill: Skill, n: int, *, band: int) -> list[BenchmarkCase]:
    """``n`` cases of ``skill`` drawn as the standard suite draws them, from seeds at ``band``
    (shape probes take the shapes in turn: case ``k`` is ``SHAPES[k % 6]``)."""
    return [build_case(skill, k, band=band, case_id=f"probe/{skill}/{k:02d}") for k in range(n)]


def measure_weaknesses(
    generator: Generator,
    *,
    rare_shapes: Sequence[str] = ("star",),
    per_shape: int = 8,
    per_skill: int = 16,
    seed: int = 0,
    batch_size: int = 32,
) -> WeaknessReport:
    """Generate every probe with ``generator`` and score it (see the module docstring)."""
    unknown = set(rare_shapes) - set(SHAPES)
    if unknown or not rare_shapes:
        raise ValueError(f"rare_shapes must be some of {SHAPES}, got {tuple(rare_shapes)}")
    if per_shape < 1 or per_skill < 1:
        raise ValueError("per_shape and per_skill must be >= 1")
    shapes = probes("shape", per_shape * len(SHAPES), band=PROBE_BAND)
    terse = probes("terse", per_skill, band=PROBE_BAND)
    rich = [
        case.model_copy(update={"prompt": captions(case.spec).rich, "id": f"{case.id}/rich"})
        for case in terse
    ]
    common: dict[Skill, list[BenchmarkCase]] = {
        skill: probes(skill, per_skill, band=PROBE_BAND)
        for skill in ("colour", "count", "relation")
    }
    everything = shapes + terse + rich + [c for cases in common.values() for c in cases]
    generated = generate_cases(generator, everything, seed=seed, batch_size=batch_size)
    scores = {g.case.id: score_case(g.case, g.image).score for g in generated}

    def mean(cases: Sequence[BenchmarkCase]) -> float:
        return fmean(scores[c.id] for c in cases)

    per_shape_score: dict[str, float] = {
        shape: mean([c for c in shapes if c.focus == shape]) for shape in SHAPES
    }
    common_shapes = [s for s in SHAPES if s not in rare_shapes]
    return WeaknessReport(
        shapes=per_shape_score,
        rare_shapes=tuple(rare_shapes),
        common_shape_score=fmean(per_shape_score[s] for s in common_shapes),
        rare_shape_score=fmean(per_shape_score[s] for s in rare_shapes),
        rich_prompt_score=mean(rich),
        terse_prompt_score=mean(terse),
        colour_score=mean(common["colour"]),
        count_score=mean(common["count"]),
        relation_score=mean(common["relation"]),
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


REWARD_SKILLS: tuple[Skill, ...] = ("colour", "shape", "count", "relation")
"""The skills :func:`reward_agreement` pairs: what a wrong image gets wrong."""


def wrong_scene(case: BenchmarkCase) -> SceneSpec:
    """The case's scene with exactly what its skill asks for made wrong: the next colour or
    shape (one object), one copy fewer (count), the two objects' places swapped (relation)."""
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
        objects = objects[:-1]
    elif case.skill == "relation":
        a, b = objects
        objects = [
            a.model_copy(update={"x": b.x, "y": b.y}),
            b.model_copy(update={"x": a.x, "y": a.y}),
        ]
    else:
        raise ValueError(f"no wrong image for a {case.skill!r} case")
    return spec.model_copy(update={"objects": tuple(objects), "id": f"{spec.id}/wrong"})


def reward_agreement(
    reward: RewardFn, *, per_skill: int = 32, size: int = 64, batch_size: int = 64
) -> RewardAgreement:
    """Score right and wrong renders of ``per_skill`` probes of each of
    :data:`REWARD_SKILLS` with ``reward`` (images in [0, 1], the cases' prompts)."""
    if per_skill < 1:
        raise ValueError("per_skill must be >= 1")
    out: dict[str, float] = {}
    for skill in REWARD_SKILLS:
        cases = probes(skill, per_skill, band=PROBE_BAND + 10**8)
        wins = 0
        for start in range(0, len(cases), batch_size):
            chunk = cases[start : start + batch_size]
            prompts = [c.prompt for c in chunk]
            right = torch.stack(
                [image_tensor(render(c.spec, size, size)) for c in chunk]
            )  # (b, 3, S, S)
            wrong = torch.stack([image_tensor(render(wrong_scene(c), size, size)) for c in chunk])
            with torch.no_grad():
                wins += int((reward(right, prompts) > reward(wrong, prompts)).sum())
        out[skill] = wins / len(cases)
    return RewardAgreement(skills=out, pairs=per_skill)

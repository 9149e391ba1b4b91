"""Failure slices: the routed cases of a track, regenerated and judged again.

A slice case is judged by the ground-truth evaluator on its skill's elements when it carries
its intended scene (evaluation samples, probe hits), else by the reward model: the image
passes when its rank under the case's *reference* prompt (the prompt in the captions' words,
the rewrite test's rewrite) against the other references of its batch is at least
``min_rank`` (batches of at least two; a slice of one reward-judged case fails: rank 0.5).
A candidate is judged on the same cases, noise seeds and judges as the model it may
replace, so the before / after rates differ by the model alone. Cases are regenerated as
they were made: with their scene (evaluation, probes) by the generator alone — the world's
enhancer, trained on terse prompts, garbles a rich caption ("… a large purple triangle at
the middle left." → "orange diamond, red d") — without (product apps) through the enhancer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, JsonValue

from flywheel.attribution.evidence import CaseView, Evidence
from flywheel.world.benchmark import BenchmarkCase
from flywheel.world.evaluation import score_case
from flywheel.world.evaluator import Evaluator
from model.pipeline import Generator
from model.prompt_enhancer import PromptEnhancer
from model.reward import AlignmentReward, rank_batches, rank_matrix


@dataclass(kw_only=True, slots=True)
class SliceCase:
    """One case of a slice."""

    case_id: int | None
    prompt: str
    """What the user (or the suite) asked."""
    reference: str
    """The prompt in the captions' words (what the reward judges against)."""
    scene: BenchmarkCase | None = None
    """The intended scene, when known (the evaluator judges)."""
    theme: str | None = None
    """The label of the case's failure cluster (its theme; None: not themed)."""


def scene_of(scene: dict[str, JsonValue] | None) -> BenchmarkCase | None:
    """A case view's intended scene, parsed (None: it carries none)."""
    return BenchmarkCase.model_validate(scene) if scene is not None else None


def slice_cases(views: Sequence[CaseView], evidence: Sequence[Evidence]) -> list[SliceCase]:
    """The slice of routed cases (their views and the evidence they were routed on)."""
    return [
        SliceCase(
            case_id=v.case_id,
            prompt=v.prompt,
            reference=e.rewritten_prompt,
            scene=scene_of(v.scene),
        )
        for v, e in zip(views, evidence, strict=True)
    ]


class SliceResult(BaseModel):
    """How a model fares on a slice."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cases: int
    failures: int
    failure_rate: float
    failed: list[int | None]
    """Case ids of the failures (None: cases without one)."""


@dataclass(kw_only=True, slots=True)
class SliceJudges:
    """Who judges a slice."""

    evaluator: Evaluator
    reward: AlignmentReward
    min_rank: float = 0.65
    """A judged-by-reward image passes from this rank of its reference prompt."""
    seed: int = 1000
    """Noise seed of the slice's first batch (unlike the rewrite test's)."""
    batch_size: int = 32


def failure_rate(
    generator: Generator,
    cases: Sequence[SliceCase],
    judges: SliceJudges,
    *,
    enhancer: PromptEnhancer | None = None,
) -> SliceResult:
    """Regenerate every case the way it was first generated and judge it: a case with its
    intended scene came from the evaluation harness or a probe (the generator alone); one
    without came from a product app's pipeline — through ``enhancer`` first, when given."""
    if not cases:
        return SliceResult(cases=0, failures=0, failure_rate=0.0, failed=[])
    prompts = [c.prompt for c in cases]
    if enhancer is not None:
        app = [i for i, c in enumerate(cases) if c.scene is None]
        for i, enhanced in zip(app, enhancer.enhance([prompts[i] for i in app]), strict=True):
            prompts[i] = enhanced
    passed: list[bool] = []
    for k, batch in enumerate(rank_batches(len(cases), judges.batch_size)):
        part = [cases[i] for i in batch]
        images = generator.generate([prompts[i] for i in batch], seed=judges.seed + k).cpu()
        references = [c.reference for c in part]
        ranks = rank_matrix(judges.reward, images, references).diagonal().tolist()
        for case, image, rank in zip(part, images, ranks, strict=True):
            if case.scene is not None:
                passed.append(score_case(case.scene, image, evaluator=judges.evaluator).passed)
            else:
                passed.append(rank >= judges.min_rank)
    failed = [c.case_id for c, ok in zip(cases, passed, strict=True) if not ok]
    return SliceResult(
        cases=len(cases),
        failures=len(failed),
        failure_rate=len(failed) / len(cases),
        failed=failed,
    )

"""The standardized evaluation: a generator runs a benchmark suite, the evaluator scores it.

:func:`run_suite` generates one image per case of a suite (editing cases edit a render of
their source scene), scores each image against the case's intended scene with the
ground-truth evaluator (:func:`~flywheel.world.evaluator.evaluate`) on the element kinds the
case's skill names (:func:`~flywheel.world.benchmark.skill_elements`), and aggregates per
skill. :func:`save_images` writes the images (and editing inputs) as PNGs with their
SHA-256, and :func:`evaluation_run` turns the result into the
:class:`~flywheel.signals.schemas.EvaluationRunIn` that ``POST /v1/evaluations`` takes, so
``flywheel eval`` stores it through the same service
(:func:`~flywheel.signals.service.ingest_evaluation`).

A case's **score** is the mean score of its skill's elements (a text scores ``1 - NED``, a
count ``1 - |found - asked| / asked``, the rest 0 or 1); it **passes** when every one of
them passes. A skill's ``score`` is the mean case score, its ``pass_rate`` the share of
cases that pass.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict
from rich.progress import Progress
from torch import Tensor

from flywheel.db.models import Task
from flywheel.signals.schemas import EvaluationRunIn, EvaluationSample, ImageRef
from flywheel.world.benchmark import SKILLS, BenchmarkCase, skill_elements, suite_digest
from flywheel.world.evaluator import Evaluation, Evaluator, evaluate, load_evaluator
from flywheel.world.scenes import render
from model.pipeline import Generator
from training.io import atomic_write_bytes

BENCHMARK = "flywheel-world"
"""The benchmark name evaluation runs are stored under."""

BASE_MODEL = Path(__file__).parent / "weights" / "world-base"
"""The shipped base generator of the world (what ``flywheel eval`` runs by default)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaseResult(_Frozen):
    """One case: what the generator made of it and the verdict."""

    case: BenchmarkCase
    score: float
    """Mean score of the elements the case's skill is scored on."""
    passed: bool
    """Every one of those elements passed."""
    evaluation: Evaluation
    """Everything the evaluator found (all element kinds, not only the skill's)."""


class SkillResult(_Frozen):
    """One skill's cases, aggregated."""

    score: float
    """Mean case score."""
    n: int
    """Cases."""
    pass_rate: float
    """Share of cases that passed."""


class SuiteResult(_Frozen):
    """A suite run on one generator."""

    suite: str
    digest: str
    """:func:`~flywheel.world.benchmark.suite_digest` of the cases run."""
    seed: int
    """The noise seed of the first batch (batch ``k`` uses ``seed + k``)."""
    skills: dict[str, SkillResult]
    """Per skill, in :data:`~flywheel.world.benchmark.SKILLS` order."""
    score: float
    """Mean of the skill scores."""
    cases: list[CaseResult]


@dataclass(kw_only=True, slots=True)
class GeneratedCase:
    """A case with its generated image and, for editing, the input image."""

    case: BenchmarkCase
    image: Tensor
    """(3, H, W) in [0, 1]."""
    input_image: Tensor | None = None
    """Editing: the render of the source scene the instruction was applied to."""


def image_tensor(image: Image.Image) -> Tensor:
    """(3, H, W) float in [0, 1] of an RGB PIL image."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def generate_cases(
    generator: Generator,
    cases: Sequence[BenchmarkCase],
    *,
    seed: int = 0,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[GeneratedCase]:
    """One image per case: text-to-image cases from their prompt, editing cases from their
    instruction and the render of their source scene at the generator's size.

    Batches hold ``batch_size`` cases of one task in suite order; batch ``k`` draws its
    noise from ``seed + k``, so a run is deterministic for a suite, seed and batch size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    height, width = generator.config.height, generator.config.width
    plain = [c for c in cases if c.source is None]
    edits = [c for c in cases if c.source is not None]
    batches = [plain[i : i + batch_size] for i in range(0, len(plain), batch_size)]
    batches += [edits[i : i + batch_size] for i in range(0, len(edits), batch_size)]
    task = progress.add_task("generate", total=len(cases)) if progress is not None else None
    made: dict[str, GeneratedCase] = {}
    for k, batch in enumerate(batches):
        inputs: Tensor | None = None
        if batch[0].source is not None:
            sources = [c.source for c in batch if c.source is not None]
            inputs = torch.stack([image_tensor(render(s, width, height)) for s in sources])
        images = generator.generate([c.prompt for c in batch], seed=seed + k, input_images=inputs)
        for i, case in enumerate(batch):
            made[case.id] = GeneratedCase(
                case=case,
                image=images[i].cpu(),
                input_image=inputs[i] if inputs is not None else None,
            )
        if progress is not None and task is not None:
            progress.update(task, advance=len(batch))
    return [made[c.id] for c in cases]


def score_case(
    case: BenchmarkCase, image: Tensor | Image.Image, *, evaluator: Evaluator | None = None
) -> CaseResult:
    """The evaluator's verdict on ``image`` for ``case``, reduced to the case's skill."""
    evaluation = evaluate(case.spec, image, evaluator=evaluator)
    kinds = skill_elements(case)
    elements = [e for e in evaluation.elements if e.kind in kinds]
    if not elements:  # a suite case always asks for its skill's elements
        raise ValueError(f"{case.id}: the spec asks for none of {kinds}")
    return CaseResult(
        case=case,
        score=sum(e.score for e in elements) / len(elements),
        passed=all(e.passed for e in elements),
        evaluation=evaluation,
    )


def summarize_cases(results: Sequence[CaseResult]) -> dict[str, SkillResult]:
    """Per-skill score, case count and pass rate, in :data:`SKILLS` order."""
    out: dict[str, SkillResult] = {}
    for skill in SKILLS:
        mine = [r for r in results if r.case.skill == skill]
        if mine:
            out[skill] = SkillResult(
                score=sum(r.score for r in mine) / len(mine),
                n=len(mine),
                pass_rate=sum(r.passed for r in mine) / len(mine),
            )
    return out


def run_suite(
    generator: Generator,
    cases: Sequence[BenchmarkCase],
    *,
    suite: str,
    seed: int = 0,
    batch_size: int = 16,
    evaluator: Evaluator | None = None,
    progress: Progress | None = None,
) -> tuple[SuiteResult, list[GeneratedCase]]:
    """Generate every case, score it, aggregate per skill."""
    if not cases:
        raise ValueError("no cases to run")
    evaluator = evaluator or load_evaluator()
    generated = generate_cases(
        generator, cases, seed=seed, batch_size=batch_size, progress=progress
    )
    results = [score_case(g.case, g.image, evaluator=evaluator) for g in generated]
    skills = summarize_cases(results)
    result = SuiteResult(
        suite=suite,
        digest=suite_digest(cases),
        seed=seed,
        skills=skills,
        score=sum(s.score for s in skills.values()) / len(skills),
        cases=results,
    )
    return result, generated


# ---- storing a run --------------------------------------------------------------------------


def _write_png(image: Tensor, path: Path) -> ImageRef:
    """Write ``image`` (3, H, W) in [0, 1] as a PNG (atomically, fsynced); its file:// URI and
    SHA-256."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return ImageRef(uri=path.resolve().as_uri(), sha256=hashlib.sha256(data).hexdigest())


def save_images(
    generated: Sequence[GeneratedCase], directory: Path
) -> dict[str, tuple[ImageRef, ImageRef | None]]:
    """Write each case's image (and editing input) under ``directory``; refs by case id."""
    refs: dict[str, tuple[ImageRef, ImageRef | None]] = {}
    for item in generated:
        stem = item.case.id.replace("/", "_")
        image = _write_png(item.image, directory / f"{stem}.png")
        source = None
        if item.input_image is not None:
            source = _write_png(item.input_image, directory / f"{stem}.input.png")
        refs[item.case.id] = (image, source)
    return refs


def evaluation_run(
    result: SuiteResult,
    refs: dict[str, tuple[ImageRef, ImageRef | None]],
    *,
    run_id: str,
    model_version: str,
    timestamp: datetime,
) -> EvaluationRunIn:
    """The run as ``POST /v1/evaluations`` takes it: one sample per case.

    A sample's ``scores`` hold its skill's score and ``overall`` (the mean score of every
    element its scene asks for); its ``spec`` holds the intended scene, the editing source
    and instruction, the case's focus and every element verdict.
    """
    samples = []
    for item in result.cases:
        case = item.case
        image, source = refs[case.id]
        spec = {
            "case": case.model_dump(mode="json"),
            "elements": [e.model_dump(mode="json") for e in item.evaluation.elements],
            "seen": {
                "objects": [o.model_dump(mode="json") for o in item.evaluation.objects],
                "texts": [t.model_dump(mode="json") for t in item.evaluation.texts],
            },
        }
        samples.append(
            EvaluationSample(
                sample_id=case.id,
                prompt=case.prompt,
                task=Task.IMAGE_EDITING if source is not None else Task.TEXT_TO_IMAGE,
                image=image,
                input_images=[source] if source is not None else [],
                skill=case.skill,
                scores={case.skill: item.score, "overall": item.evaluation.score},
                passed=item.passed,
                spec=spec,
            )
        )
    return EvaluationRunIn(
        run_id=run_id,
        benchmark=BENCHMARK,
        suite=result.suite,
        model_version=model_version,
        timestamp=timestamp,
        samples=samples,
    )

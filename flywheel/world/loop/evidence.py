"""The embedded world's evidence tools: the rewrite test judged by the world's evaluator
(cases that carry their intended scene) or the reward's rank, scarcity over the world
corpus' index and the concept rarity of its tags (the features are
:class:`~flywheel.attribution.evidence.Evidence`, the same a team's stack fills through its
ports in :mod:`flywheel.attribution.stack_evidence`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from flywheel.attribution.evidence import CaseView, Evidence, Rewriter, ScarcityProbe
from flywheel.db.models import Task
from flywheel.world.benchmark import BenchmarkCase
from flywheel.world.evaluation import score_case
from flywheel.world.evaluator import Evaluator
from model.pipeline import Generator
from model.reward import AlignmentReward, rank_batches, rank_matrix


@dataclass(kw_only=True, slots=True)
class EvidenceTools:
    """What gathering evidence runs: the model under test and its judges."""

    generator: Generator
    evaluator: Evaluator
    reward: AlignmentReward
    rewriter: Rewriter
    scarcity: ScarcityProbe | None = None
    rarity: Callable[[Sequence[str]], list[float | None]] | None = None
    """Per prompt, :attr:`Evidence.concept_rarity` (the corpus' tag counts)."""
    seed: int = 0
    """Noise seed of the rewrite test's first batch."""
    batch_size: int = 32

    def __call__(self, views: Sequence[CaseView]) -> list[Evidence]:
        """The evidence of each view (what :func:`~flywheel.attribution.service.
        attribute_open_cases` gathers with)."""
        return gather_evidence(views, self)


def _scene_score(scene: BenchmarkCase, image: Tensor, evaluator: Evaluator) -> tuple[float, bool]:
    result = score_case(scene, image, evaluator=evaluator)
    return result.score, result.passed


def gather_evidence(views: Sequence[CaseView], tools: EvidenceTools) -> list[Evidence]:
    """The :class:`Evidence` of each case, in order (batched generation and scoring; no
    batch of one, whose ranks would say nothing)."""
    out: list[Evidence] = []
    for k, batch in enumerate(rank_batches(len(views), tools.batch_size)):
        out += _gather_batch([views[i] for i in batch], tools, seed=tools.seed + k)
    return out


def _gather_batch(views: list[CaseView], tools: EvidenceTools, *, seed: int) -> list[Evidence]:
    prompts = [v.prompt for v in views]
    rewritten = tools.rewriter(prompts)
    # Editing cases have no input image here: no generation, the rewrite test is skipped.
    drawn = [i for i, v in enumerate(views) if v.task == Task.TEXT_TO_IMAGE]
    references = [rewritten[i] for i in drawn]
    original: dict[int, Tensor] = {}
    again: dict[int, Tensor] = {}
    before: list[float] = []
    after: list[float] = []
    if drawn:
        images = tools.generator.generate([prompts[i] for i in drawn], seed=seed).cpu()
        original = {i: images[n] for n, i in enumerate(drawn)}
        before = rank_matrix(tools.reward, images, references).diagonal().tolist()
        after = before
        if any(rewritten[i] != prompts[i] for i in drawn):
            # The same seed and batch positions as the originals: each case keeps its noise,
            # so the gain is the rewritten prompt's alone.
            redrawn = tools.generator.generate(references, seed=seed).cpu()
            again = {i: redrawn[n] for n, i in enumerate(drawn) if rewritten[i] != prompts[i]}
            after = rank_matrix(tools.reward, redrawn, references).diagonal().tolist()
    scarcity = tools.scarcity(rewritten) if tools.scarcity is not None else None
    rarity = tools.rarity(rewritten) if tools.rarity is not None else [None] * len(views)
    out = []
    for i, view in enumerate(views):
        n = drawn.index(i) if i in original else -1
        own_rank = before[n] if n >= 0 else 0.5
        if n < 0:  # editing: nothing generated
            score, new_score, new_pass, scored_by = 0.0, 0.0, False, "none"
        elif view.scene is not None:
            scene = BenchmarkCase.model_validate(view.scene)
            score, _ = _scene_score(scene, original[i], tools.evaluator)
            new_score, new_pass = (
                _scene_score(scene, again[i], tools.evaluator) if i in again else (score, False)
            )
            scored_by = "evaluator"
        else:
            score, new_score = own_rank, after[n]
            new_pass = i in again and new_score >= 1.0
            scored_by = "reward"
        out.append(
            Evidence(
                rewritten_prompt=rewritten[i],
                rewrite_changed=rewritten[i] != prompts[i],
                scored_by=scored_by,
                score_original=score,
                score_rewritten=new_score,
                rewrite_gain=new_score - score if i in again else 0.0,
                rewrite_fixed=new_pass,
                scarcity=scarcity[i][0] if scarcity is not None else None,
                nearest_corpus=scarcity[i][1] if scarcity is not None else [],
                concept_rarity=rarity[i],
                reward_rank=own_rank,
                skill=view.skill,
                sources=dict(view.sources),
                negative_feedback=view.negative_feedback,
                flags=sorted(set(view.flags)),
                editing=n < 0,
            )
        )
    return out

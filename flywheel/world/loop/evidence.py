"""The embedded world's evidence tools: the rewrite test (the general colour lexicon's
rewrite, :mod:`flywheel.world.lexicon`, drawn again and judged by the world's evaluator for
cases that carry their intended scene, else by the reward's rank), scarcity over the world
corpus' index, the reward-human disagreement per slice, and the concept rarity of its tags
(for the reviewer, not a classifier feature) (the features are
:class:`~flywheel.attribution.evidence.Evidence`, the same a team's stack fills through its
ports in :mod:`flywheel.attribution.stack_evidence`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from flywheel.attribution.evidence import (
    CaseView,
    Evidence,
    Rarity,
    Rewriter,
    ScarcityProbe,
    with_slice_disagreement,
)
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
    rarity: Rarity | None = None
    """Per prompt, :attr:`Evidence.concept_rarity` (the corpus' tag counts)."""
    term_rarity: Rarity | None = None
    """Per prompt, :attr:`Evidence.term_rarity` (the corpus captions' words)."""
    seed: int = 0
    """Noise seed of the rewrite test's first batch."""
    rewrite_seeds: int = 3
    """Noise seeds a changed prompt's rewrite test draws both prompts at (the failing
    image's own and ``rewrite_seeds - 1`` more, where a batch has two changed prompts or
    more): its gain is the mean score's, its fix a majority's — one draw of a generator that
    draws a colour right half the time says little."""
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
    return with_slice_disagreement(out)


EXTRA_SEED_STRIDE = 100_003
"""Seed offset between a rewrite test's draws (batches use consecutive seeds)."""


def _gather_batch(views: list[CaseView], tools: EvidenceTools, *, seed: int) -> list[Evidence]:
    prompts = [v.prompt for v in views]
    rewritten = tools.rewriter(prompts)
    # What the model was given: the app's rewrite where there was one (the failure as served).
    served = [v.served_prompt or v.prompt for v in views]
    # Editing cases have no input image here: no generation, the rewrite test is skipped.
    drawn = [i for i, v in enumerate(views) if v.task == Task.TEXT_TO_IMAGE]
    references = [rewritten[i] for i in drawn]
    original: dict[int, Tensor] = {}
    before: list[float] = []
    # Per changed case, its draws: (image from its prompt, image from the rewrite, the
    # reward's rank of each under the rewrite), at the failing image's seed and more.
    draws: dict[int, list[tuple[Tensor, Tensor, float, float]]] = {}
    if drawn:
        images = tools.generator.generate([served[i] for i in drawn], seed=seed).cpu()
        original = {i: images[n] for n, i in enumerate(drawn)}
        before = rank_matrix(tools.reward, images, references).diagonal().tolist()
        changed = [n for n, i in enumerate(drawn) if rewritten[i] != served[i]]
        if changed:
            # The failing image's own seed and batch positions: each case keeps its noise, so
            # the gain is the rewritten prompt's alone.
            redrawn = tools.generator.generate(references, seed=seed).cpu()
            after = rank_matrix(tools.reward, redrawn, references).diagonal().tolist()
            for n in changed:
                draws[drawn[n]] = [(images[n], redrawn[n], before[n], after[n])]
        # More seeds, the changed cases alone (both prompts at the same positions).
        subset = [references[n] for n in changed]
        for extra in range(1, tools.rewrite_seeds if len(changed) > 1 else 1):
            draw_seed = seed + extra * EXTRA_SEED_STRIDE
            again = tools.generator.generate(
                [served[drawn[n]] for n in changed], seed=draw_seed
            ).cpu()
            fixed = tools.generator.generate(subset, seed=draw_seed).cpu()
            ranks_before = rank_matrix(tools.reward, again, subset).diagonal().tolist()
            ranks_after = rank_matrix(tools.reward, fixed, subset).diagonal().tolist()
            for k, n in enumerate(changed):
                draws[drawn[n]].append((again[k], fixed[k], ranks_before[k], ranks_after[k]))
    scarcity = tools.scarcity(rewritten) if tools.scarcity is not None else None
    rarity = tools.rarity(rewritten) if tools.rarity is not None else [None] * len(views)
    scarce_terms = (
        tools.term_rarity(rewritten) if tools.term_rarity is not None else [None] * len(views)
    )
    out = []
    for i, view in enumerate(views):
        n = drawn.index(i) if i in original else -1
        own_rank = before[n] if n >= 0 else 0.5
        tried = draws.get(i, [])
        if n < 0:  # editing: nothing generated
            score, new_score, new_pass, scored_by = 0.0, 0.0, False, "none"
        elif view.scene is not None:
            scene = BenchmarkCase.model_validate(view.scene)
            if tried:  # its first draw is the failing image itself
                judged = [
                    (
                        _scene_score(scene, a, tools.evaluator),
                        _scene_score(scene, b, tools.evaluator),
                    )
                    for a, b, _, _ in tried
                ]
                score = sum(a[0] for a, _ in judged) / len(judged)
                new_score = sum(b[0] for _, b in judged) / len(judged)
                new_pass = 2 * sum(b[1] for _, b in judged) > len(judged)
            else:
                score, _ = _scene_score(scene, original[i], tools.evaluator)
                new_score, new_pass = score, False
            scored_by = "evaluator"
        else:
            score = new_score = own_rank
            new_pass = False
            if tried:
                score = sum(r for _, _, r, _ in tried) / len(tried)
                new_score = sum(r for _, _, _, r in tried) / len(tried)
                new_pass = 2 * sum(r >= 1.0 for _, _, _, r in tried) > len(tried)
            scored_by = "reward"
        out.append(
            Evidence(
                rewritten_prompt=rewritten[i],
                rewrite_changed=rewritten[i] != served[i],
                scored_by=scored_by,
                score_original=score,
                score_rewritten=new_score,
                rewrite_gain=new_score - score if tried else 0.0,
                rewrite_fixed=new_pass,
                scarcity=scarcity[i][0] if scarcity is not None else None,
                nearest_corpus=scarcity[i][1] if scarcity is not None else [],
                term_rarity=scarce_terms[i],
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

"""The evidence behind a routing decision, gathered per failure case.

- **Rewrite test**: the case's prompt is rewritten by a strong rewriter (the world's
  :func:`~flywheel.world.vocabulary.reference_rewrite`; a large LLM in production). Where
  that changes the prompt, both prompts are generated and scored against the rewritten one —
  by the ground-truth evaluator when the case carries its intended scene, else by the reward
  model (the image's rank against the other rewritten prompts of the batch). A large gain
  says the model could draw it when asked the right way: a prompt-enhancer problem.
- **Scarcity** of the rewritten prompt in the training corpus (:mod:`retrieval.scarcity`):
  a concept the corpus barely has is a pretraining gap. Embedding density alone is weak
  where one word makes the difference ("purple square" sits among "blue square"s), so the
  **concept rarity** (the tag count of the rarest concept the prompt names, over the median
  concept's) is asked too.
- **Reward agreement**: the rank the reward model gives the failing image (generated from
  the case's prompt) under its rewritten prompt against the batch's other prompts. A failure
  the reward ranks high is one the reward cannot see — reward and humans (or the evaluator)
  disagree: a reward / RL problem.
- **Signal metadata**: which sources reported it, negative feedback, flags, the skill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, JsonValue
from qdrant_client import QdrantClient
from torch import Tensor

from flywheel.db.models import Task
from model.pipeline import Generator
from model.reward import AlignmentReward, rank_batches, rank_matrix
from retrieval.embedding import TextEmbedder
from retrieval.scarcity import Calibration, ScarcityConfig, diagnose

if TYPE_CHECKING:  # the world's evaluator judges world scenes: imported when one is judged
    from flywheel.world.benchmark import BenchmarkCase
    from flywheel.world.evaluator import Evaluator

FLAGS = ("text_wrong", "artifact", "ignored_instruction", "wrong_count", "wrong_color", "other")
"""The feedback flags the API accepts (features one by one)."""

Rewriter = Callable[[list[str]], list[str]]


@dataclass(kw_only=True, slots=True)
class CaseView:
    """What attribution reads of one failure case."""

    case_id: int | None
    """The ``failure_cases`` row (None: an example of the labeled set)."""
    task: Task
    prompt: str
    skill: str | None = None
    scene: BenchmarkCase | None = None
    """The intended scene, when an evaluator verdict came with the case (evaluation samples,
    probe hits): the rewrite test then asks the evaluator."""
    sources: dict[str, int] = field(default_factory=dict)
    """Linked signals per source (``evaluation``, ``feedback``, ``mining``)."""
    negative_feedback: int = 0
    """Thumbs down and low ratings among them."""
    flags: tuple[str, ...] = ()
    spec: dict[str, JsonValue] | None = None
    """What the case asked for, structured (a team's judge spec from a signal's
    ``details["spec"]``; the world's intended scene is :attr:`scene`): the judge port reads it
    in the rewrite test on a team's stack."""


class Evidence(BaseModel):
    """The features of one case (stored with its route)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rewritten_prompt: str
    rewrite_changed: bool
    scored_by: str
    """``evaluator`` or ``reward``: who scored the rewrite test (``none``: editing, skipped)."""
    score_original: float
    """Score of the image generated from the case's prompt (0..1)."""
    score_rewritten: float
    """Score of the image generated from the rewritten prompt (= original when unchanged)."""
    rewrite_gain: float
    rewrite_fixed: bool
    """The rewritten prompt's image passes (evaluator) or ranks first (reward)."""
    scarcity: float | None
    """Of the rewritten prompt (None: no corpus index to ask)."""
    nearest_corpus: list[str]
    """The corpus captions nearest to the rewritten prompt."""
    concept_rarity: float | None = None
    """Corpus count of the rarest concept the rewritten prompt names, over the median
    concept's (tag counts: 1 is ordinary, near 0 is a gap; None: it names none, or no
    index)."""
    reward_rank: float
    """Share of the batch's other rewritten prompts the failing image scores below its own
    rewritten prompt under the reward (1: the reward sees nothing wrong; 0.5: no other
    prompt to compare with)."""
    skill: str | None
    sources: dict[str, int]
    negative_feedback: int
    flags: list[str]
    editing: bool


@dataclass(kw_only=True, slots=True)
class ScarcityProbe:
    """Scarcity of prompts in an indexed corpus."""

    client: QdrantClient
    calibration: Calibration
    embedder: TextEmbedder
    config: ScarcityConfig

    def __call__(self, prompts: list[str]) -> list[tuple[float, list[str]]]:
        """Per prompt: scarcity in [0, 1] and the nearest corpus captions."""
        found = diagnose(self.client, self.calibration, self.embedder.embed(prompts), self.config)
        return [(d.scarcity, [n.text or "" for n in d.neighbours[:3]]) for d in found]


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


def _scene_score(scene: BenchmarkCase, image: Tensor, evaluator: Evaluator) -> tuple[float, bool]:
    from flywheel.world.evaluation import score_case

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
            score, _ = _scene_score(view.scene, original[i], tools.evaluator)
            new_score, new_pass = (
                _scene_score(view.scene, again[i], tools.evaluator)
                if i in again
                else (score, False)
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

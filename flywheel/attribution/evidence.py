"""The evidence behind a routing decision, gathered per failure case — counterfactual
evidence, measured, never read off how a track's label is defined.

- **Rewrite test**: the case's prompt is rewritten by a strong rewriter (the project's
  enhancer on a team's stack; in the embedded world a general colour lexicon,
  :mod:`flywheel.world.lexicon`, that knows no world's file). Where that changes the prompt
  the model was given (the app's rewrite of the user's words where feedback says so,
  :attr:`CaseView.served_prompt`), both are generated at the same noise and judged (a
  team's judge; the world's evaluator when the case carries its intended scene, else the
  reward's rank). A large gain says the model could draw it when asked the right way: a
  prompt-enhancer problem.
- **Scarcity** of the rewritten prompt in the training corpus (:mod:`retrieval.scarcity`):
  embedding density over the corpus index, and the **term rarity** (:func:`term_rarity`: the
  share of corpus captions holding the prompt's rarest word, every word alike; embedding
  density alone hardly moves when one word makes the difference, "purple square" among "blue
  square"s): a concept the corpus barely has is a pretraining gap. (The **concept rarity** of
  the corpus' tags is kept for the reviewer and the cold-start rules, not as a classifier
  feature: in the world the tags are what define the gap.)
- **Reward-human disagreement**: the rank the reward model gives the failing image (generated
  from the case's prompt) under its rewritten prompt against the batch's other prompts, and
  per slice (:func:`slice_of`: the cases of one skill, or of one feedback flag) its mean over
  the slice's failures. Every case is a failure humans (or the evaluator) saw; a slice the
  reward ranks high is one the reward cannot see: a reward / RL problem.
- **Signal metadata**: which sources reported it, negative feedback, flags.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, JsonValue
from qdrant_client import QdrantClient

from flywheel.db.models import Task
from retrieval.embedding import TextEmbedder
from retrieval.index import CORPUS, count_terms, terms
from retrieval.scarcity import Calibration, ScarcityConfig, diagnose

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
    served_prompt: str | None = None
    """The prompt the model was given where the app rewrote :attr:`prompt` (its enhancer: a
    feedback signal's ``details["served_prompt"]``): the rewrite test draws it to reproduce
    the failure. None: the model was given :attr:`prompt`."""
    skill: str | None = None
    scene: dict[str, JsonValue] | None = None
    """The intended scene as its signal carried it (``details["spec"]["case"]``: the embedded
    world's evaluation samples and probe hits), for the world's evaluator to judge against."""
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
    term_rarity: float | None = None
    """Corpus captions containing the rewritten prompt's rarest term, over the median term's
    (:func:`term_rarity`; None: no index)."""
    concept_rarity: float | None = None
    """Corpus count of the rarest concept the rewritten prompt names, over the median
    concept's (tag counts: 1 is ordinary, near 0 is a gap; None: it names none, or no
    index)."""
    reward_rank: float
    """Share of the batch's other rewritten prompts the failing image scores below its own
    rewritten prompt under the reward (1: the reward sees nothing wrong; 0.5: no other
    prompt to compare with)."""
    slice_disagreement: float | None = None
    """Mean :attr:`reward_rank` of the failing cases gathered with this one in its slice
    (:func:`slice_of`), shrunk toward 0.5 by :data:`SLICE_PRIOR` pseudo-cases (None: editing,
    nothing drawn)."""
    skill: str | None
    sources: dict[str, int]
    negative_feedback: int
    flags: list[str]
    editing: bool


Rarity = Callable[[Sequence[str]], list[float | None]]
"""Per prompt, a rarity in the corpus (None: nothing to say)."""


def term_rarity(client: QdrantClient, collection: str, *, dataset: str | None = None) -> Rarity:
    """Term scarcity of a prompt in the corpus index's own text: how many train-split
    (``corpus``) captions contain the prompt's rarest term, over the median term's count — about
    1 for ordinary words, near 0 for a word the corpus barely has (0: never). Every term counts
    alike (no list of concepts, no tags); the counts are read once, now. None for a prompt
    without terms, or an index without text."""
    counts = count_terms(client, collection, CORPUS, dataset=dataset)
    median = statistics.median(counts.values()) if counts else 0.0

    def rarity(prompts: Sequence[str]) -> list[float | None]:
        out: list[float | None] = []
        for prompt in prompts:
            found = terms(prompt)
            out.append(min(counts[t] for t in found) / median if found and median else None)
        return out

    return rarity


SLICE_PRIOR = 2.0
"""Pseudo-cases at rank 0.5 a slice's mean disagreement is shrunk with (a slice of one case
says little)."""


def slice_of(skill: str | None, flags: Sequence[str]) -> str:
    """The slice a failure is pooled in for the reward-human disagreement: its skill
    (``skill:count``), else its first flag (``flag:wrong_color``), else ``unlabelled``."""
    if skill:
        return f"skill:{skill}"
    if flags:
        return f"flag:{sorted(flags)[0]}"
    return "unlabelled"


def with_slice_disagreement(evidence: Sequence[Evidence]) -> list[Evidence]:
    """``evidence`` with :attr:`Evidence.slice_disagreement` filled: per slice, the mean
    reward rank of its drawn cases, shrunk toward 0.5 by :data:`SLICE_PRIOR` pseudo-cases."""
    ranks: dict[str, list[float]] = {}
    for item in evidence:
        if not item.editing:
            ranks.setdefault(slice_of(item.skill, item.flags), []).append(item.reward_rank)
    means = {k: (sum(v) + 0.5 * SLICE_PRIOR) / (len(v) + SLICE_PRIOR) for k, v in ranks.items()}
    return [
        item
        if item.editing
        else item.model_copy(update={"slice_disagreement": means[slice_of(item.skill, item.flags)]})
        for item in evidence
    ]


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

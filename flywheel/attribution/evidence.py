"""The evidence behind a routing decision, gathered per failure case.

- **Rewrite test**: the case's prompt is rewritten by a strong rewriter (the project's
  enhancer on a team's stack; the world's reference rewriter in the embedded world). Where
  that changes the prompt, both prompts are generated and judged (a team's judge; the
  world's evaluator when the case carries its intended scene, else the reward's rank). A
  large gain says the model could draw it when asked the right way: a prompt-enhancer
  problem.
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

from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, JsonValue
from qdrant_client import QdrantClient

from flywheel.db.models import Task
from retrieval.embedding import TextEmbedder
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

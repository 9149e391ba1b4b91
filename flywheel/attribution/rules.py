"""Attribution from a cold start: rules that route cases until people have taught a
classifier.

A team arrives with no labelled attribution examples. The :class:`RuleRouter` reads the
evidence the ports give (:mod:`flywheel.attribution.stack_evidence`) and routes by three
rules, each pointing at the track that can fix what it sees:

- ``rule:rewrite`` — the rewrite fixes it: the enhanced prompt's image passes the judge and
  gains at least ``rewrite_gain`` over the original's → ``prompt_enhancer``;
- ``rule:scarce`` — the corpus lacks it: the concept rarity is at most ``rarity_below``, or
  the rewritten prompt's scarcity at least ``scarcity_above`` → ``pretraining_gap``;
- ``rule:reward`` — the reward disagrees with people: someone disliked the image (negative
  feedback, a flag, a failing evaluator / miner verdict reported it, or the judge gives the
  re-drawn image under half its score) while the reward ranks it at least
  ``reward_rank_above`` under its own prompt → ``rl``.

**Margins.** Each rule measures how far past its threshold the evidence is, in [-1, 1]: for
a value ``v`` that must reach ``t`` from below (gain, scarcity, reward rank),
``(v - t) / (1 - t)`` once past it and ``(v - t) / t`` short of it; for one that must stay
under ``t`` (concept rarity), ``(t - v) / t`` and ``(t - v) / (1 - t)``; clipped to
[-1, 1]. ``rule:scarce`` takes the larger of its two tests' margins (an unknown value:
-1). A rule whose condition does not hold (no changed rewrite that passes; nobody disliked
it) is at most half-way off: ``(min(m, 0) - 1) / 2``.

**Confidence** (``c``, ``t_c`` = ``min_confidence``):

- one rule fires (margin ``m >= 0``): ``c = t_c + (1 - t_c) * m`` — at its threshold a rule
  just routes, far past it ``c`` nears 1;
- several fire: the largest margin ``m1`` wins, lowered by the runner-up ``m2``:
  ``c = t_c + (1 - t_c) * (m1 - m2 - min_lead) / (1 - min_lead)`` — below ``t_c`` (human
  triage) unless it leads by at least ``min_lead``, and always lower than ``m1`` alone would
  give;
- none fires: the nearest rule's track (the largest, negative, margin ``m``) with
  ``c = t_c * (1 + m)``, below ``t_c``: the case waits for triage with the rules' best guess.

Confidence is monotone in the winning margin. ``Decision.probabilities`` are the margins
shifted to [0, 2] and normalized — a ranking of the tracks, not calibrated probabilities.
No rule reads how a label is defined: the rules read the evidence alone, and a human's route
never becomes a feature.

:func:`cold_start_router` hands over to the classifier
(:func:`~flywheel.attribution.classifier.fit_classifier` on the human triage decisions
alone, :func:`~flywheel.attribution.service.override_examples`) once every track has
``min_human_per_track`` of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from sqlalchemy.orm import Session

from flywheel.attribution.classifier import (
    TRACKS,
    ClassifierConfig,
    Decision,
    TrackClassifier,
    fit_classifier,
)
from flywheel.attribution.evidence import Evidence
from flywheel.attribution.service import override_examples
from flywheel.db.models import Track

REWRITE = "rule:rewrite"
SCARCE = "rule:scarce"
REWARD = "rule:reward"
RULES: tuple[tuple[str, Track], ...] = (
    (REWRITE, Track.PROMPT_ENHANCER),
    (SCARCE, Track.PRETRAINING_GAP),
    (REWARD, Track.RL),
)
"""The rules in order (a tie of margins goes to the earlier one) and the track of each."""

COLD_START_REF = "rules:cold-start"
"""``case_routes.decider_ref`` of the rules' decisions."""


@dataclass(kw_only=True, slots=True)
class RuleRouterConfig:
    """The cold-start rules' thresholds, and when the classifier takes over."""

    rewrite_gain: float = 0.2
    """``rule:rewrite``: the least judge-score gain of the rewritten prompt's image (which
    must also pass). 0.2 is a fifth of the judge's scale: one element of a five-element
    prompt turned from wrong to right."""
    scarcity_above: float = 0.7
    """``rule:scarce``: the least scarcity of the rewritten prompt in the corpus (0.5 is the
    corpus' median density; on the world's corpus a rare concept sits at 0.70, a common one
    at 0.56-0.60 — embedding density alone is a weak test, hence the rarity below)."""
    rarity_below: float = 0.25
    """``rule:scarce``: the most concept rarity (the rarest named tag's corpus count over its
    family's median): a quarter of an ordinary concept's count. The world's rare colour has
    below 0.1, its common ones near 1."""
    reward_rank_above: float = 0.6
    """``rule:reward``: the least rank the reward gives a disliked image under its own prompt
    among the batch's prompts (0.5 is chance: above it the reward sees nothing wrong)."""
    min_confidence: float = 0.6
    """Below this a case waits for human triage (the classifier's default too)."""
    min_lead: float = 0.1
    """When several rules fire, the margin the winner needs over the runner-up to be routed
    without a human."""
    min_human_per_track: int = 8
    """Human triage decisions per track before the classifier takes over from the rules.

    Measured on the world's labeled set (the classifier fitted on ``n`` random examples per
    track of seed band 70M, 20 draws each, scored on 72 held-out cases of band 80M), macro-F1
    mean (worst draw): 0.64 (0.30) at 2, 0.87 (0.76) at 4, 0.96 (0.91) at 6, 0.96 (0.86) at
    8, 0.97 (0.94) at 10, 0.97 (0.96) at 12 — the rules alone score 0.70 on the same cases.
    8 (24 decisions in all) is past the point where the mean settles above the 0.9 goal, with
    two to spare, and the least at which each of the classifier's 5 calibration folds holds
    out an example of every track while training on at least 6 of each."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        inside = (self.rewrite_gain, self.scarcity_above, self.rarity_below)
        if not all(0.0 < v < 1.0 for v in (*inside, self.reward_rank_above, self.min_lead)):
            raise ValueError(
                "RuleRouterConfig: rewrite_gain, scarcity_above, rarity_below, "
                "reward_rank_above and min_lead must be in (0, 1)"
            )
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError("RuleRouterConfig: min_confidence must be in [0, 1]")
        if self.min_human_per_track < 2:
            raise ValueError("RuleRouterConfig: min_human_per_track must be >= 2")


def _above(value: float, threshold: float) -> float:
    """Margin of ``value`` that must reach ``threshold`` from below, in [-1, 1]."""
    room = 1.0 - threshold if value >= threshold else threshold
    return max(-1.0, min(1.0, (value - threshold) / room))


def _below(value: float, threshold: float) -> float:
    """Margin of ``value`` that must stay at most ``threshold``, in [-1, 1]."""
    room = threshold if value <= threshold else 1.0 - threshold
    return max(-1.0, min(1.0, (threshold - value) / room))


def _unmet(margin: float) -> float:
    """A rule whose condition fails: at least half-way off, in [-1, -0.5]."""
    return (min(margin, 0.0) - 1.0) / 2.0


def disliked(evidence: Evidence) -> bool:
    """Someone said the image is wrong: negative feedback or a flag from a user, an
    evaluator's or miner's failing verdict that reported the case, or the judge re-judging
    the case's image (the rewrite test) giving it under half its score."""
    sources = evidence.sources
    return (
        evidence.negative_feedback > 0
        or bool(evidence.flags)
        or sources.get("evaluation", 0) > 0
        or sources.get("mining", 0) > 0
        or (evidence.scored_by in ("judge", "evaluator") and evidence.score_original < 0.5)
    )


def margins(evidence: Evidence, config: RuleRouterConfig) -> dict[str, float]:
    """Each rule's margin (see the module docstring): >= 0 fires."""
    gain = _above(max(evidence.rewrite_gain, 0.0), config.rewrite_gain)
    rewrite = (
        gain
        if evidence.rewrite_changed and evidence.rewrite_fixed and not evidence.editing
        else _unmet(gain)
    )
    scarce = max(
        _below(evidence.concept_rarity, config.rarity_below)
        if evidence.concept_rarity is not None
        else -1.0,
        _above(evidence.scarcity, config.scarcity_above) if evidence.scarcity is not None else -1.0,
    )
    rank = _above(evidence.reward_rank, config.reward_rank_above)
    reward = rank if disliked(evidence) and not evidence.editing else _unmet(rank)
    # Rounded: margins equal but for float noise are a tie, settled by the rules' order.
    return {REWRITE: round(rewrite, 9), SCARCE: round(scarce, 9), REWARD: round(reward, 9)}


@dataclass(kw_only=True, slots=True)
class RuleRouter:
    """The cold-start router: :data:`RULES` over the evidence, with a confidence from how
    far past its threshold the evidence is (the interface of
    :class:`~flywheel.attribution.classifier.TrackClassifier` that
    :func:`~flywheel.attribution.service.attribute_open_cases` uses)."""

    config: RuleRouterConfig = field(default_factory=RuleRouterConfig)
    examples: dict[str, int] = field(default_factory=dict)
    """Labeled examples it learnt from: none (rules learn nothing)."""
    human_decisions: dict[str, int] = field(default_factory=dict)
    """Human triage decisions so far per track (when :func:`cold_start_router` built it):
    how far the classifier's hand-over is."""
    decider_ref: ClassVar[str] = COLD_START_REF

    def __post_init__(self) -> None:
        self.config.validate()

    def decide(self, evidence: Sequence[Evidence]) -> list[Decision]:
        """A :class:`~flywheel.attribution.classifier.Decision` per case; ``rule`` names the
        winning (or, below ``min_confidence``, the nearest) rule."""
        return [self._decide(e) for e in evidence]

    def _decide(self, evidence: Evidence) -> Decision:
        config = self.config
        floor = config.min_confidence
        found = margins(evidence, config)
        # Largest margin first; a tie keeps the rules' order.
        ranked = sorted(RULES, key=lambda rule: -found[rule[0]])
        (rule, track), best = ranked[0], found[ranked[0][0]]
        runner_up = found[ranked[1][0]]
        if best < 0.0:
            confidence = floor * (1.0 + best)
        elif runner_up < 0.0:
            confidence = floor + (1.0 - floor) * best
        else:
            lead = (best - runner_up - config.min_lead) / (1.0 - config.min_lead)
            confidence = floor + (1.0 - floor) * lead
        confidence = max(0.0, min(1.0, confidence))
        # Not calibrated: the margins shifted to [0, 2] and normalized (the winner's largest).
        weights = {t.value: 1.0 + found[name] for name, t in RULES}
        total = sum(weights.values())
        probabilities = {
            name: (w / total if total > 0 else 1.0 / len(weights)) for name, w in weights.items()
        }
        return Decision(track=track, confidence=confidence, probabilities=probabilities, rule=rule)


def cold_start_router(
    session: Session,
    config: RuleRouterConfig | None = None,
    classifier: ClassifierConfig | None = None,
) -> RuleRouter | TrackClassifier:
    """The router attribution should use now: the classifier fitted on the human triage
    decisions alone once every track has ``config.min_human_per_track`` of them (its
    ``min_confidence`` the rules'), else the :class:`RuleRouter`."""
    config = config or RuleRouterConfig()
    config.validate()
    examples = override_examples(session)
    counts = Counter(track.value for _, track in examples)
    if all(counts[t.value] >= config.min_human_per_track for t in TRACKS):
        return fit_classifier(
            examples, classifier or ClassifierConfig(min_confidence=config.min_confidence)
        )
    return RuleRouter(config=config, human_decisions={t.value: counts[t.value] for t in TRACKS})

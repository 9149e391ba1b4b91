"""The track classifier: evidence in, a track with a calibrated confidence out.

A multinomial logistic regression over the :class:`~flywheel.attribution.evidence.Evidence`
features (standardized), its probabilities calibrated by Platt scaling on held-out folds
(scikit-learn's ``CalibratedClassifierCV``). It is fitted from labeled examples — the labeled
set drawn from the world's injected weaknesses plus every human override — each time
attribution runs: a few hundred rows fit in milliseconds, so there is no model file to keep
in step with the examples.

Rules come first where the evidence is decisive: a rewrite that fixes the failure (the
rewritten prompt's image passes and gains ≥ ``rewrite_gain``) is a prompt-enhancer case
whatever else holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from flywheel.attribution.evidence import FLAGS, Evidence
from flywheel.db.models import Track

TRACKS: tuple[Track, ...] = (Track.RL, Track.PRETRAINING_GAP, Track.PROMPT_ENHANCER)

FEATURES: tuple[str, ...] = (
    "rewrite_gain",
    "rewrite_fixed",
    "scarcity",
    "scarcity_known",
    "term_rarity",
    "term_known",
    "reward_rank",
    "slice_disagreement",
    "from_evaluation",
    "from_feedback",
    "from_mining",
    "negative_feedback",
    "editing",
    *(f"flag_{f}" for f in FLAGS),
)
"""The classifier's inputs, in column order: counterfactual and measured evidence only. Not
among them, because each restates how a track's label is defined rather than measuring
anything: whether the rewriter changed the prompt (it changes exactly the words it knows),
the concept rarity of the corpus' tags (the tags that define a gap) and the case's skill (in
the world, which skills the reward cannot see is the RL label's definition)."""


def features(evidence: Evidence) -> list[float]:
    """One row of :data:`FEATURES`."""
    sources = evidence.sources
    return [
        evidence.rewrite_gain,
        float(evidence.rewrite_fixed),
        evidence.scarcity if evidence.scarcity is not None else 0.5,
        float(evidence.scarcity is not None),
        min(evidence.term_rarity, 2.0) if evidence.term_rarity is not None else 1.0,
        float(evidence.term_rarity is not None),
        evidence.reward_rank,
        evidence.slice_disagreement if evidence.slice_disagreement is not None else 0.5,
        float(sources.get("evaluation", 0) > 0),
        float(sources.get("feedback", 0) > 0),
        float(sources.get("mining", 0) > 0),
        float(evidence.negative_feedback > 0),
        float(evidence.editing),
        *(float(f in evidence.flags) for f in FLAGS),
    ]


@dataclass(kw_only=True, slots=True)
class ClassifierConfig:
    """How the classifier is fitted and when a decision is trusted."""

    regularization: float = 1.0
    """Inverse L2 strength ``C`` of the logistic regression."""
    folds: int = 5
    """Calibration folds (fewer when a track has fewer examples)."""
    min_confidence: float = 0.6
    """Below this the case waits for human triage."""
    rewrite_gain: float = 0.5
    """The rewrite rule's minimum gain."""
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.regularization <= 0 or self.folds < 2:
            raise ValueError("ClassifierConfig: regularization > 0 and folds >= 2")
        if not 0.0 <= self.min_confidence <= 1.0 or not 0.0 < self.rewrite_gain <= 1.0:
            raise ValueError("ClassifierConfig: min_confidence in [0, 1], rewrite_gain in (0, 1]")


class Decision(BaseModel):
    """The route of one case and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    track: Track
    confidence: float
    probabilities: dict[str, float]
    """The classifier's calibrated probability per track."""
    rule: str | None
    """The decisive rule that chose the track, if one did."""


class NotEnoughExamplesError(ValueError):
    """The labeled examples cannot fit a classifier."""


@dataclass(kw_only=True, slots=True)
class TrackClassifier:
    """A fitted classifier and its config."""

    model: CalibratedClassifierCV
    config: ClassifierConfig
    examples: dict[str, int]
    """Examples per track it was fitted on."""

    def probabilities(self, evidence: Sequence[Evidence]) -> np.ndarray:
        """``(N, 3)`` calibrated probabilities in :data:`TRACKS` order."""
        rows = np.array([features(e) for e in evidence], dtype=np.float64)
        raw = self.model.predict_proba(rows)
        order = [list(self.model.classes_).index(t.value) for t in TRACKS]
        return np.asarray(raw[:, order])

    def decide(self, evidence: Sequence[Evidence]) -> list[Decision]:
        """A :class:`Decision` per case: a decisive rule's, else the most probable track."""
        if not evidence:
            return []
        out = []
        for e, row in zip(evidence, self.probabilities(evidence), strict=True):
            probabilities = {t.value: float(p) for t, p in zip(TRACKS, row, strict=True)}
            rule = decisive_rule(e, self.config)
            if rule is not None:
                out.append(
                    Decision(
                        track=rule[0], confidence=1.0, probabilities=probabilities, rule=rule[1]
                    )
                )
                continue
            best = int(np.argmax(row))
            out.append(
                Decision(
                    track=TRACKS[best],
                    confidence=float(row[best]),
                    probabilities=probabilities,
                    rule=None,
                )
            )
        return out


def decisive_rule(evidence: Evidence, config: ClassifierConfig) -> tuple[Track, str] | None:
    """The track a rule settles, with the rule's words, or None."""
    if (
        evidence.rewrite_changed
        and evidence.rewrite_fixed
        and evidence.rewrite_gain >= config.rewrite_gain
    ):
        return Track.PROMPT_ENHANCER, (
            f"the rewritten prompt fixes it (gain {evidence.rewrite_gain:.2f} >= "
            f"{config.rewrite_gain:g})"
        )
    return None


def fit_classifier(
    examples: Sequence[tuple[Evidence, Track]], config: ClassifierConfig | None = None
) -> TrackClassifier:
    """Fit on labeled examples; every track needs at least two."""
    config = config or ClassifierConfig()
    config.validate()
    counts = Counter(track.value for _, track in examples)
    short = [t.value for t in TRACKS if counts[t.value] < 2]
    if short:
        raise NotEnoughExamplesError(
            f"need at least 2 labeled examples of every track; too few of {', '.join(short)} "
            f"(have {dict(counts)})"
        )
    rows = np.array([features(e) for e, _ in examples], dtype=np.float64)
    labels = np.array([t.value for _, t in examples])
    folds = min(config.folds, min(counts.values()))
    base = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=config.regularization, max_iter=1000, random_state=config.seed),
    )
    model = CalibratedClassifierCV(
        base,
        method="sigmoid",
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed),
    )
    model.fit(rows, labels)
    return TrackClassifier(model=model, config=config, examples=dict(counts))


class TrackScores(BaseModel):
    """Precision, recall and F1 of one track."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: float
    recall: float
    f1: float
    support: int


class AttributionMetrics(BaseModel):
    """How well decisions match known tracks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tracks: dict[str, TrackScores]
    macro_f1: float
    accuracy: float
    calibration_error: float
    """Expected calibration error of the confidences (10 bins)."""
    cases: int


def measure(decisions: Sequence[Decision], truth: Sequence[Track]) -> AttributionMetrics:
    """Per-track precision / recall / F1, macro-F1, accuracy and calibration error."""
    if len(decisions) != len(truth) or not truth:
        raise ValueError("need one decision per labeled case, and at least one case")
    predicted = [d.track.value for d in decisions]
    actual = [t.value for t in truth]
    labels = [t.value for t in TRACKS]
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=labels, zero_division=0
    )
    correct = np.array([p == a for p, a in zip(predicted, actual, strict=True)], dtype=float)
    confidence = np.array([d.confidence for d in decisions])
    bins = np.minimum((confidence * 10).astype(int), 9)
    error = sum(
        abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
        for b in range(10)
        if (bins == b).any()
    )
    return AttributionMetrics(
        tracks={
            label: TrackScores(precision=float(p), recall=float(r), f1=float(f), support=int(s))
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        macro_f1=float(np.mean(f1)),
        accuracy=float(correct.mean()),
        calibration_error=float(error),
        cases=len(truth),
    )

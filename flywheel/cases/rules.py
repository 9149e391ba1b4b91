"""Per-source rules that make a failure out of a signal.

A signal is a failure when

- **evaluation** (an evaluation sample): it did not pass, or its ``overall`` score is below
  ``evaluation_threshold``;
- **feedback**: a thumbs down, a rating of at most ``rating_at_most``, or any flag
  (pairwise preferences and free comments are not failures by themselves: the RL track reads
  the pairs directly);
- **mining** (a miner hit): always — the miner only emits what it judged bad.

The same rules exist twice, on purpose: as a SQL condition (:func:`failure_condition`, so
that only failures are read from a large ``signals`` table) and as a readable reason per
signal (:func:`failure_reason`, stored as the case's evidence). A test checks they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, Float, and_, func, or_

from flywheel.db.models import Signal, SignalKind, SignalSource


@dataclass(kw_only=True, slots=True)
class FailureRules:
    """When a signal is a failure."""

    evaluation_threshold: float = 0.5
    """An evaluation sample whose ``overall`` score is below this fails (as one that did not
    pass)."""
    rating_at_most: int = 2
    """A rating (1..5) at most this is a failure."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if not 0.0 <= self.evaluation_threshold <= 1.0:
            raise ValueError("FailureRules.evaluation_threshold must be in [0, 1]")
        if not 1 <= self.rating_at_most <= 5:
            raise ValueError("FailureRules.rating_at_most must be in 1..5")


def failure_condition(rules: FailureRules) -> ColumnElement[bool]:
    """The rules as a SQL condition on ``signals``."""
    overall = Signal.scores["overall"].astext.cast(Float)
    return or_(
        and_(
            Signal.source == SignalSource.EVALUATION,
            or_(Signal.passed.is_(False), overall < rules.evaluation_threshold),
        ),
        and_(
            Signal.source == SignalSource.FEEDBACK,
            or_(
                and_(Signal.kind == SignalKind.THUMBS, Signal.thumbs_up.is_(False)),
                and_(Signal.kind == SignalKind.RATING, Signal.rating <= rules.rating_at_most),
                func.coalesce(func.cardinality(Signal.flags), 0) > 0,
            ),
        ),
        Signal.source == SignalSource.MINING,
    )


def failure_reason(signal: Signal, rules: FailureRules) -> str | None:
    """Why ``signal`` is a failure, in a few words, or None when it is not one."""
    if signal.source == SignalSource.EVALUATION:
        overall = (signal.scores or {}).get("overall")
        if signal.passed is False:
            score = f" (overall {overall:.2f})" if overall is not None else ""
            return f"evaluation: not passed{score}"
        if overall is not None and overall < rules.evaluation_threshold:
            return f"evaluation: overall {overall:.2f} < {rules.evaluation_threshold:g}"
        return None
    if signal.source == SignalSource.MINING:
        return "mining hit"
    reasons = []
    if signal.kind == SignalKind.THUMBS and signal.thumbs_up is False:
        reasons.append("thumbs down")
    rating = signal.rating if signal.kind == SignalKind.RATING else None
    if rating is not None and rating <= rules.rating_at_most:
        reasons.append(f"rating {rating}")
    if signal.flags:
        reasons.append("flags: " + ", ".join(signal.flags))
    return "feedback: " + "; ".join(reasons) if reasons else None

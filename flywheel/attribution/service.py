"""Routing failure cases to tracks, human triage and overrides.

:func:`attribute_open_cases` reads open cases in batches, gathers their evidence with no
transaction open (minutes of generation hold no row lock), then locks the cases that are
still open and records a model route per case with its evidence and probabilities — a case
a human or another router settled meanwhile is left as it is. A case decided with at least
``min_confidence`` becomes ``routed``; one below waits for human triage
(``awaiting_triage``, with a ``triage_case`` review item holding the evidence).

The evidence and the decision are the caller's: ``gather`` is the stack's (a team's
ports: :func:`~flywheel.attribution.stack_evidence.gather_stack_evidence`; the embedded
world's tools: :class:`~flywheel.world.loop.evidence.EvidenceTools`); the router is a
fitted :class:`~flywheel.attribution.classifier.TrackClassifier` or, before enough human
decisions exist, the cold-start rules (:mod:`flywheel.attribution.rules`) — any
:class:`Router`.

:func:`override_route` records a human's route (``decided_by = human``) — for a case in
triage or one the model routed — settles its pending triage items, and from then on the
case is a labeled example: :func:`override_examples` hands every human route, with the
features of the model route it overrode, to the next fit (:func:`routing_classifier`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError
from sqlalchemy.orm import Session

from flywheel.attribution import repository
from flywheel.attribution.classifier import (
    ClassifierConfig,
    Decision,
    TrackClassifier,
    fit_classifier,
)
from flywheel.attribution.evidence import CaseView, Evidence
from flywheel.cases.rules import FailureRules
from flywheel.db.models import (
    CaseRoute,
    CaseStatus,
    Decider,
    FailureCase,
    ReviewStatus,
    Signal,
    SignalKind,
    SignalSource,
    Track,
)
from flywheel.review import repository as review_repository
from flywheel.signals.service import served_prompt


class CaseNotFoundError(LookupError):
    """No failure case has that id."""


class CaseClosedError(ValueError):
    """The case is fixed, dismissed or in a training round: its route can no longer change."""


Gather = Callable[[Sequence[CaseView]], list[Evidence]]
"""The evidence of each case view, in order."""


class RouterSettings(Protocol):
    """What :func:`attribute_open_cases` reads of a router's config."""

    @property
    def min_confidence(self) -> float:
        """Below this a case waits for human triage."""
        ...


class Router(Protocol):
    """Evidence in, a :class:`~flywheel.attribution.classifier.Decision` per case out: a
    fitted :class:`~flywheel.attribution.classifier.TrackClassifier`, or the cold-start
    :class:`~flywheel.attribution.rules.RuleRouter`."""

    @property
    def config(self) -> RouterSettings: ...

    @property
    def examples(self) -> dict[str, int]:
        """Labeled examples per track it learnt from (none for rules)."""
        ...

    def decide(self, evidence: Sequence[Evidence]) -> list[Decision]: ...


class AttributionReport(BaseModel):
    """What one :func:`attribute_open_cases` call did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cases: int
    """Cases this call routed or sent to triage."""
    routed: dict[str, int]
    """Cases routed per track (confidence at least the threshold)."""
    awaiting_triage: int
    by_rule: int
    """Of the routed, those a decisive rule settled."""
    seconds: float


def _spec(signals: Sequence[Signal]) -> dict[str, JsonValue] | None:
    """The first signal's judge spec that is not the world's ``{"case": scene}`` form."""
    for signal in signals:
        details = signal.details if isinstance(signal.details, dict) else {}
        spec = details.get("spec")
        if isinstance(spec, dict) and not isinstance(spec.get("case"), dict):
            return dict(spec)
    return None


def _scene(signals: Sequence[Signal]) -> dict[str, JsonValue] | None:
    """The intended scene the first signal carries (the world's ``{"case": scene}`` spec)."""
    for signal in signals:
        if _world_scene(signal):
            details = signal.details
            assert isinstance(details, dict)
            spec = details["spec"]
            assert isinstance(spec, dict)
            case = spec["case"]
            assert isinstance(case, dict)
            return dict(case)
    return None


def _world_scene(signal: Signal) -> bool:
    details = signal.details if isinstance(signal.details, dict) else {}
    spec = details.get("spec")
    return isinstance(spec, dict) and isinstance(spec.get("case"), dict)


def _negative(signal: Signal) -> bool:
    if signal.source != SignalSource.FEEDBACK:
        return False
    if signal.kind == SignalKind.THUMBS:
        return signal.thumbs_up is False
    rating_at_most = FailureRules().rating_at_most
    return signal.kind == SignalKind.RATING and (signal.rating or 5) <= rating_at_most


def case_views(session: Session, cases: Sequence[FailureCase]) -> list[CaseView]:
    """What attribution reads of each case: prompt, task, skill, the intended scene (from an
    evaluated signal) or a team's judge spec, signals per source, negative feedback and
    flags."""
    signals = repository.case_signals(session, case_ids=[c.id for c in cases])
    views = []
    for case in cases:
        mine = signals.get(case.id, [])
        views.append(
            CaseView(
                case_id=case.id,
                task=case.task,
                prompt=case.prompt,
                # What the model was given, as the first signal that says so has it.
                served_prompt=next(filter(None, map(served_prompt, mine)), None),
                skill=case.skill,
                scene=_scene(mine),
                spec=_spec(mine),
                sources=dict(Counter(s.source.value for s in mine)),
                negative_feedback=sum(_negative(s) for s in mine),
                flags=tuple(sorted({f for s in mine for f in (s.flags or [])})),
            )
        )
    return views


def _route_evidence(evidence: Evidence, decision: Decision) -> dict[str, object]:
    return {
        "features": evidence.model_dump(mode="json"),
        "probabilities": decision.probabilities,
        "rule": decision.rule,
    }


def _decider_ref(classifier: Router, decision: Decision, reference: str) -> str:
    """Who decided: a router's own name for its rule decisions (the cold-start rules:
    ``rules:cold-start``), a classifier's decisive rewrite rule, else the classifier."""
    if decision.rule is None:
        return reference
    own = getattr(classifier, "decider_ref", None)
    return own if isinstance(own, str) else "rule:rewrite"


def attribute_open_cases(
    session: Session,
    *,
    gather: Gather,
    classifier: Router,
    limit: int | None = None,
    batch_size: int = 64,
) -> AttributionReport:
    """Route open cases (see the module docstring), the evidence from ``gather`` (the
    stack's: :func:`~flywheel.attribution.stack_evidence.gather_stack_evidence` on a
    project's ports, the world's tools in the embedded world); commits batch by batch."""
    started = time.perf_counter()
    routed: Counter[str] = Counter()
    triage = by_rule = total = 0
    threshold = classifier.config.min_confidence
    reference = f"classifier:{sum(classifier.examples.values())}-examples"
    after_id = 0
    while limit is None or total < limit:
        take = batch_size if limit is None else min(batch_size, limit - total)
        cases = repository.open_cases(session, limit=take, after_id=after_id)
        if not cases:
            break
        after_id = cases[-1].id
        views = case_views(session, cases)
        session.rollback()  # no transaction (and no lock) while the evidence is gathered
        evidence = gather(views)
        decisions = classifier.decide(evidence)
        locked = repository.lock_still_open(session, case_ids=[v.case_id or 0 for v in views])
        for view, found, decision in zip(views, evidence, decisions, strict=True):
            case = locked.get(view.case_id or 0)
            if case is None:  # routed by someone else meanwhile
                continue
            payload = _route_evidence(found, decision)
            repository.add_route(
                session,
                case_id=case.id,
                track=decision.track,
                confidence=decision.confidence,
                evidence=payload,
                decided_by=Decider.MODEL,
                decider_ref=_decider_ref(classifier, decision, reference),
                reason=decision.rule,
            )
            if decision.confidence >= threshold:
                case.status = CaseStatus.ROUTED
                routed[decision.track.value] += 1
                by_rule += decision.rule is not None
            else:
                case.status = CaseStatus.AWAITING_TRIAGE
                triage += 1
                review_repository.add_triage_item(
                    session,
                    case=case,
                    title=(
                        f"Route case {case.id}: {decision.track.value}? "
                        f"(confidence {decision.confidence:.2f} < {threshold:g})"
                    ),
                    artefact={"case_id": case.id, "prompt": case.prompt, **payload},
                )
            total += 1
        session.commit()
    return AttributionReport(
        cases=total,
        routed=dict(routed),
        awaiting_triage=triage,
        by_rule=by_rule,
        seconds=time.perf_counter() - started,
    )


_CHANGEABLE = (CaseStatus.OPEN, CaseStatus.ROUTED, CaseStatus.AWAITING_TRIAGE)


def override_route(
    session: Session, *, case_id: int, track: Track, reviewer: str, reason: str | None = None
) -> CaseRoute:
    """Record ``reviewer``'s route for the case and settle its triage (commits)."""
    if not reviewer.strip():
        raise ValueError("the reviewer must be named")
    case = repository.get_case(session, case_id=case_id, lock=True)
    if case is None:
        raise CaseNotFoundError(f"no failure case {case_id}")
    if case.status not in _CHANGEABLE:
        raise CaseClosedError(
            f"case {case_id} is {case.status.value}: only open, routed or awaiting-triage "
            "cases can be routed"
        )
    previous = repository.latest_route(session, case_id=case_id)
    evidence: dict[str, object] = {"overrides_route": previous.id if previous else None}
    if previous is not None and isinstance(previous.evidence, dict):
        evidence["features"] = previous.evidence.get("features")
        if previous.decided_by == Decider.MODEL:
            evidence["model_track"] = previous.track.value
    route = repository.add_route(
        session,
        case_id=case_id,
        track=track,
        confidence=1.0,
        evidence=evidence,
        decided_by=Decider.HUMAN,
        decider_ref=reviewer,
        reason=reason,
    )
    case.status = CaseStatus.ROUTED
    now = datetime.now(UTC)
    for item in review_repository.pending_triage(session, case_id=case_id):
        review_repository.decide_item(
            session,
            item=item,
            status=ReviewStatus.APPROVED,
            actor=reviewer,
            reason=reason,
            at=now,
            edits={"track": track.value},
        )
    session.commit()
    return route


def override_examples(session: Session) -> list[tuple[Evidence, Track]]:
    """Every case's newest human route as a labeled example (the features of the model
    route it overrode; a human route without one has no features and is left out)."""
    out = []
    for human, model in repository.human_routes(session):
        source = human.evidence if isinstance(human.evidence, dict) else {}
        features = source.get("features")
        if features is None and model is not None and isinstance(model.evidence, dict):
            features = model.evidence.get("features")
        if not isinstance(features, dict):
            continue
        try:
            out.append((Evidence.model_validate(features), human.track))
        except ValidationError:
            continue
    return out


def routing_classifier(
    session: Session,
    seed_examples: Sequence[tuple[Evidence, Track]],
    config: ClassifierConfig | None = None,
) -> TrackClassifier:
    """The classifier fitted on the seed examples plus every human override."""
    return fit_classifier([*seed_examples, *override_examples(session)], config)

"""Signals -> failure cases.

:func:`collect_failures` reads the signals that :mod:`flywheel.cases.rules` calls failures
and that no case holds yet, in batches (oldest first), and files each under a case:

- its **deduplication key**: task, the prompt normalized (case, spacing, closing
  punctuation) and the model version — the same prompt failing on the same model is one
  case however many signals report it;
- failing that, an open case showing the **same image** (SHA-256) takes it;
- failing that, with ``prompts`` (:class:`flywheel.cases.near.CasePrompts`), an open case
  whose prompt is a **near-duplicate** (embedding similarity >= its threshold, same task
  and model version) takes it;
- else a new open case (its skill: the signal's first score other than ``overall``, as
  ``flywheel eval`` writes them).

Each link is written once (a signal belongs to one case; ``ON CONFLICT DO NOTHING``), the
case counts it and widens its first / last seen times, and a batch is committed before the
next is read: a rerun, or a collector running beside this one, links nothing twice.
Themed clusters come next (issue 7).
"""

from __future__ import annotations

import hashlib
import re

from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from flywheel.cases import repository
from flywheel.cases.near import CasePrompts
from flywheel.cases.rules import FailureRules, failure_condition, failure_reason
from flywheel.db.models import Signal, Task

_SPACES = re.compile(r"\s+")


class CollectReport(BaseModel):
    """What one :func:`collect_failures` call did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    signals_linked: int
    """Failing signals filed under a case by this call."""
    cases_created: int
    merged_by_image: int
    """Of the linked signals, those filed under another prompt's case by their image."""
    merged_by_prompt: int
    """Of the linked signals, those filed under a case whose prompt they nearly repeat."""
    reasons: dict[str, int]
    """Linked signals per kind of reason (``evaluation``, ``feedback``, ``mining hit``)."""


def normalized_prompt(prompt: str) -> str:
    """Case-folded, whitespace collapsed, closing punctuation dropped."""
    return _SPACES.sub(" ", prompt.casefold()).strip().rstrip(".!?;,").strip()


def dedup_key(task: Task, prompt: str, model_version_id: int | None) -> str:
    """The case a failure of ``prompt`` on that model version belongs to."""
    text = f"{task.value}\0{normalized_prompt(prompt)}\0{model_version_id}"
    return hashlib.sha256(text.encode()).hexdigest()


def signal_skill(signal: Signal) -> str | None:
    """The skill an evaluation sample scored (its first score key other than ``overall``)."""
    return next((name for name in (signal.scores or {}) if name != "overall"), None)


def collect_failures(
    session: Session,
    *,
    rules: FailureRules | None = None,
    prompts: CasePrompts | None = None,
    batch_size: int = 500,
) -> CollectReport:
    """File every failing signal that no case holds under its case (see the module doc)."""
    rules = rules or FailureRules()
    rules.validate()
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    condition = failure_condition(rules)
    linked = created = by_image = by_prompt = 0
    reasons: dict[str, int] = {}
    after = 0
    while True:
        batch = repository.failing_unlinked_signals(
            session, condition=condition, after_id=after, limit=batch_size
        )
        if not batch:
            return CollectReport(
                signals_linked=linked,
                cases_created=created,
                merged_by_image=by_image,
                merged_by_prompt=by_prompt,
                reasons=reasons,
            )
        vectors = prompts.embed([s.prompt for s in batch]) if prompts is not None else None
        for row, signal in enumerate(batch):
            reason = failure_reason(signal, rules)
            if reason is None:  # the SQL and Python rules disagree: a bug, not data
                raise AssertionError(f"signal {signal.id} matched the SQL rules only")
            key = dedup_key(signal.task, signal.prompt, signal.model_version_id)
            seen = signal.occurred_at or signal.received_at
            case_id = repository.case_id_by_key(session, dedup_key=key)
            if case_id is None and signal.image_sha256 is not None:
                case_id = repository.open_case_id_by_image(
                    session, image_sha256=signal.image_sha256
                )
                by_image += case_id is not None
            if case_id is None and prompts is not None and vectors is not None:
                near = prompts.near(
                    vectors[row], task=signal.task, model_version_id=signal.model_version_id
                )
                case_id = repository.first_open_case(session, case_ids=near)
                by_prompt += case_id is not None
            if case_id is None:
                case_id = repository.insert_case(
                    session,
                    dedup_key=key,
                    task=signal.task,
                    prompt=signal.prompt,
                    image_uri=signal.image_uri,
                    image_sha256=signal.image_sha256,
                    model_version_id=signal.model_version_id,
                    skill=signal_skill(signal),
                    seen_at=seen,
                )
                created += 1
                if prompts is not None and vectors is not None:
                    prompts.add(
                        case_id,
                        vectors[row],
                        task=signal.task,
                        model_version_id=signal.model_version_id,
                    )
            if repository.link_signal(session, case_id=case_id, signal_id=signal.id, seen_at=seen):
                linked += 1
                kind = reason.split(":")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
        session.commit()
        after = batch[-1].id

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
case counts it and widens its first / last seen times (at the end of the batch, in case-id
order), and a batch is committed before the next is read: a rerun, or a collector running
beside this one, links nothing twice; a batch that deadlocks with another collector is read
again. New cases' prompt embeddings go to ``prompts`` after their batch commits.
Themed clusters come next (issue 7).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from psycopg.errors import DeadlockDetected
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from flywheel.cases import repository
from flywheel.cases.near import CasePrompts
from flywheel.cases.rules import FailureRules, failure_condition, failure_reason
from flywheel.db.models import Signal, Task
from retrieval.embedding import Vectors

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
    """The skill an evaluation sample scored: ``details.skill`` as ``POST /v1/evaluations``
    stores it, else its only score other than ``overall``."""
    if isinstance(signal.details, dict) and isinstance(signal.details.get("skill"), str):
        return str(signal.details["skill"])
    others = [name for name in (signal.scores or {}) if name != "overall"]
    return others[0] if len(others) == 1 else None


@dataclass(slots=True)
class _Tally:
    linked: int = 0
    created: int = 0
    by_image: int = 0
    by_prompt: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, other: _Tally) -> None:
        self.linked += other.linked
        self.created += other.created
        self.by_image += other.by_image
        self.by_prompt += other.by_prompt
        for kind, n in other.reasons.items():
            self.reasons[kind] = self.reasons.get(kind, 0) + n


def collect_failures(
    session: Session,
    *,
    rules: FailureRules | None = None,
    prompts: CasePrompts | None = None,
    batch_size: int = 500,
    attempts: int = 3,
) -> CollectReport:
    """File every failing signal that no case holds under its case (see the module doc).

    A batch that loses a deadlock to a concurrent collector is rolled back and read again
    (up to ``attempts`` times); prompt embeddings of new cases are stored in ``prompts`` only
    after their batch has committed."""
    rules = rules or FailureRules()
    rules.validate()
    if batch_size < 1 or attempts < 1:
        raise ValueError("batch_size and attempts must be >= 1")
    condition = failure_condition(rules)
    total = _Tally()
    after = 0
    while True:
        for attempt in range(attempts):
            batch = repository.failing_unlinked_signals(
                session, condition=condition, after_id=after, limit=batch_size
            )
            if not batch:
                return CollectReport(
                    signals_linked=total.linked,
                    cases_created=total.created,
                    merged_by_image=total.by_image,
                    merged_by_prompt=total.by_prompt,
                    reasons=total.reasons,
                )
            try:
                tally, new_cases = _file_batch(session, batch, rules, prompts)
                session.commit()
                break
            except OperationalError as error:
                session.rollback()
                if not isinstance(error.orig, DeadlockDetected) or attempt == attempts - 1:
                    raise
        total.add(tally)
        if prompts is not None:
            for case_id, vector, signal in new_cases:
                prompts.add(
                    case_id, vector, task=signal.task, model_version_id=signal.model_version_id
                )
        after = batch[-1].id


def _file_batch(
    session: Session, batch: Sequence[Signal], rules: FailureRules, prompts: CasePrompts | None
) -> tuple[_Tally, list[tuple[int, Vectors, Signal]]]:
    """File one batch (uncommitted): the tally, and the new cases' prompt embeddings."""
    tally = _Tally()
    new_cases: list[tuple[int, Vectors, Signal]] = []
    counts: dict[int, list[datetime]] = {}
    vectors = prompts.embed([s.prompt for s in batch]) if prompts is not None else None
    for row, signal in enumerate(batch):
        reason = failure_reason(signal, rules)
        if reason is None:  # the SQL and Python rules disagree: a bug, not data
            raise AssertionError(f"signal {signal.id} matched the SQL rules only")
        key = dedup_key(signal.task, signal.prompt, signal.model_version_id)
        seen = signal.occurred_at or signal.received_at
        how = "key"
        case_id = repository.case_id_by_key(session, dedup_key=key)
        if case_id is None and signal.image_sha256 is not None:
            case_id = repository.open_case_id_by_image(session, image_sha256=signal.image_sha256)
            how = "image"
        # Cases this batch opened are not in ``prompts`` yet: look among them first.
        if case_id is None and prompts is not None and vectors is not None:
            mine = [c for c, v, s in new_cases if s.task == signal.task
                    and s.model_version_id == signal.model_version_id
                    and float(v @ vectors[row]) >= prompts.threshold]  # fmt: skip
            near = mine or prompts.near(
                vectors[row], task=signal.task, model_version_id=signal.model_version_id
            )
            case_id = repository.first_open_case(session, case_ids=near)
            how = "prompt"
        if case_id is None:
            case_id, created = repository.insert_case(
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
            how = "new"
            if created:
                tally.created += 1
                if vectors is not None:
                    new_cases.append((case_id, vectors[row], signal))
        if repository.link_signal(session, case_id=case_id, signal_id=signal.id):
            counts.setdefault(case_id, []).append(seen)
            tally.linked += 1
            tally.by_image += how == "image"
            tally.by_prompt += how == "prompt"
            kind = reason.split(":")[0]
            tally.reasons[kind] = tally.reasons.get(kind, 0) + 1
    # Counts last, in case order: concurrent collectors lock case rows in one order.
    for case_id in sorted(counts):
        repository.count_signals(session, case_id=case_id, seen=counts[case_id])
    return tally, new_cases

"""The miners: each looks for failures of one model version and stores them as
``mining_hit`` signals.

- targeted mining of the embedded world's probes (its ground-truth evaluator judges them)
  lives with the world: :func:`flywheel.world.loop.mining.mine_probes`, built on the
  pieces here (:func:`store_png`, :func:`hit`, :func:`store_hits`, :func:`chunks`).
- :func:`scan_generations`: stored generations (signals with an image that are not
  failures by the :class:`~flywheel.cases.rules.FailureRules`) scored by the reward
  model against the other prompts of their chunk (each against the prompt the model was
  given: feedback's ``served_prompt`` where the app rewrote the user's, kept in the hit's
  details); a hit when the image's own prompt beats
  fewer than ``min_rank`` of them. Measured on four sets of 64 renders of world scenes, 8 of
  each captioned as another scene: 0.65 caught 24 of the 32 swaps with no false alarm among
  the 224 correct pairs (0.75: 29 of 32, 5 % false alarms). Images are read only through
  the image policy (:func:`~flywheel.media.access.image_policy`): one it refuses is never
  read, and the report (and the log) names it with the reason.
- :func:`mine_near_duplicates`: stored signals that are not failures but whose prompt lies
  within the near-duplicate threshold of a known failure case (neither fixed nor
  dismissed; retrieval over the ``failure_cases`` collection): likely the same failure.

Every hit's event id is derived from what was mined
(``probe:<version>:<case>:<seed>:<chunk>``: seed and chunk size set the noise;
``scan:<signal id>``; ``near:<signal id>``), so a miner run twice — or a task delivered
twice — stores each hit once (the unique ``(app, event_id)`` index), and image files are
content-addressed (``<sha256>.png``): a re-run never changes what a stored hit points at.
Each chunk commits before the next starts; a run cut short keeps what it committed.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from sqlalchemy import func, not_, select
from sqlalchemy.orm import Session
from torch import Tensor

from flywheel.cases.near import CasePrompts
from flywheel.cases.rules import FailureRules, failure_condition
from flywheel.db.models import (
    CaseSignal,
    CaseStatus,
    FailureCase,
    Signal,
    SignalKind,
    SignalSource,
    Task,
)
from flywheel.media.access import ImagePolicy, ImageReadError, ImageRefused, image_policy
from flywheel.ports import RewardModel
from flywheel.signals import repository
from flywheel.signals.repository import NewSignal
from flywheel.signals.service import SERVED_PROMPT, canonical_json, served_prompt
from model.reward import AlignmentReward, rank_batches, ranks_from_scores
from training.io import atomic_write_bytes

MINER_APP = "miner"
"""The app every mining hit is stored under."""

Sessions = Callable[[], Session]
log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class MiningReport:
    """What one miner run looked at and found."""

    miner: str
    examined: int = 0
    """Images (or signals) looked at."""
    hits: int = 0
    """Failures found."""
    stored: int = 0
    """Hits this run stored (the rest were stored before: a replay)."""
    last_signal_id: int | None = None
    """Scans: the highest signal id examined (the next scan starts after it)."""
    hit_event_ids: list[str] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    """Scans: (signal id, why) of the images the image policy refuses: skipped, never read."""
    unreadable: list[tuple[int, str]] = field(default_factory=list)
    """Scans: (signal id, why) of allowed images that could not be read (gone, not images)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (what a task returns)."""
        return {
            "miner": self.miner,
            "examined": self.examined,
            "hits": self.hits,
            "stored": self.stored,
            "last_signal_id": self.last_signal_id,
            "hit_event_ids": list(self.hit_event_ids),
            "refused": [{"signal_id": i, "reason": why} for i, why in self.refused],
            "unreadable": [{"signal_id": i, "reason": why} for i, why in self.unreadable],
        }


# ---- shared pieces ----------------------------------------------------------------------------


def store_png(image: Tensor, directory: Path) -> tuple[str, str]:
    """Write ``image`` (3, H, W) in [0, 1] as ``<sha256>.png`` under ``directory`` (atomically,
    fsynced; an existing file of that name already holds these bytes); its URI and SHA-256."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = directory / f"{digest}.png"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return path.resolve().as_uri(), digest


def hit(
    *,
    event_id: str,
    version_id: int | None,
    task: Task,
    prompt: str,
    image: tuple[str, str | None] | None,
    scores: dict[str, float],
    details: dict[str, Any],
) -> NewSignal:
    payload = {
        "event_id": event_id,
        "prompt": prompt,
        "image": {"uri": image[0], "sha256": image[1]} if image else None,
        "scores": scores,
        "details": details,
    }
    payload_json, digest = canonical_json(payload)
    return NewSignal(
        source=SignalSource.MINING,
        kind=SignalKind.MINING_HIT,
        app=MINER_APP,
        event_id=event_id,
        task=task,
        prompt=prompt,
        image_uri=image[0] if image else None,
        image_sha256=image[1] if image else None,
        model_version_id=version_id,
        passed=False,
        scores=scores,
        details=details,
        payload_json=payload_json,
        payload_sha256=digest,
    )


def store_hits(sessions: Sessions, hits: Sequence[NewSignal], report: MiningReport) -> None:
    report.hits += len(hits)
    report.hit_event_ids += [h.event_id for h in hits]
    if not hits:
        return
    with sessions() as session:
        report.stored += len(repository.insert_signals(session, signals=hits))
        session.commit()


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---- scanning stored generations --------------------------------------------------------------


def _unmined(after_id: int, rules: FailureRules) -> Any:
    return (
        select(Signal)
        .where(
            Signal.id > after_id,
            Signal.source != SignalSource.MINING,
            # A signal the rules cannot decide (SQL NULL) is not a failure either.
            not_(func.coalesce(failure_condition(rules), False)),
        )
        .order_by(Signal.id)
    )


def scan_generations(
    sessions: Sessions,
    *,
    reward: AlignmentReward | RewardModel,
    after_id: int = 0,
    limit: int = 256,
    chunk: int = 64,
    min_rank: float = 0.65,
    rules: FailureRules | None = None,
    policy: ImagePolicy | None = None,
) -> MiningReport:
    """Score up to ``limit`` stored generations after signal ``after_id`` with ``reward``
    (see the module docstring; ``chunk`` generations are ranked together). Images are read
    through ``policy`` (default: the policy in force); one it refuses, or that cannot be
    read, is skipped and listed in the report with the reason."""
    if not 0.0 < min_rank <= 1.0:
        raise ValueError(f"min_rank must be in (0, 1], got {min_rank}")
    rules = rules or FailureRules()
    policy = policy or image_policy()
    report = MiningReport(miner="scan", last_signal_id=after_id)
    with sessions() as session:
        query = _unmined(after_id, rules).where(Signal.image_uri.is_not(None)).limit(limit)
        signals = list(session.scalars(query))
    if len(signals) < 2:  # a rank needs another prompt: wait for more generations
        return report
    for batch in rank_batches(len(signals), chunk):
        part = [signals[i] for i in batch]
        found: list[tuple[Signal, Tensor]] = []
        for signal in part:
            try:
                found.append((signal, _tensor(policy.read_image(signal.image_uri or ""))))
            except ImageRefused as refused:
                report.refused.append((signal.id, str(refused)))
                log.warning("scan: signal %d: image refused: %s", signal.id, refused)
            except ImageReadError as error:
                report.unreadable.append((signal.id, str(error)))
                log.info("scan: signal %d: image unreadable: %s", signal.id, error)
        report.last_signal_id = part[-1].id
        if len(found) < 2:  # images gone: nothing to rank this one against
            continue
        report.examined += len(found)
        # Each image against the prompt the model was given (the app's rewrite, if any).
        served = [served_prompt(s) or s.prompt for s, _ in found]
        scores = _scores(reward, [t for _, t in found], served)  # (B, B)
        own = scores.diagonal()
        ranks = ranks_from_scores(scores).diagonal().tolist()
        hits = [
            hit(
                event_id=f"scan:{signal.id}",
                version_id=signal.model_version_id,
                task=signal.task,
                prompt=signal.prompt,
                image=(signal.image_uri or "", signal.image_sha256),
                scores={"reward": float(own[i]), "reward_rank": rank},
                details={"miner": "scan", "signal_id": signal.id, "skill": _skill(signal)}
                | ({SERVED_PROMPT: served[i]} if served[i] != signal.prompt else {}),
            )
            for i, ((signal, _), rank) in enumerate(zip(found, ranks, strict=True))
            if rank < min_rank
        ]
        store_hits(sessions, hits, report)
    return report


def _tensor(image: Image.Image) -> Tensor:
    """(3, H, W) float in [0, 1] of a decoded image."""
    rgb = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return rgb.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255


def _scores(
    reward: AlignmentReward | RewardModel, images: Sequence[Tensor], prompts: Sequence[str]
) -> Tensor:
    """Scores (B, B) of every image (its own size) under every prompt: an open_clip reward
    in one pass; any other reward (a port) image by image."""
    with torch.no_grad():
        if isinstance(reward, AlignmentReward):
            pixels = torch.cat([reward.preprocess(t.unsqueeze(0)) for t in images])
            image_emb = reward.encode_preprocessed(pixels)  # (B, D)
            text_emb = reward.encode_text(reward.tokenize(list(prompts)))
            return reward.scale * image_emb @ text_emb.T
        rows = [
            reward.score(image.unsqueeze(0).expand(len(prompts), -1, -1, -1), list(prompts))
            for image in images
        ]
        return torch.stack([r.float().reshape(-1) for r in rows])


def _skill(signal: Signal) -> str | None:
    skill = (signal.details or {}).get("skill") if isinstance(signal.details, dict) else None
    return skill if isinstance(skill, str) else None


# ---- near-duplicates of known failures --------------------------------------------------------


def mine_near_duplicates(
    sessions: Sessions,
    *,
    prompts: CasePrompts,
    after_id: int = 0,
    limit: int = 1024,
    rules: FailureRules | None = None,
) -> MiningReport:
    """Store a hit for every signal after ``after_id`` (up to ``limit``) that is not a failure
    but lies within ``prompts.threshold`` of a known failure case (neither fixed nor dismissed)
    of its task and version."""
    rules = rules or FailureRules()
    report = MiningReport(miner="near", last_signal_id=after_id)
    with sessions() as session:
        linked = select(CaseSignal.signal_id).where(CaseSignal.signal_id == Signal.id).exists()
        signals = list(session.scalars(_unmined(after_id, rules).where(~linked).limit(limit)))
    if not signals:
        return report
    report.examined = len(signals)
    report.last_signal_id = signals[-1].id
    vectors = prompts.embed([s.prompt for s in signals])
    candidates: dict[int, list[int]] = {}
    for signal, vector in zip(signals, vectors, strict=True):
        near = prompts.near(vector, task=signal.task, model_version_id=signal.model_version_id)
        if near:
            candidates[signal.id] = near
    if not candidates:
        return report
    with sessions() as session:
        wanted = {i for ids in candidates.values() for i in ids}
        known_cases = set(
            session.scalars(
                select(FailureCase.id).where(
                    FailureCase.id.in_(wanted),
                    FailureCase.status.not_in([CaseStatus.FIXED, CaseStatus.DISMISSED]),
                )
            )
        )
    hits = []
    for signal in signals:
        matches = [i for i in candidates.get(signal.id, []) if i in known_cases]
        if not matches:
            continue
        image = (signal.image_uri, signal.image_sha256) if signal.image_uri else None
        hits.append(
            hit(
                event_id=f"near:{signal.id}",
                version_id=signal.model_version_id,
                task=signal.task,
                prompt=signal.prompt,
                image=image,
                scores={},
                details={
                    "miner": "near",
                    "signal_id": signal.id,
                    "near_case": matches[0],
                    "skill": _skill(signal),
                },
            )
        )
    store_hits(sessions, hits, report)
    return report

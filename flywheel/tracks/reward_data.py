"""The RL track's artefact on the ports: preference pairs and the reward's agreement with people.

From the routed cases' own feedback (:class:`~flywheel.tracks.routed.CaseFeedback`):

- **pairwise** feedback (a chosen and a rejected image) is a preference pair as it stands;
- **thumbs and ratings** become labelled comparisons: a liked image (thumbs up, rating >= 4)
  against a disliked one (thumbs down, rating <= 2) of the same prompt, or, where a prompt
  has only one side, of the same theme (then under the disliked image's prompt). Within a
  group the liked and the disliked images are each shuffled (seeded) and paired in turn until
  every one of the larger side is used once. Ratings of 3 and comments count for nothing. A
  vote names its feedback's image, else its case's.

A comparison's **category** is the first flag of its (disliked) feedback, else its case's
first flag, else the case's theme, else ``default``; its **source** is ``pairwise``, or the
disliked image's feedback kind (``thumbs`` / ``rating``).

**Agreement.** Both images of each pair are read through the project's image policy
(:meth:`flywheel.media.access.ImagePolicy.read_image`, the only way an app's URI is read),
converted to ``(3, H, W)`` tensors in [0, 1] (the rejected image resized to the chosen one's
size), and scored by the project's reward under the pair's prompt; the reward agrees when the
preferred image scores strictly higher. A pair with an image the policy refuses or cannot
read is skipped — neither scored nor written — and the image listed with its reason.
Per category with at least ``min_comparisons`` scored pairs: ``agreement`` (share the reward
gets right) and the reward's **trust** ``max(0, agreement - 0.5) * 2`` (0 at chance or worse,
1 when it always agrees): the weight recalibration gives the reward in that category.

Files, in ``out_dir``: ``preferences.jsonl`` (one :class:`PreferencePair` a line: what a
``diffusion_dpo`` round trains on, ``artefacts.preferences``) and ``artefact.json``
(:class:`RewardArtefact`).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from flywheel.media.access import ImagePolicy, ImageReadError, ImageRefused
from flywheel.parts import Parts
from flywheel.ports import RewardAgreement
from flywheel.tracks.routed import CaseFeedback, RoutedCase
from training.io import atomic_write_text

PREFERENCES_FILE = "preferences.jsonl"
"""The preference pairs, one JSON object a line."""
ARTEFACT_FILE = "artefact.json"
"""The :class:`RewardArtefact`, for the review queue."""
DEFAULT_CATEGORY = "default"
"""The category of a comparison with no flag and no theme."""
_CACHED_IMAGES = 64
"""Decoded images kept while scoring (an image may be in several pairs)."""

Source = Literal["pairwise", "thumbs", "rating"]


@dataclass(kw_only=True, slots=True)
class RewardDataConfig:
    """What :func:`build_reward_data` measures."""

    min_comparisons: int = 4
    """Scored comparisons a category needs for its agreement (and weight) to be reported."""
    seed: int = 0
    """Seed of how liked and disliked images of one group are paired."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.min_comparisons < 1:
            raise ValueError("RewardDataConfig.min_comparisons must be >= 1")


class PreferencePair(BaseModel):
    """One line of ``preferences.jsonl``: people preferred ``chosen`` to ``rejected`` for
    ``prompt``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    """The prompt both images are judged under."""
    chosen: str = Field(min_length=1)
    """URI of the preferred image."""
    rejected: str = Field(min_length=1)
    """URI of the other image."""
    source: Source
    """``pairwise`` feedback, or a comparison made of ``thumbs`` / ``rating`` feedback."""
    category: str = Field(min_length=1)
    """What the comparison is about: a flag, the theme, or ``default``."""
    case_id: int
    """The case the pair (its rejected image) belongs to."""


class UnreadableImage(BaseModel):
    """An image of a pair that was not read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str
    """The URI as the feedback named it."""
    reason: str
    """Why, in one line."""
    refused: bool
    """True: the image policy (or a limit) refused it, nothing was read; False: it could not
    be read or decoded."""


class RewardArtefact(BaseModel):
    """The reviewed artefact (``artefact.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preferences_file: str
    """Path of ``preferences.jsonl``."""
    pairs: int
    """Lines of ``preferences.jsonl`` (pairs whose images were both read and scored)."""
    by_source: dict[str, int]
    """``pairwise`` / ``thumbs`` / ``rating`` -> pairs written."""
    comparisons: dict[str, int]
    """category -> pairs written."""
    agreement: RewardAgreement
    """The configured reward's agreement with people, per category with at least
    ``min_comparisons`` pairs."""
    weights: dict[str, float]
    """category -> the reward's trust ``max(0, agreement - 0.5) * 2`` in [0, 1]."""
    unreadable: int
    """Images skipped (refused by the policy or unreadable)."""
    unreadable_images: list[UnreadableImage]
    """Each skipped image with its reason."""
    dropped: int
    """Pairs not written because one of their images was skipped."""
    cases: list[int]
    """Ids of the cases the written pairs belong to, sorted."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Vote:
    case: RoutedCase
    uri: str
    liked: bool
    kind: Source
    flags: tuple[str, ...]


def _category(flags: tuple[str, ...], case: RoutedCase) -> str:
    for flag in (*flags, *case.flags):
        if flag.strip():
            return flag.strip()
    return case.theme or DEFAULT_CATEGORY


def _vote(case: RoutedCase, feedback: CaseFeedback) -> _Vote | None:
    uri = feedback.image_uri or case.image_uri
    if not uri:
        return None
    kind: Source
    if feedback.kind == "thumbs" and feedback.thumbs_up is not None:
        liked, kind = feedback.thumbs_up, "thumbs"
    elif feedback.kind == "rating" and feedback.rating is not None and feedback.rating != 3:
        liked, kind = feedback.rating >= 4, "rating"
    else:
        return None
    return _Vote(case=case, uri=uri, liked=liked, kind=kind, flags=feedback.flags)


def _pair_up(key: str, votes: Sequence[_Vote], seed: int) -> list[PreferencePair]:
    """Each liked image against a disliked one of ``votes`` until the larger side is used."""
    conflicted = {v.uri for v in votes if v.liked} & {v.uri for v in votes if not v.liked}
    liked = list({v.uri: v for v in votes if v.liked and v.uri not in conflicted}.values())
    disliked = list({v.uri: v for v in votes if not v.liked and v.uri not in conflicted}.values())
    if not liked or not disliked:
        return []
    rng = random.Random(f"{seed}/{key}")
    rng.shuffle(liked)
    rng.shuffle(disliked)
    pairs = []
    for i in range(max(len(liked), len(disliked))):
        good, bad = liked[i % len(liked)], disliked[i % len(disliked)]
        pairs.append(
            PreferencePair(
                prompt=bad.case.prompt,
                chosen=good.uri,
                rejected=bad.uri,
                source=bad.kind,
                category=_category(bad.flags, bad.case),
                case_id=bad.case.case_id,
            )
        )
    return pairs


def preference_pairs(cases: Sequence[RoutedCase], *, seed: int = 0) -> list[PreferencePair]:
    """Every pair the cases' feedback makes (see the module docstring), duplicates dropped:
    pairwise first, then per prompt, then per theme, each in case-id order."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    pairs: list[PreferencePair] = []
    by_prompt: dict[str, list[_Vote]] = {}
    for case in ordered:
        if not case.prompt.strip():
            continue
        for feedback in case.feedback:
            if feedback.kind == "pairwise":
                chosen, rejected = feedback.chosen_image_uri, feedback.rejected_image_uri
                if chosen and rejected and chosen != rejected:
                    pairs.append(
                        PreferencePair(
                            prompt=case.prompt,
                            chosen=chosen,
                            rejected=rejected,
                            source="pairwise",
                            category=_category(feedback.flags, case),
                            case_id=case.case_id,
                        )
                    )
                continue
            vote = _vote(case, feedback)
            if vote is not None:
                by_prompt.setdefault(case.prompt, []).append(vote)
    by_theme: dict[str, list[_Vote]] = {}
    for prompt, votes in by_prompt.items():
        made = _pair_up(f"prompt:{prompt}", votes, seed)
        if made:
            pairs += made
            continue
        for vote in votes:
            if vote.case.theme:
                by_theme.setdefault(vote.case.theme, []).append(vote)
    for theme, votes in by_theme.items():
        pairs += _pair_up(f"theme:{theme}", votes, seed)
    unique = {(p.prompt, p.chosen, p.rejected): p for p in reversed(pairs)}
    return [p for p in pairs if unique[(p.prompt, p.chosen, p.rejected)] is p]


def image_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> Tensor:
    """A decoded image as ``(3, H, W)`` floats in [0, 1] (RGB), resized to ``size`` (width,
    height) when given and different."""
    rgb = image.convert("RGB")
    if size is not None and rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 255.0


class _Reader:
    """Reads pair images through the policy, remembering failures and recent images."""

    def __init__(self, policy: ImagePolicy) -> None:
        self.policy = policy
        self.failed: dict[str, UnreadableImage] = {}
        self._images: OrderedDict[str, Image.Image] = OrderedDict()

    def image(self, uri: str) -> Image.Image | None:
        if uri in self.failed:
            return None
        if uri in self._images:
            self._images.move_to_end(uri)
            return self._images[uri]
        try:
            image = self.policy.read_image(uri)
        except ImageRefused as refused:
            self.failed[uri] = UnreadableImage(uri=uri, reason=str(refused), refused=True)
            return None
        except ImageReadError as error:
            self.failed[uri] = UnreadableImage(uri=uri, reason=str(error), refused=False)
            return None
        self._images[uri] = image
        if len(self._images) > _CACHED_IMAGES:
            self._images.popitem(last=False)
        return image


def _agreement(
    scored: Sequence[tuple[PreferencePair, bool]], min_comparisons: int
) -> RewardAgreement:
    right: dict[str, int] = {}
    counted: dict[str, int] = {}
    for pair, agrees in scored:
        counted[pair.category] = counted.get(pair.category, 0) + 1
        right[pair.category] = right.get(pair.category, 0) + int(agrees)
    kept = sorted(c for c, n in counted.items() if n >= min_comparisons)
    return RewardAgreement(
        agreement={c: right[c] / counted[c] for c in kept},
        comparisons={c: counted[c] for c in kept},
    )


def trust(agreement: float) -> float:
    """The reward's weight in a category: ``max(0, agreement - 0.5) * 2`` (0 at chance or
    worse, 1 when it always agrees with people)."""
    return max(0.0, agreement - 0.5) * 2.0


def _counts(values: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return dict(sorted(out.items()))


def build_reward_data(
    cases: Sequence[RoutedCase], *, parts: Parts, out_dir: Path, config: RewardDataConfig
) -> RewardArtefact | str:
    """Build the preference pairs of ``cases`` (the track's train share), measure the
    reward's agreement with them, and write ``preferences.jsonl`` and ``artefact.json`` into
    ``out_dir``; or why there is no artefact (no pair, or none whose images could be read).
    :class:`~flywheel.ports.PortError` when the reward fails."""
    config.validate()
    candidates = preference_pairs(cases, seed=config.seed)
    if not candidates:
        return (
            f"no preference pair in the feedback of {len(cases)} case(s) (pairwise feedback, "
            "or a liked and a disliked image of one prompt or theme)"
        )
    reader = _Reader(parts.images)
    scored: list[tuple[PreferencePair, bool]] = []
    dropped = 0
    for pair in candidates:
        chosen = reader.image(pair.chosen)
        rejected = reader.image(pair.rejected)
        if chosen is None or rejected is None:
            dropped += 1
            continue
        images = torch.stack([image_tensor(chosen), image_tensor(rejected, chosen.size)])
        with torch.no_grad():
            scores = parts.reward.score(images, [pair.prompt, pair.prompt])
        scored.append((pair, bool(float(scores[0]) > float(scores[1]))))
    skipped = sorted(reader.failed.values(), key=lambda u: u.uri)
    if not scored:
        first = skipped[0].reason if skipped else "none"
        return (
            f"{len(candidates)} preference pair(s), none with both images readable "
            f"({len(skipped)} image(s) skipped; first: {first})"
        )
    written = [pair for pair, _ in scored]
    agreement = _agreement(scored, config.min_comparisons)
    out_dir.mkdir(parents=True, exist_ok=True)
    preferences_file = out_dir / PREFERENCES_FILE
    atomic_write_text(preferences_file, "".join(p.model_dump_json() + "\n" for p in written))
    artefact = RewardArtefact(
        preferences_file=str(preferences_file),
        pairs=len(written),
        by_source=_counts([p.source for p in written]),
        comparisons=_counts([p.category for p in written]),
        agreement=agreement,
        weights={c: trust(a) for c, a in agreement.agreement.items()},
        unreadable=len(skipped),
        unreadable_images=skipped,
        dropped=dropped,
        cases=sorted({p.case_id for p in written}),
    )
    atomic_write_text(out_dir / ARTEFACT_FILE, artefact.model_dump_json(indent=2) + "\n")
    return artefact

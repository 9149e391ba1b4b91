"""The filter chain retrieved and synthesized samples pass before any round trains on them.

After the Qwen-Image reports' data pipeline, cheapest verdicts first where the order does
not matter, each filter seeing only what the ones before it kept:

1. ``broken`` — the image cannot be read or decoded;
2. ``resolution`` — its shorter side is below ``min_side``;
3. ``near_duplicate`` — its difference hash is within ``near_duplicate_bits`` of a corpus
   item's or of a sample kept before it (a copy adds nothing but weight);
4. ``alignment`` — the configured reward scores it below ``min_alignment`` under its own
   caption (off when ``min_alignment`` is unset: reward scales differ between teams);
5. ``flat`` — the entropy of its grey-level histogram is below ``min_entropy_bits`` (blank,
   single-colour, nearly empty images);
6. ``caption_length`` — its rich caption has fewer than ``min_caption_tokens`` or more than
   ``max_caption_tokens`` whitespace tokens.

What each filter dropped is counted in the :class:`FilterReport`, which the track's artefact
records next to the kept samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.nn import functional

from flywheel.ports import CorpusItem, PortError, RewardModel

FILTERS = ("broken", "resolution", "near_duplicate", "alignment", "flat", "caption_length")
"""The filters, in the order they run."""


class FilterThresholds(BaseModel):
    """The ``[filters]`` table of the project file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_side: int = Field(default=32, ge=1)
    """Shorter side, in pixels, below which a sample is dropped."""
    near_duplicate_bits: int = Field(default=4, ge=0, le=64)
    """Difference hashes (64 bits) at most this many bits apart are near-duplicates."""
    min_alignment: float | None = None
    """Reward score under the sample's own caption below which it is dropped (None: off)."""
    min_entropy_bits: float = Field(default=1.0, ge=0.0, le=8.0)
    """Grey-level histogram entropy (bits, 0..8) below which an image is flat."""
    min_caption_tokens: int = Field(default=3, ge=0)
    """Fewest whitespace tokens of a kept sample's rich caption."""
    max_caption_tokens: int = Field(default=512, ge=1)
    """Most whitespace tokens of a kept sample's rich caption."""


@dataclass(kw_only=True, slots=True)
class FilterReport:
    """What the chain kept, and what each filter dropped."""

    kept: list[CorpusItem]
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    """Filter -> samples it dropped (every filter named, zeros included)."""
    reasons: dict[str, str] = field(default_factory=dict)
    """Dropped sample id -> the filter that dropped it."""

    def summary(self) -> dict[str, object]:
        """JSON for the artefact: counts in, out and per filter."""
        return {
            "candidates": len(self.kept) + sum(self.dropped.values()),
            "kept": len(self.kept),
            "dropped": dict(self.dropped),
        }


def difference_hash(image: Tensor) -> int:
    """The 64-bit difference hash of ``image`` (3, H, W) in [0, 1]: its grey levels at 9 x 8,
    one bit per horizontally adjacent pair (is the left one brighter?)."""
    grey = image.float().mean(dim=0, keepdim=True).unsqueeze(0)  # (1, 1, H, W)
    small = functional.interpolate(grey, size=(8, 9), mode="area")[0, 0]  # (8, 9)
    bits = (small[:, :-1] > small[:, 1:]).flatten().tolist()
    return sum(1 << i for i, bit in enumerate(bits) if bit)


def grey_entropy(image: Tensor) -> float:
    """Shannon entropy (bits) of the 256-bin grey-level histogram of ``image`` (3, H, W)."""
    grey = (image.float().mean(dim=0).clamp(0, 1) * 255).round().long().flatten()
    counts = torch.bincount(grey, minlength=256).float()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def _near(value: int, seen: Iterable[int], bits: int) -> bool:
    return any((value ^ other).bit_count() <= bits for other in seen)


def filter_candidates(
    candidates: Sequence[CorpusItem],
    *,
    read: Callable[[CorpusItem], Tensor],
    corpus_hashes: Sequence[int],
    thresholds: FilterThresholds,
    reward: RewardModel | None = None,
) -> FilterReport:
    """Run the chain over ``candidates`` (images read with ``read``; ``corpus_hashes``: the
    difference hashes of the corpus items a copy of would be a near-duplicate)."""
    report = FilterReport(kept=[])
    kept_hashes: list[int] = []
    scored: list[tuple[CorpusItem, Tensor]] = []

    def drop(item: CorpusItem, name: str) -> None:
        report.dropped[name] += 1
        report.reasons[item.id] = name

    for item in candidates:
        try:
            image = read(item)
        except (PortError, OSError, ValueError):
            drop(item, "broken")
            continue
        if image.ndim != 3 or image.shape[0] != 3 or not torch.isfinite(image).all():
            drop(item, "broken")
            continue
        if min(image.shape[-2:]) < thresholds.min_side:
            drop(item, "resolution")
            continue
        digest = difference_hash(image)
        bits = thresholds.near_duplicate_bits
        if _near(digest, corpus_hashes, bits) or _near(digest, kept_hashes, bits):
            drop(item, "near_duplicate")
            continue
        kept_hashes.append(digest)
        scored.append((item, image))
    for item, image in scored:
        if thresholds.min_alignment is not None and reward is not None:
            score = float(reward.score(image.unsqueeze(0), [item.rich_caption])[0])
            if score < thresholds.min_alignment:
                drop(item, "alignment")
                continue
        if grey_entropy(image) < thresholds.min_entropy_bits:
            drop(item, "flat")
            continue
        tokens = len(item.rich_caption.split())
        if not thresholds.min_caption_tokens <= tokens <= thresholds.max_caption_tokens:
            drop(item, "caption_length")
            continue
        report.kept.append(item)
    return report

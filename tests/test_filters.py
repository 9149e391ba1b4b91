"""The filter chain augmentation samples pass: each filter drops what it should, counted."""

from __future__ import annotations

import torch
from torch import Tensor

from flywheel.media.filters import (
    FILTERS,
    FilterThresholds,
    difference_hash,
    filter_candidates,
    grey_entropy,
)
from flywheel.ports import CorpusItem, PortError

CAPTION = "A picture with a white background showing a large red circle at the centre."


def _item(name: str, caption: str = CAPTION) -> CorpusItem:
    return CorpusItem(id=name, image=f"file:///data/{name}.png", rich_caption=caption)


def _noise(seed: int, size: int = 48) -> Tensor:
    return torch.rand((3, size, size), generator=torch.Generator().manual_seed(seed))


def test_each_filter_drops_what_it_names_and_counts_it() -> None:
    corpus_image = _noise(0)
    images: dict[str, Tensor] = {
        "good": _noise(1),
        "small": _noise(2, size=16),
        "copy-of-corpus": (corpus_image * 0.98).clamp(0, 1),
        "twin-a": _noise(3),
        "twin-b": (_noise(3) + 0.01).clamp(0, 1),
        "flat": torch.full((3, 48, 48), 0.4),
        "short-caption": _noise(4),
    }
    candidates = [_item(name) for name in images] + [_item("broken")]
    candidates[6] = _item("short-caption", caption="red circle")

    def read(item: CorpusItem) -> Tensor:
        if item.id == "broken":
            raise PortError("corpus", "broken.png: not an image")
        return images[item.id]

    report = filter_candidates(
        candidates,
        read=read,
        corpus_hashes=[difference_hash(corpus_image)],
        thresholds=FilterThresholds(min_side=32),
    )
    assert [item.id for item in report.kept] == ["good", "twin-a"]
    assert report.reasons == {
        "small": "resolution",
        "copy-of-corpus": "near_duplicate",
        "twin-b": "near_duplicate",
        "flat": "flat",
        "short-caption": "caption_length",
        "broken": "broken",
    }
    assert list(report.dropped) == list(FILTERS)
    assert report.summary() == {
        "candidates": 8,
        "kept": 2,
        "dropped": {
            "broken": 1,
            "resolution": 1,
            "near_duplicate": 2,
            "alignment": 0,
            "flat": 1,
            "caption_length": 1,
        },
    }


class _BrightnessReward:
    """A reward that prefers bright images (a real scorer, simple enough to reason about)."""

    checkpoint = None

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.mean(dim=(1, 2, 3))


def test_alignment_drops_samples_the_reward_scores_below_the_threshold() -> None:
    bright = (_noise(5) * 0.3 + 0.7).clamp(0, 1)
    dark = _noise(6) * 0.3
    images = {"bright": bright, "dark": dark}
    report = filter_candidates(
        [_item("bright"), _item("dark")],
        read=lambda item: images[item.id],
        corpus_hashes=[],
        thresholds=FilterThresholds(min_alignment=0.5),
        reward=_BrightnessReward(),  # type: ignore[arg-type]
    )
    assert [item.id for item in report.kept] == ["bright"]
    assert report.dropped["alignment"] == 1


def test_entropy_and_hash_are_what_they_claim() -> None:
    assert grey_entropy(torch.zeros(3, 8, 8)) == 0.0
    halves = torch.cat([torch.zeros(3, 8, 4), torch.ones(3, 8, 4)], dim=2)
    assert abs(grey_entropy(halves) - 1.0) < 1e-6
    image = _noise(7)
    assert difference_hash(image) == difference_hash(image.clone())
    assert (difference_hash(image) ^ difference_hash(_noise(8))).bit_count() > 10

"""What a track reads of its routed cases on a team's stack, and how a track's cases are
split between what its round may learn from and what its gate judges.

The gate judges prompts no round trained on: each track's routed cases are split by a
stable hash of their ids into a **train** share (the artefact is built from them: retrieval
queries, failing themes, preference pairs) and a **gate** share (regenerated and judged,
base against candidate). A track with fewer than two cases has no gate share and no round.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import JsonValue

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class CaseFeedback:
    """One feedback signal of a case, as the RL track reads it."""

    kind: str
    """``thumbs``, ``rating``, ``pairwise``, ``comment``, ``flags``."""
    image_uri: str | None = None
    thumbs_up: bool | None = None
    rating: int | None = None
    chosen_image_uri: str | None = None
    rejected_image_uri: str | None = None
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutedCase:
    """A failure case routed to a track, with what its evidence found."""

    case_id: int
    prompt: str
    """What the user (or the suite) asked."""
    reference: str
    """The prompt as the rewrite test rewrote it (the prompt itself when unchanged)."""
    spec: dict[str, JsonValue] | None = None
    """What the judge checks, when the case came from a suite prompt with a spec."""
    image_uri: str | None = None
    """The failing image, as the signal named it (read only through the image policy)."""
    theme: str | None = None
    """The label of the case's failure cluster."""
    flags: tuple[str, ...] = ()
    feedback: tuple[CaseFeedback, ...] = field(default_factory=tuple)


def _bucket(case_id: int, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_hash(
    items: Sequence[T], *, key: Callable[[T], int], gate_share: float = 0.5, seed: int = 0
) -> tuple[list[T], list[T]]:
    """(train, gate): ``items`` split by a stable hash of their ``key`` (an id); each side gets
    at least one item when there are two or more."""
    if not 0.0 < gate_share < 1.0:
        raise ValueError("gate_share must be in (0, 1)")
    ordered = sorted(items, key=lambda item: _bucket(key(item), seed))
    if len(ordered) < 2:
        return list(ordered), []
    gate_count = min(len(ordered) - 1, max(1, round(len(ordered) * gate_share)))
    return ordered[gate_count:], ordered[:gate_count]


def split_cases(
    cases: Sequence[RoutedCase], *, gate_share: float = 0.5, seed: int = 0
) -> tuple[list[RoutedCase], list[RoutedCase]]:
    """(train, gate): the cases split by a stable hash of their ids; each side gets at least
    one case when there are two or more."""
    return split_by_hash(cases, key=lambda c: c.case_id, gate_share=gate_share, seed=seed)


_ARTICLES = frozenset({"a", "an", "the"})


def same_prompt_key(text: str) -> str:
    """What two prompts share when they are the same prompt: their words, case-folded,
    without punctuation and articles ("A violet triangle." and "violet triangle" are one)."""
    words = re.findall(r"\w+", text.casefold())
    return " ".join(w for w in words if w not in _ARTICLES)


def prompt_keys(cases: Sequence[RoutedCase], *, references: bool = True) -> set[str]:
    """The :func:`same_prompt_key` of every case's prompt and (with ``references``) its
    reference: what an artefact holds out."""
    keys = {
        same_prompt_key(t)
        for case in cases
        for t in ((case.prompt, case.reference) if references else (case.prompt,))
    }
    keys.discard("")
    return keys

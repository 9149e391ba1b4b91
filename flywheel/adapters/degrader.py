"""A rule-based caption degrader: rich captions to terse prompts a user would type.

The prompt-enhancer track reverse-engineers its training pairs: a corpus item's rich caption
is what the generator draws well (the target), the same caption degraded is what a user
types (the input). The rules, in order:

1. keep the first ``keep_clauses`` clauses (split on ``.`` and ``;``);
2. drop the phrases of ``drop`` (regular expressions, case-insensitive) — sizes, places,
   framing words ("A picture with ... showing");
3. replace words by the users' words of ``synonyms`` (a word -> its user synonyms, one
   drawn per occurrence with the seeded generator): the vocabulary gap the enhancer learns
   to close;
4. cut to ``max_words`` words and collapse whitespace and stray punctuation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from pydantic import Field

from flywheel.adapters.base import Adapter, AdapterContext, AdapterSettings

DEFAULT_DROP = (
    r"^\s*an? (picture|photo|image|illustration) (of|with)\b[^,]*?\bshowing\b",
    r"\b(at|in|on) the (top|bottom|middle|center|centre|left|right)"
    r"( (left|right|centre|center))?\b",
    r"\b(small|large|big|tiny|huge|medium)\b",
)


class RulesDegraderSettings(AdapterSettings):
    keep_clauses: int = Field(default=1, ge=1)
    """Clauses (split on ``.`` and ``;``) kept from the start of the caption."""
    drop: list[str] = Field(default_factory=lambda: list(DEFAULT_DROP))
    """Regular expressions (case-insensitive) removed from the kept text."""
    synonyms: dict[str, list[str]] = Field(default_factory=dict)
    """Word -> the words users say instead (one drawn per occurrence, seeded)."""
    max_words: int = Field(default=12, ge=1)
    """Words kept at most."""


class RulesDegrader:
    """Applies :class:`RulesDegraderSettings` to captions."""

    def __init__(self, settings: RulesDegraderSettings) -> None:
        try:
            self._drop = [re.compile(p, re.IGNORECASE) for p in settings.drop]
        except re.error as exc:
            raise ValueError(f"drop: not a regular expression ({exc})") from None
        self._settings = settings
        words = sorted(settings.synonyms, key=len, reverse=True)
        self._synonym = (
            re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
            if words
            else None
        )

    def degrade(self, captions: Sequence[str], *, seed: int) -> list[str]:
        rng = random.Random(seed)
        return [self._one(caption, rng) for caption in captions]

    def _one(self, caption: str, rng: random.Random) -> str:
        settings = self._settings
        clauses = [c for c in re.split(r"[.;]", caption) if c.strip()]
        text = ", ".join(c.strip() for c in clauses[: settings.keep_clauses])
        for pattern in self._drop:
            text = pattern.sub(" ", text)
        if self._synonym is not None:
            lowered = {k.casefold(): v for k, v in settings.synonyms.items()}
            text = self._synonym.sub(lambda m: rng.choice(lowered[m.group(1).casefold()]), text)
        text = re.sub(r"\s+([,])", r"\1", re.sub(r"\s+", " ", text)).strip(" ,")
        return " ".join(text.split()[: settings.max_words]).strip(" ,")


def _build(settings: RulesDegraderSettings, context: AdapterContext) -> RulesDegrader:
    for word, users in settings.synonyms.items():
        if not users:
            raise ValueError(f"synonyms.{word}: give at least one word")
    return RulesDegrader(settings)


RULES = Adapter(
    settings=RulesDegraderSettings,
    build=_build,
    summary="rule-based rich -> terse captions (clauses, dropped phrases, user synonyms)",
)

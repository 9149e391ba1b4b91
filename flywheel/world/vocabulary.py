"""The users' vocabulary: colour words people type that the world's captions never use.

The corpus captions name colours with :data:`~flywheel.world.scenes.COLOURS`' words; users
of a product say *crimson* or *navy*. The base generator, conditioned on what it was trained
on, draws such prompts in the wrong colour (measured on the shipped base, colour element
score of 48 colour probes: rich captions 0.65 with the captions' words vs 0.00 with the
users'; terse 0.54 vs 0.08) — the world's prompt-enhancer weakness: the fix is a rewrite
into the captions' words, not new training data.

A :class:`Vocabulary` is one world's users' words (a world file's ``[vocabulary]``,
:mod:`flywheel.world.definition`). :meth:`Vocabulary.to_user_words` puts a prompt in the
users' words; :meth:`Vocabulary.reference_rewrite` is the world's reference rewriter (the
strong rewriter of a rewrite test, a large LLM in production): it puts a prompt back into
the captions' words. A rare colour has no user word: its failures are a data gap, not a
vocabulary one.

The module-level functions are those of :data:`DEFAULT_VOCABULARY`, the default world's
(``flywheel/world/worlds/default.toml``: purple is rare and has none).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

USER_COLOURS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "jade"),
    "blue": ("navy", "azure"),
    "yellow": ("golden", "lemon"),
    "orange": ("tangerine", "amber"),
    "black": ("ebony", "charcoal"),
}
"""Per caption colour, the words the default world's users say for it."""


def _same_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def _alternation(words: list[str]) -> re.Pattern[str]:
    """A case-insensitive pattern of any of ``words`` as a whole word, longest first."""
    return re.compile(r"\b(" + "|".join(sorted(words, key=len, reverse=True)) + r")\b", re.I)


@dataclass(kw_only=True, slots=True, frozen=True)
class Vocabulary:
    """One world's users' words for its caption colours, and the rewrites between the two."""

    colours: Mapping[str, tuple[str, ...]]
    """Per caption colour, the words users say for it (in the order ``to_user_words`` draws
    from); a colour absent here is said as the captions say it."""
    _canonical: dict[str, str] = field(init=False, repr=False, compare=False)
    """Each user word (lower case) -> its caption colour."""
    _user_word: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _caption_word: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.colours or not all(self.colours.values()):
            raise ValueError("Vocabulary: give some caption colours, each with some user words")
        canonical = {w.casefold(): c for c, words in self.colours.items() for w in words}
        if len(canonical) != sum(len(words) for words in self.colours.values()):
            raise ValueError("Vocabulary: a user word is given twice")
        if set(canonical) & {c.casefold() for c in self.colours}:
            raise ValueError("Vocabulary: a user word is a caption colour")
        object.__setattr__(self, "colours", {c: tuple(w) for c, w in self.colours.items()})
        object.__setattr__(self, "_canonical", canonical)
        object.__setattr__(self, "_user_word", _alternation(list(canonical)))
        object.__setattr__(self, "_caption_word", _alternation(list(self.colours)))

    def to_user_words(self, prompt: str, rng: random.Random) -> str:
        """``prompt`` with every caption colour that users name otherwise in one of their
        words (drawn with ``rng``)."""
        return self._caption_word.sub(
            lambda m: _same_case(rng.choice(self.colours[m.group(1).casefold()]), m.group(1)),
            prompt,
        )

    def has_user_words(self, prompt: str) -> bool:
        """Whether ``prompt`` names a colour in the users' words."""
        return self._user_word.search(prompt) is not None

    def renamed_colours(self, prompt: str) -> set[str]:
        """The caption colours ``prompt`` names in the users' words."""
        return {self._canonical[m.group(1).casefold()] for m in self._user_word.finditer(prompt)}

    def reference_rewrite(self, prompt: str) -> str:
        """``prompt`` in the captions' colour words (the world's reference rewriter)."""
        return self._user_word.sub(
            lambda m: _same_case(self._canonical[m.group(1).casefold()], m.group(1)), prompt
        )

    def reference_rewrites(self, prompts: list[str]) -> list[str]:
        """:meth:`reference_rewrite` of each prompt (the batch form attribution calls)."""
        return [self.reference_rewrite(p) for p in prompts]


DEFAULT_VOCABULARY = Vocabulary(colours=USER_COLOURS)
"""The default world's users' vocabulary (what the module-level functions use)."""


def to_user_words(prompt: str, rng: random.Random) -> str:
    """:meth:`Vocabulary.to_user_words` of the default world."""
    return DEFAULT_VOCABULARY.to_user_words(prompt, rng)


def has_user_words(prompt: str) -> bool:
    """:meth:`Vocabulary.has_user_words` of the default world."""
    return DEFAULT_VOCABULARY.has_user_words(prompt)


def renamed_colours(prompt: str) -> set[str]:
    """:meth:`Vocabulary.renamed_colours` of the default world."""
    return DEFAULT_VOCABULARY.renamed_colours(prompt)


def reference_rewrite(prompt: str) -> str:
    """:meth:`Vocabulary.reference_rewrite` of the default world."""
    return DEFAULT_VOCABULARY.reference_rewrite(prompt)


def reference_rewrites(prompts: list[str]) -> list[str]:
    """:meth:`Vocabulary.reference_rewrites` of the default world."""
    return DEFAULT_VOCABULARY.reference_rewrites(prompts)

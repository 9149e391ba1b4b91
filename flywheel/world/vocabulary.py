"""The users' vocabulary: colour words people type that the world's captions never use.

The corpus captions name colours with :data:`~flywheel.world.scenes.COLOURS`' words; users
of a product say *crimson* or *navy*. The base generator, conditioned on what it was trained
on, draws such prompts in the wrong colour (measured on the shipped base, colour element
score of 48 colour probes: rich captions 0.65 with the captions' words vs 0.00 with the
users'; terse 0.54 vs 0.08) — the world's prompt-enhancer weakness: the fix is a rewrite
into the captions' words, not new training data.

:func:`to_user_words` puts a prompt in the users' words; :func:`reference_rewrite` is the
world's reference rewriter (the strong rewriter of a rewrite test, a large LLM in
production): it puts a prompt back into the captions' words. The rare colour (purple) has
no user word: its failures are a data gap, not a vocabulary one.
"""

from __future__ import annotations

import random
import re

USER_COLOURS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "jade"),
    "blue": ("navy", "azure"),
    "yellow": ("golden", "lemon"),
    "orange": ("tangerine", "amber"),
    "black": ("ebony", "charcoal"),
}
"""Per caption colour, the words users say for it."""

_CANONICAL = {word: colour for colour, words in USER_COLOURS.items() for word in words}
_USER_WORD = re.compile(r"\b(" + "|".join(sorted(_CANONICAL, key=len, reverse=True)) + r")\b", re.I)
_CAPTION_WORD = re.compile(r"\b(" + "|".join(USER_COLOURS) + r")\b", re.I)


def _same_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def to_user_words(prompt: str, rng: random.Random) -> str:
    """``prompt`` with every caption colour that users name otherwise in one of their words
    (drawn with ``rng``)."""
    return _CAPTION_WORD.sub(
        lambda m: _same_case(rng.choice(USER_COLOURS[m.group(1).casefold()]), m.group(1)), prompt
    )


def has_user_words(prompt: str) -> bool:
    """Whether ``prompt`` names a colour in the users' words."""
    return _USER_WORD.search(prompt) is not None


def renamed_colours(prompt: str) -> set[str]:
    """The caption colours ``prompt`` names in the users' words."""
    return {_CANONICAL[m.group(1).casefold()] for m in _USER_WORD.finditer(prompt)}


def reference_rewrite(prompt: str) -> str:
    """``prompt`` in the captions' colour words (the world's reference rewriter)."""
    return _USER_WORD.sub(
        lambda m: _same_case(_CANONICAL[m.group(1).casefold()], m.group(1)), prompt
    )


def reference_rewrites(prompts: list[str]) -> list[str]:
    """:func:`reference_rewrite` of each prompt (the batch form attribution calls)."""
    return [reference_rewrite(p) for p in prompts]

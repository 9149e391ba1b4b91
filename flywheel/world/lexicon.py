"""A general colour lexicon: the rewriter of the world's rewrite test.

A rewrite test asks whether a stronger rewriter's prompt fixes a failure (in production, a
large LLM that knows *crimson* is a red). The world's stand-in must know colour words the way
such a model does — from general knowledge, not from the world it is tested on — or the rewrite
test would only restate which words a world's users were given (the prompt-enhancer label's
definition). So the lexicon is built from public colour naming data that no world file
touches: the ~950 names of the xkcd colour survey (`matplotlib.colors.XKCD_COLORS`) and the
CSS4 names, each single-word name mapped to the world colour (:data:`~flywheel.world.scenes.
COLOURS`) nearest in CIELAB (ΔE76). Where both sources name a word, xkcd's survey colour wins
(CSS's *azure* is near-white; the survey's is a blue).

It is imperfect on purpose, as any rewriter is: *amber* is nearer the world's yellow than its
orange, the survey's *navy* is nearer its black than its blue, and words neither source has
(*onyx*, *sable*, *ebony*) stay as they are. A word the world's captions use (a colour,
background, shape or size) and quoted text (what an image must read) are never rewritten.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from matplotlib import colors as mpl_colors

from flywheel.world.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES

_WORD = re.compile(r"[a-z]{3,}")
"""A lexicon word: one word of at least three letters a-z (no spaces, no 'xkcd:' prefix)."""
_QUOTED = re.compile(r'("[^"]*")')
"""A quoted text in a prompt (split keeps it at the odd indices)."""


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIELAB (D65) (..., 3)."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )


def colour_names() -> dict[str, str]:
    """Single-word colour names of the public sources, lower case -> hex (xkcd wins)."""
    names = {k.lower(): str(v) for k, v in mpl_colors.CSS4_COLORS.items() if _WORD.fullmatch(k)}
    for key, value in mpl_colors.XKCD_COLORS.items():
        word = key.removeprefix("xkcd:")
        if _WORD.fullmatch(word):
            names[word] = str(value)
    return names


@dataclass(kw_only=True, slots=True, frozen=True)
class ColourLexicon:
    """Colour words -> the world colour each is nearest to."""

    canonical: Mapping[str, str]
    """Each known word (lower case, never a caption word) -> its world colour."""
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        words = sorted(self.canonical, key=len, reverse=True)
        pattern = r"\b(" + "|".join(words) + r")\b" if words else r"(?!)"
        object.__setattr__(self, "_pattern", re.compile(pattern, re.IGNORECASE))

    def rewrite(self, prompt: str) -> str:
        """``prompt`` with every known colour word replaced by its world colour."""

        def replace(match: re.Match[str]) -> str:
            word = self.canonical[match.group(0).lower()]
            return word.capitalize() if match.group(0)[:1].isupper() else word

        # Quoted text is what an image must read, letter for letter: never rewritten.
        parts = _QUOTED.split(prompt)
        return "".join(
            part if k % 2 else self._pattern.sub(replace, part) for k, part in enumerate(parts)
        )

    def rewrites(self, prompts: Sequence[str]) -> list[str]:
        """:meth:`rewrite` of each prompt (a :class:`~flywheel.attribution.evidence.Rewriter`)."""
        return [self.rewrite(p) for p in prompts]


@cache
def general_lexicon() -> ColourLexicon:
    """The lexicon of the public colour names, mapped onto :data:`COLOURS`."""
    caption_words = {*COLOURS, *BACKGROUNDS, *SHAPES, *SIZES}
    names = {w: h for w, h in colour_names().items() if w not in caption_words}
    world = list(COLOURS)
    world_lab = _lab(np.array([COLOURS[c] for c in world], dtype=np.float64) / 255.0)
    words = sorted(names)
    lab = _lab(np.array([mpl_colors.to_rgb(names[w]) for w in words], dtype=np.float64))
    distance = np.linalg.norm(lab[:, None, :] - world_lab[None, :, :], axis=-1)
    nearest = distance.argmin(axis=1)
    return ColourLexicon(canonical={w: world[int(i)] for w, i in zip(words, nearest, strict=True)})


def lexicon_rewrites(prompts: Sequence[str]) -> list[str]:
    """The general lexicon's rewrites of ``prompts``."""
    return general_lexicon().rewrites(prompts)

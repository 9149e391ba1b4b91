"""Terse prompts from rich captions: reverse-engineered degradation for prompt-enhancer pairs.

A prompt enhancer learns the map terse -> rich. Rich captions are what training data has;
terse prompts are what users type. Pairs are made by *degrading* a rich caption the way users
under-specify: each operator removes one kind of detail, and a pair is (degraded, original).

Operators (:data:`OPERATORS`, each ``(text, generator) -> text``), in their canonical order:

``lighting``  drop the clauses that describe light ("lit by warm candlelight", "under soft
              overcast light") and lighting adjectives ("sunlit", "backlit") elsewhere
``texture``   drop texture and material words ("weathered", "wooden", "glossy", "velvet")
``layout``    drop position phrases ("on the left side of the frame", "in the upper right
              corner", "in the foreground")
``count``     make counts vague: number words and digits become "some" / "several" /
              "a few" or disappear, "a single" / "one" become "a"
``quote``     drop quoted text: the phrase ``reading "OPEN LATE"`` is removed, or the quoted
              string is replaced by "some text" (the generator picks)
``style``     drop the clauses that name a medium or style ("in the style of a watercolor
              painting", "shot on 35mm film") and style adjectives ("cinematic")
``colour``    drop colour words

Operators never touch the inside of quoted text except ``quote`` itself, and never drop the
first clause (the subject). After the operators, :func:`tidy` repairs spacing, punctuation
and articles ("a" / "an"); :func:`casual` makes the result read like a typed prompt (no
capital at the start, no final period).

Randomness: every choice (which vague word, which quote treatment, which operators a pair
gets) comes from the ``torch.Generator`` passed in, so a seeded generator gives the same
pairs on every machine. :func:`rich_caption_corpus` generates a small procedural corpus of
rich captions (lighting, texture, layout, counts, quoted text, style) for the debug recipes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Operator = Callable[[str, torch.Generator], str]
"""A degradation operator: ``(caption, generator) -> degraded caption``."""

# Quoted spans (straight or curly double quotes), kept intact by the word-level operators.
_QUOTED = re.compile(r'"[^"]*"|“[^”]*”')


def _lexicon(words: str) -> frozenset[str]:
    """The whitespace-separated words of ``words``."""
    return frozenset(words.split())


_NUMBER_WORDS = sorted(_lexicon("two three four five six seven eight nine ten eleven twelve"))
_VAGUE = ("some", "several", "a few", "")

LIGHTING_WORDS = _lexicon(
    "light lights lit lighting sunlight moonlight candlelight lamplight daylight glow glowing "
    "shadow shadows shadowed backlit sunlit moonlit illuminated golden-hour sunset sunrise "
    "overcast dusk dawn twilight spotlight spotlit rim-lit"
)
"""Words that mark a clause as a lighting description (and lighting adjectives removed)."""
_LIGHTING_ADJECTIVES = _lexicon("backlit sunlit moonlit spotlit rim-lit glowing")

TEXTURE_WORDS = _lexicon(
    "weathered wooden glossy matte ceramic brushed metal metallic knitted wool woolen polished "
    "brass rough stone velvet rusty iron frosted glass plastic marble leather fluffy furry "
    "smooth shiny silk silken porcelain copper cracked mossy woven wicker translucent"
)
"""Texture and material words removed by ``texture``."""

COLOUR_WORDS = _lexicon(
    "red blue green yellow orange purple pink white black grey gray brown teal crimson "
    "turquoise golden silver violet magenta cyan beige navy scarlet amber"
)
"""Colour words removed by ``colour``."""

STYLE_WORDS = _lexicon(
    "painting illustration photograph photo drawing render rendered sketch watercolor "
    "watercolour oil pastel film 35mm cinematic photorealistic hyperrealistic anime cartoon "
    "style isometric lithograph engraving"
)
"""Words that mark a clause as a style / medium description."""
_STYLE_ADJECTIVES = _lexicon("cinematic photorealistic hyperrealistic highly-detailed")

_POSITION = (
    r"(?:left|right|top|bottom|center|centre|middle|foreground|background|corner|edge|side|"
    r"half|third)"
)
_LAYOUT = re.compile(
    r"\s*\b(?:in|on|at|to|along|near|toward|towards|across)\s+the\s+"
    r"(?:(?:far|upper|lower|top|bottom|left|right|center|centre|middle)[\s-]+)*"
    + _POSITION
    + r"(?:\s+(?:side|corner|edge|half|third))?"
    r"(?:\s+of\s+(?:the\s+)?(?:frame|image|scene|picture|composition|canvas))?\b",
    re.IGNORECASE,
)
_CENTERED = re.compile(r"\s*\b(?:off-)?cent(?:er|r)ed\b", re.IGNORECASE)

_QUOTE_PHRASE = re.compile(
    r"\s*\b(?:reading|that reads|which reads|that says|saying|with the (?:words|text)|"
    r"labeled|labelled|titled|inscribed with)\s*(?:\"[^\"]*\"|“[^”]*”)",
    re.IGNORECASE,
)


# ---- helpers ----------------------------------------------------------------------------


def _choice(options: Sequence[str], generator: torch.Generator) -> str:
    """One of ``options``, drawn from ``generator``."""
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _outside_quotes(text: str, edit: Callable[[str], str]) -> str:
    """``edit`` applied to the parts of ``text`` outside quoted spans; quotes kept as they are."""
    parts: list[str] = []
    last = 0
    for match in _QUOTED.finditer(text):
        parts.append(edit(text[last : match.start()]))
        parts.append(match.group())
        last = match.end()
    parts.append(edit(text[last:]))
    return "".join(parts)


def _clauses(text: str) -> list[str]:
    """``text`` split at commas outside quotes (each clause keeps no comma)."""
    marked = _outside_quotes(text, lambda part: part.replace(",", "\x00"))
    return marked.split("\x00")


def _words(text: str) -> set[str]:
    """Lower-case words of ``text`` outside quotes (hyphenated words kept whole)."""
    return set(re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", _QUOTED.sub(" ", text).lower()))


def _drop_clauses(text: str, keywords: frozenset[str]) -> str:
    """``text`` without its clauses (after the first) that contain one of ``keywords``."""
    clauses = _clauses(text)
    kept = clauses[:1] + [c for c in clauses[1:] if not (_words(c) & keywords)]
    return ",".join(kept)


def _drop_words(text: str, words: frozenset[str]) -> str:
    """``text`` without the whole words in ``words`` (case-insensitive), outside quotes."""
    pattern = re.compile(
        r"\s*(?<!-)\b(?:"
        + "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))
        + r")\b(?!-)",
        re.IGNORECASE,
    )
    return _outside_quotes(text, lambda part: pattern.sub("", part))


# ---- operators --------------------------------------------------------------------------


def drop_lighting(text: str, generator: torch.Generator) -> str:
    """Drop lighting clauses and lighting adjectives."""
    del generator
    return _drop_words(_drop_clauses(text, LIGHTING_WORDS), _LIGHTING_ADJECTIVES)


def drop_texture(text: str, generator: torch.Generator) -> str:
    """Drop texture and material words."""
    del generator
    return _drop_words(text, TEXTURE_WORDS)


def drop_layout(text: str, generator: torch.Generator) -> str:
    """Drop position phrases ("in the upper left corner", "in the foreground", "centered")."""
    del generator
    return _outside_quotes(text, lambda part: _CENTERED.sub("", _LAYOUT.sub("", part)))


def vague_counts(text: str, generator: torch.Generator) -> str:
    """Number words and digits become a vague quantifier (or nothing); "a single" becomes "a"."""
    numbers = r"\b(?:\d+|" + "|".join(_NUMBER_WORDS) + r")\b(?:\s+of)?(?=\s+[A-Za-z])"

    def edit(part: str) -> str:
        part = re.sub(r"\b(?:a single|exactly one|one single|one)\b", "a", part, flags=re.I)
        return re.sub(numbers, lambda _: _choice(_VAGUE, generator), part, flags=re.I)

    return _outside_quotes(text, edit)


def drop_quoted_text(text: str, generator: torch.Generator) -> str:
    """Remove what a caption quotes: the ``reading "..."`` phrase, or the string -> "some text"."""
    if _choice(("phrase", "replace"), generator) == "phrase":
        text = _QUOTE_PHRASE.sub("", text)
    return _QUOTED.sub("some text", text)


def drop_style(text: str, generator: torch.Generator) -> str:
    """Drop style / medium clauses and style adjectives."""
    del generator
    return _drop_words(_drop_clauses(text, STYLE_WORDS), _STYLE_ADJECTIVES)


def drop_colour(text: str, generator: torch.Generator) -> str:
    """Drop colour words."""
    del generator
    return _drop_words(text, COLOUR_WORDS)


OPERATORS: dict[str, Operator] = {
    "lighting": drop_lighting,
    "texture": drop_texture,
    "layout": drop_layout,
    "count": vague_counts,
    "quote": drop_quoted_text,
    "style": drop_style,
    "colour": drop_colour,
}
"""Every degradation operator by name, in the canonical order :func:`build_pairs` applies them."""


def tidy(text: str) -> str:
    """Repair what removals leave: spaces, commas, a leading/trailing comma, "a" vs "an"."""

    def edit(part: str) -> str:
        part = re.sub(r"\s+", " ", part)
        part = re.sub(r"\s+([,.])", r"\1", part)
        part = re.sub(r",(?:\s*,)+", ",", part)
        part = re.sub(r",\s*\.", ".", part)

        def article(match: re.Match[str]) -> str:
            word, following = match.group(1), match.group(2)
            vowel = following[0].lower() in "aeiou"
            fixed = ("an" if vowel else "a") if word.lower() in ("a", "an") else word
            return (fixed.capitalize() if word[0].isupper() else fixed) + " " + following

        return re.sub(r"\b(a|an|A|An)\s+([A-Za-z])", article, part)

    text = _outside_quotes(text, edit)
    return text.strip().strip(",").strip()


def casual(text: str) -> str:
    """A caption as a user types it: no final period, and its first letter lower-cased (unless
    it starts an all-caps word such as an acronym or quoted sign text)."""
    text = text.rstrip(".").rstrip()
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        text = text[0].lower() + text[1:]
    return text


def degrade(caption: str, *, ops: Sequence[str], generator: torch.Generator) -> str:
    """``caption`` with the operators ``ops`` applied in the order given, then :func:`tidy`."""
    unknown = [op for op in ops if op not in OPERATORS]
    if unknown:
        raise ValueError(f"unknown degradation operators {unknown}; known: {list(OPERATORS)}")
    for op in ops:
        caption = OPERATORS[op](caption, generator)
    return tidy(caption)


@dataclass(kw_only=True, slots=True)
class DegradationConfig:
    """Which operators degrade each caption of a pair set."""

    ops: tuple[str, ...] = tuple(OPERATORS)
    """Operators a caption may get (names in :data:`OPERATORS`)."""
    op_probability: float = 0.7
    """Each operator is applied to a caption with this probability ..."""
    min_ops: int = 2
    """... and at least this many are (drawn among the rest when too few were)."""
    casual: bool = True
    """Finish every terse prompt with :func:`casual` (no capital, no period)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        unknown = [op for op in self.ops if op not in OPERATORS]
        if unknown or not self.ops:
            raise ValueError(f"DegradationConfig.ops: unknown or none: {unknown}")
        if not 0.0 <= self.op_probability <= 1.0:
            raise ValueError("DegradationConfig.op_probability must be in [0, 1]")
        if not 0 <= self.min_ops <= len(self.ops):
            raise ValueError(f"DegradationConfig.min_ops must be in [0, {len(self.ops)}]")


def build_pairs(
    captions: Sequence[str], *, config: DegradationConfig, generator: torch.Generator
) -> list[tuple[str, str]]:
    """``(terse, rich)`` per caption; captions that no operator changes are left out.

    Each caption draws its operators (each with ``op_probability``, topped up to ``min_ops``)
    from ``generator``; they are applied in :data:`OPERATORS` order.
    """
    config.validate()
    order = [op for op in OPERATORS if op in config.ops]
    pairs = []
    for rich in captions:
        chosen = torch.rand(len(order), generator=generator) < config.op_probability  # (K,)
        missing = config.min_ops - int(chosen.sum())
        if missing > 0:
            rest = (~chosen).nonzero().flatten()
            extra = rest[torch.randperm(len(rest), generator=generator)[:missing]]
            chosen[extra] = True
        ops = [op for op, on in zip(order, chosen.tolist(), strict=True) if on]
        terse = degrade(rich, ops=ops, generator=generator)
        if config.casual:
            terse = casual(terse)
        if terse and terse != casual(rich):
            pairs.append((terse, rich))
    return pairs


# ---- a procedural corpus of rich captions ----------------------------------------------


@dataclass(kw_only=True, slots=True)
class CorpusConfig:
    """A generated corpus of rich captions (for debug recipes and tests)."""

    size: int = 48
    """Number of captions."""
    seed: int = 0
    """Seed of every choice."""
    quote_probability: float = 0.6
    """Probability that a caption asks for rendered (quoted) text."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.size < 1 or not 0.0 <= self.quote_probability <= 1.0:
            raise ValueError("CorpusConfig: size >= 1 and quote_probability in [0, 1]")


_SUBJECTS = (
    ("cat", "cats", "sitting in"),
    ("boat", "boats", "resting in"),
    ("lantern", "lanterns", "hanging in"),
    ("teacup", "teacups", "standing in"),
    ("bicycle", "bicycles", "leaning on a wall in"),
    ("robot", "robots", "standing in"),
    ("apple", "apples", "lying in"),
    ("chair", "chairs", "placed in"),
    ("owl", "owls", "perched in"),
    ("vase", "vases", "standing in"),
    ("book", "books", "stacked in"),
    ("umbrella", "umbrellas", "open in"),
)
_SCENES = (
    "a quiet kitchen",
    "a small harbor",
    "a city garden",
    "a forest clearing",
    "a desert town",
    "a cluttered workshop",
    "an old library",
    "a snowy street",
)
_COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "white", "teal")
_TEXTURES = (
    "weathered wooden",
    "glossy ceramic",
    "brushed metal",
    "knitted wool",
    "polished brass",
    "velvet",
    "rusty iron",
    "frosted glass",
)
_COUNTS = ("a single", "two", "three", "four", "five", "six")
_LAYOUTS = (
    "on the left side of the frame",
    "in the center of the frame",
    "in the lower right corner",
    "along the bottom edge",
    "in the foreground",
    "on the right half of the image",
)
_LIGHTS = (
    "lit by warm golden-hour sunlight",
    "under soft overcast light",
    "in dramatic low-key lighting with deep shadows",
    "lit by flickering candlelight",
    "under bright midday sunlight",
    "backlit by a hazy sunset",
)
_SIGNS = ("a small sign", "a paper banner", "a chalkboard", "a wooden plaque", "a shop awning")
_SIGN_PLACES = ("in the upper right corner", "in the background", "at the top of the frame")
_SIGN_WORDS = (
    "OPEN", "LATE", "FRESH", "BREAD", "HELLO", "WORLD", "SALE", "CAFE", "MOON", "RIVER",
    "GOOD", "LUCK", "NORTH", "STAR", "TEA", "TIME",
)  # fmt: skip
_STYLES = (
    "in the style of a detailed watercolor painting",
    "as a cinematic photograph",
    "rendered as a crisp digital illustration",
    "shot on 35mm film",
    "as a soft pastel drawing",
    "in the style of an oil painting",
)


def rich_caption_corpus(config: CorpusConfig | None = None) -> list[str]:
    """``config.size`` rich captions, each with a count, texture, colour, layout, lighting and
    style, most with quoted text; every choice drawn from a generator seeded with
    ``config.seed``."""
    config = config or CorpusConfig()
    config.validate()
    generator = torch.Generator().manual_seed(config.seed)

    def pick(options: Sequence[str]) -> str:
        return _choice(options, generator)

    captions = []
    for _ in range(config.size):
        index = int(torch.randint(len(_SUBJECTS), (1,), generator=generator))
        singular, plural, verb = _SUBJECTS[index]
        count = pick(_COUNTS)
        noun = singular if count == "a single" else plural
        subject = f"{count} {pick(_TEXTURES)} {pick(_COLOURS)} {noun} {verb} {pick(_SCENES)}"
        clauses = [f"{subject} {pick(_LAYOUTS)}", pick(_LIGHTS)]
        if float(torch.rand((), generator=generator)) < config.quote_probability:
            first, second = torch.randperm(len(_SIGN_WORDS), generator=generator)[:2].tolist()
            words = f"{_SIGN_WORDS[first]} {_SIGN_WORDS[second]}"
            clauses.append(f'with {pick(_SIGNS)} reading "{words}" {pick(_SIGN_PLACES)}')
        clauses.append(pick(_STYLES))
        caption = ", ".join(clauses) + "."
        captions.append(caption[0].upper() + caption[1:])
    return captions

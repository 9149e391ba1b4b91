"""The fonts scenes render text with, all shipped by installed packages (nothing downloaded).

Latin: the DejaVu families matplotlib ships. Logographic (Han characters): Noto Sans CJK TC
from the ``cvttf-notosanscjk-regular`` package.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from PIL import ImageFont

Script = Literal["latin", "han"]

FONTS: dict[str, Script] = {
    "DejaVu Sans": "latin",
    "DejaVu Serif": "latin",
    "DejaVu Sans Mono": "latin",
    "Noto Sans CJK": "han",
}
"""Every font a scene may name, and the script it renders."""

_DEJAVU_FILES = {
    "DejaVu Sans": "DejaVuSans.ttf",
    "DejaVu Serif": "DejaVuSerif.ttf",
    "DejaVu Sans Mono": "DejaVuSansMono.ttf",
}


class FontError(RuntimeError):
    """A font's package is missing or does not hold the file."""


def fonts_for(script: Script) -> list[str]:
    """The names of the fonts that render ``script``."""
    return [name for name, s in FONTS.items() if s == script]


@functools.cache
def font_path(name: str) -> Path:
    """The file of font ``name`` (one of :data:`FONTS`)."""
    if name not in FONTS:
        raise FontError(f"unknown font {name!r}; known: {', '.join(FONTS)}")
    if name in _DEJAVU_FILES:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / _DEJAVU_FILES[name]
    else:
        try:
            import cvttf_NotoSansCJK_Regular as noto
        except ImportError as exc:
            raise FontError("the Han font needs the cvttf-notosanscjk-regular package") from exc
        path = Path(noto.get_TTF_path())
    if not path.is_file():
        raise FontError(f"font {name!r}: {path} is missing; reinstall its package")
    return path


@functools.lru_cache(maxsize=256)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """Font ``name`` at ``size`` pixels (cached)."""
    return ImageFont.truetype(str(font_path(name)), size)

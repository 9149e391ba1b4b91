"""What every dashboard page shares: the database (one engine per URL for the process),
a session per read, the signed-in reviewer, image display (only where the project's image
policy reads).

User-supplied and stored strings (prompts, labels, reasons, names) go into Markdown only
through ``literal`` (or ``code_span``): Markdown would otherwise load their images, follow
their links, typeset their LaTeX and colour their ``:red[...]``.

The reviewer signs in with an API key that has the ``review`` (or ``triage``) scope — the
key's app is their name, as in the review API — or, when the deployment configures OIDC in
Streamlit's secrets (``[auth]``), through ``st.login``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import streamlit as st
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from flywheel.db.engine import create_db_engine
from flywheel.settings import Settings, get_settings

PAGE_SIZE = 25
REVIEWER = "reviewer"
"""Session-state key of the signed-in reviewer's name."""

_HIDDEN: dict[int, str] = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09},
    0x0A: "\\n",
    0x0D: "\\r",
    **{c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))},
}
"""Control characters (tab aside) and bidi overrides, as their Python escapes: visible."""
_LITERAL: dict[int, str] = {
    **{ord(c): "\\" + c for c in string.punctuation},
    **{c: shown.replace("\\", "\\\\") for c, shown in _HIDDEN.items()},
}
"""Every ASCII punctuation backslash-escaped (CommonMark), hidden characters made visible."""
_REWRITTEN = re.compile(r"(?<=[:@])(?=\S)|(?<=www)(?=\.)|(?<=[-<>~])(?=[-<>=])", re.IGNORECASE)
"""Where Streamlit rewrites text once it is parsed, escapes or not: URLs (``http://``, ``www.``,
``a@b.c``) into links, ``:streamlit:`` and ``:material_x:`` into icons, `` -- `` and ``->``
into a dash and an arrow; an invisible word joiner there stops it."""
WORD_JOINER = "\N{WORD JOINER}"


def literal(text: object) -> str:
    """``str(text)`` escaped to show verbatim, on one line, inside Streamlit Markdown."""
    return _REWRITTEN.sub(WORD_JOINER, str(text)).translate(_LITERAL)


def code_span(text: object) -> str:
    """``str(text)`` as a Markdown code span that shows it verbatim, on one line."""
    body = str(text).translate(_HIDDEN).replace(":material/", f":{WORD_JOINER}material/")
    fence = "`" * (max((len(run) for run in re.findall("`+", body)), default=0) + 1)
    return f"{fence} {body} {fence}"


@st.cache_resource(show_spinner=False)
def _engine(url: str | None, home: str) -> Engine:
    return create_db_engine(Settings(database_url=url, home=Path(home)), pool_size=2)


@contextmanager
def session() -> Iterator[Session]:
    """A session on the configured database (read, or one decision, per call)."""
    settings = get_settings()
    with Session(_engine(settings.database_url, str(settings.home))) as s:
        yield s


def _oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except (FileNotFoundError, KeyError, st.errors.StreamlitSecretNotFoundError):
        return False


def reviewer() -> str | None:
    """The signed-in reviewer, or None."""
    name = st.session_state.get(REVIEWER)
    if name:
        return str(name)
    if _oidc_configured() and st.user.is_logged_in:
        return str(st.user.get("email") or st.user.get("name"))
    return None


def sign_in_panel() -> None:
    """The sidebar's sign-in (API key, or OIDC when configured) and sign-out."""
    from flywheel.auth.service import authenticate
    from flywheel.db.models import Scope

    name = reviewer()
    if name:
        st.sidebar.markdown(f"Signed in as **{literal(name)}**")
        if st.sidebar.button("Sign out"):
            st.session_state.pop(REVIEWER, None)
            if _oidc_configured() and st.user.is_logged_in:
                st.logout()
            st.rerun()
        return
    if _oidc_configured() and st.sidebar.button("Sign in with your identity provider"):
        st.login()
    with st.sidebar.form("sign-in"):
        key = st.text_input("API key (review scope)", type="password")
        if st.form_submit_button("Sign in") and key:
            with session() as s:
                principal = authenticate(s, secret=key.strip())
            if principal is None:
                st.error("That key is unknown or revoked.")
            elif not (principal.allows(Scope.REVIEW) or principal.allows(Scope.TRIAGE)):
                st.error("That key has neither the review nor the triage scope.")
            else:
                st.session_state[REVIEWER] = principal.app
                st.rerun()


def image_to_show(uri: str) -> Image.Image | str:
    """The image ``uri`` names, read through the image policy in force
    (:func:`~flywheel.media.access.image_policy`) and decoded, or why it is not shown: a
    stored URI is whatever a product app sent (a file outside the allowed roots, a private
    address, a text file, a bomb)."""
    from flywheel.media.access import ImageReadError, ImageRefused, image_policy
    from flywheel.project import ProjectError

    try:
        return image_policy().read_image(uri)
    except (ImageRefused, ImageReadError, ProjectError) as exc:
        return str(exc)


def show_image(uri: str | None, *, caption: str | None = None, width: int = 128) -> None:
    """An image by its URI, where the image policy reads it; else a line saying why not."""
    if not uri:
        return
    shown = image_to_show(uri)
    if isinstance(shown, Image.Image):
        shown.thumbnail((2 * width, 2 * width))
        st.image(shown, caption=literal(caption) if caption else None, width=width)
    else:
        st.caption(literal(f"{caption + ': ' if caption else ''}image not shown: {shown}"))


def page(title: str) -> None:
    """A page's title and the sidebar's sign-in."""
    sign_in_panel()
    st.title(title)

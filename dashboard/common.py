"""What every dashboard page shares: the database (one engine per URL for the process),
a session per read, the signed-in reviewer, image display.

The reviewer signs in with an API key that has the ``review`` (or ``triage``) scope — the
key's app is their name, as in the review API — or, when the deployment configures OIDC in
Streamlit's secrets (``[auth]``), through ``st.login``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import streamlit as st
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from flywheel.db.engine import create_db_engine
from flywheel.settings import Settings, get_settings
from training.io import local_path

PAGE_SIZE = 25
REVIEWER = "reviewer"
"""Session-state key of the signed-in reviewer's name."""


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
        st.sidebar.write(f"Signed in as **{name}**")
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


def show_image(uri: str | None, *, caption: str | None = None, width: int = 128) -> None:
    """A local image by its file:// URI (remote ones are named, not fetched)."""
    path = local_path(uri) if uri else None
    if path is not None and path.is_file():
        st.image(str(path), caption=caption, width=width)
    elif uri:
        st.caption(f"{caption + ': ' if caption else ''}{uri}")


def page(title: str) -> None:
    """A page's title and the sidebar's sign-in."""
    sign_in_panel()
    st.title(title)

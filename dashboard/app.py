"""The flywheel's dashboard (``flywheel dashboard``): triage and the final review.

A Streamlit multipage app (``st.navigation``); every page reads through the flywheel's
services, never raw SQL, and long lists are paginated on the server. Each page draws the
sidebar's sign-in itself (``dashboard.common.page``), so a rerun of any page keeps it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run dashboard/app.py` puts dashboard/ first on sys.path; the pages import
# `dashboard.common`, so the repository root must be importable too.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

_PAGES = Path(__file__).parent / "pages"

st.set_page_config(page_title="flywheel", page_icon=":material/cyclone:", layout="wide")
navigation = st.navigation(
    [
        st.Page(
            _PAGES / "overview.py", title="Overview", icon=":material/monitoring:", default=True
        ),
        st.Page(_PAGES / "triage.py", title="Triage", icon=":material/fact_check:"),
        st.Page(_PAGES / "clusters.py", title="Clusters", icon=":material/bubble_chart:"),
        st.Page(_PAGES / "review.py", title="Review queue", icon=":material/rate_review:"),
        st.Page(_PAGES / "cycles.py", title="Cycles", icon=":material/autorenew:"),
    ]
)
navigation.run()

"""Clusters: failure themes with their size, trend and example images."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.common import literal, page, session, show_image
from flywheel.cases.browse import clusters

page("Clusters")
days = st.slider("Trend over the last days", 7, 90, 14)
with session() as s:
    rows = clusters(s, days=days, limit=50)
if not rows:
    st.info("No clusters yet: `flywheel cycle` themes the failure cases.")
    st.stop()
st.dataframe(
    pd.DataFrame(
        [
            {
                "cluster": r.id,
                "label": r.label,
                "cases": r.cases,
                "open": r.open,
                "fixed": r.fixed_at,
                "trend": list(r.per_day.values()),
            }
            for r in rows
        ]
    ),
    column_config={"trend": st.column_config.LineChartColumn("cases per day")},
    hide_index=True,
)
for row in rows[:10]:
    with st.container(border=True):
        st.markdown(
            f"**{literal(row.label)}** — {row.cases} cases, {row.open} open"
            + (f", fixed {row.fixed_at:%Y-%m-%d}" if row.fixed_at else "")
        )
        if row.examples:
            for column, uri in zip(st.columns(4), row.examples, strict=False):
                with column:
                    show_image(uri, width=96)

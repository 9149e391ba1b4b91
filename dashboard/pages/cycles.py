"""Cycles: lineage from cases to data to checkpoints, and each track's result."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.common import literal, page, session
from flywheel.cycle.status import cycle_lineage, status_report

page("Cycles")
with session() as s:
    report = status_report(s, cycles=50)
if not report.cycles:
    st.info("No cycle has run yet: `flywheel cycle --dry-run` shows what one would do.")
    st.stop()
chosen = st.selectbox(
    "Cycle",
    [c.id for c in report.cycles],
    format_func=lambda i: next(f"#{c.id} {c.status}" for c in report.cycles if c.id == i),
)
with session() as s:
    lineage = cycle_lineage(s, cycle_id=chosen)
assert lineage is not None
st.markdown(
    f"**Cycle {lineage.id}** — {lineage.status}; base **{literal(lineage.base or '-')}**, "
    f"candidate **{literal(lineage.candidate or '-')}**"
)
if lineage.rounds:
    st.subheader("Per track, before / after on the routed failure slice")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "track": r.track,
                    "recipe": r.recipe,
                    "status": r.status,
                    "cases": len(r.cases),
                    "failure rate before": r.failure_rate_before,
                    "after": r.failure_rate_after,
                }
                for r in lineage.rounds
            ]
        ),
        hide_index=True,
    )
    for r in lineage.rounds:
        with st.expander(f"{r.track}: cases → data → training → checkpoint"):
            st.markdown(f"**Cases** ({len(r.cases)}): " + ", ".join(f"#{i}" for i in r.cases[:60]))
            st.markdown("**Data**")
            st.json(r.data)
            st.markdown("**Training**")
            st.json(r.stages)
            st.markdown("**Checkpoints**")
            for line in r.checkpoints or ["(none registered)"]:
                st.code(line, language=None)
else:
    st.caption("This cycle trained nothing.")
if lineage.regression:
    reg = lineage.regression
    st.metric(
        "Regression suite",
        f"{reg['score_after']:.3f}",
        delta=f"{float(reg['score_after']) - float(reg['score_before']):+.3f}",  # type: ignore[arg-type]
    )
if lineage.gate:
    st.markdown(f"**Gate**: {'passed' if lineage.gate.get('passed') else 'failed'}")
if lineage.outcome:
    st.markdown("**Outcome**")
    st.json(lineage.outcome)
if lineage.review_items:
    st.caption(
        "Review items: "
        + ", ".join(f"#{i} {kind} ({status})" for i, kind, status in lineage.review_items)
    )

"""Overview: signal volume, routing mix, open cases, cycle history, before / after."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.common import literal, page, session
from flywheel.cases.browse import signal_volume
from flywheel.cycle.status import status_report

page("Overview")
with session() as s:
    report = status_report(s, cycles=20)
    volume = signal_volume(s, days=30)

model = report.model
st.caption(f"Serving model: **{literal(model.version)}**" if model else "No model promoted yet.")
left, middle, right = st.columns(3)
left.metric("Open cases", sum(report.cases.values()))
middle.metric("Waiting for review", sum(report.review_queue.values()))
right.metric("Cycles", len(report.cycles))

st.subheader("Signals per day, by source")
if volume:
    frame = pd.DataFrame.from_dict(volume, orient="index").fillna(0).sort_index()
    st.bar_chart(frame)
else:
    st.info("No signals in the last 30 days.")

st.subheader("Routing mix per track")
if report.tracks:
    mix = pd.DataFrame.from_dict(report.tracks, orient="index").fillna(0)
    st.bar_chart(mix)
else:
    st.info("No routed cases yet.")

st.subheader("Open cases by status")
if report.cases:
    st.bar_chart(pd.Series(report.cases, name="cases"))
else:
    st.info("No open cases.")

st.subheader("Cycles")
rows = []
for cycle in report.cycles:
    summary = cycle.summary or {}
    evaluation = summary.get("evaluation")
    tracks = evaluation.get("tracks") if isinstance(evaluation, dict) else None
    for track, figures in (tracks or {}).items():
        rows.append(
            {
                "cycle": cycle.id,
                "track": track,
                "before": figures["failure_rate_before"],
                "after": figures["failure_rate_after"],
            }
        )
history = pd.DataFrame(
    [
        {
            "cycle": c.id,
            "status": c.status,
            "started": c.started_at,
            "finished": c.finished_at,
        }
        for c in report.cycles
    ]
)
if history.empty:
    st.info("No cycle has run yet: `flywheel cycle`, or `flywheel demo`.")
else:
    st.dataframe(history, hide_index=True)
if rows:
    st.subheader("Routed failure rate, before / after each cycle")
    frame = pd.DataFrame(rows)
    frame["label"] = frame["cycle"].astype(str) + " · " + frame["track"]
    st.bar_chart(frame.set_index("label")[["before", "after"]], stack=False)

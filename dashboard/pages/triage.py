"""Triage: failure cases with filters, their images and evidence; override a route."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pandas as pd
import streamlit as st

from dashboard.common import PAGE_SIZE, code_span, literal, page, reviewer, session, show_image
from flywheel.cases.browse import CaseFilters, case_detail, case_page, clusters, model_versions
from flywheel.db.models import CaseStatus, SignalSource, Track

page("Triage")

with session() as s:
    known_clusters = {c.id: f"{c.label} ({c.cases})" for c in clusters(s, limit=200)}
    versions = model_versions(s)

with st.expander("Filters", expanded=True):
    a, b, c, d = st.columns(4)
    track = a.selectbox("Track", ["any", *[t.value for t in Track]])
    status = b.selectbox("Status", ["any", *[x.value for x in CaseStatus]])
    source = c.selectbox("Source", ["any", *[x.value for x in SignalSource]])
    version = d.selectbox("Model version", ["any", *versions])
    e, f, g = st.columns([2, 1, 1])
    cluster = e.selectbox(
        "Cluster", [0, *known_clusters], format_func=lambda i: known_clusters.get(i, "any")
    )
    low, high = f.slider("Confidence", 0.0, 1.0, (0.0, 1.0), step=0.05)
    since = g.date_input("Seen since", value=None)

filters = CaseFilters(
    track=Track(track) if track != "any" else None,
    status=CaseStatus(status) if status != "any" else None,
    source=SignalSource(source) if source != "any" else None,
    model_version=version if version != "any" else None,
    cluster_id=cluster or None,
    min_confidence=low if low > 0 else None,
    max_confidence=high if high < 1 else None,
    since=datetime.combine(since, time(), tzinfo=UTC) if since else None,
)
key = filters.model_dump_json()
if st.session_state.get("triage_filters") != key:  # new filters: back to the first page
    st.session_state["triage_filters"] = key
    st.session_state["triage_pages"] = [None]
pages: list[int | None] = st.session_state["triage_pages"]

with session() as s:
    found = case_page(s, filters=filters, before_id=pages[-1], limit=PAGE_SIZE)

if not found.items:
    st.info("No failure case matches these filters.")
    st.stop()
st.dataframe(
    pd.DataFrame(
        [
            {
                "case": c.id,
                "status": c.status,
                "track": c.track,
                "confidence": c.confidence,
                "by": c.decided_by,
                "cluster": c.cluster,
                "model": c.model_version,
                "signals": c.signals,
                "prompt": c.prompt,
                "last seen": c.last_seen_at,
            }
            for c in found.items
        ]
    ),
    hide_index=True,
)
left, middle, right = st.columns([1, 1, 4])
if left.button("Newer", disabled=len(pages) == 1):
    pages.pop()
    st.rerun()
if middle.button("Older", disabled=found.next_before is None):
    pages.append(found.next_before)
    st.rerun()
right.caption(f"page {len(pages)}, {len(found.items)} cases")

chosen = st.selectbox(
    "Case",
    [c.id for c in found.items],
    format_func=lambda i: next(f"#{c.id} {c.prompt[:80]}" for c in found.items if c.id == i),
)
with session() as s:
    detail = case_detail(s, case_id=chosen)
assert detail is not None
case = detail.case
st.subheader(f"Case {case.id}: {case.status}")
st.markdown(literal(case.prompt))
images = [sig for sig in detail.signals if sig.image_uri][:6]
if images:
    columns = st.columns(len(images))
    for column, sig in zip(columns, images, strict=True):
        with column:
            show_image(sig.image_uri, caption=f"{sig.source} #{sig.id}")

if detail.routes:
    route = detail.routes[0]
    st.markdown(
        f"**Route**: {route.track} ({route.confidence:.2f}) by {route.decided_by} "
        f"{code_span(route.decider_ref)}" + (f" — {literal(route.reason)}" if route.reason else "")
    )
    features = route.evidence.get("features") or {}
    if features:
        st.markdown("**Evidence**")
        one, two, three = st.columns(3)
        one.metric("Rewrite gain", f"{features.get('rewrite_gain', 0):+.2f}")
        one.caption(f"rewritten: {literal(features.get('rewritten_prompt', ''))}")
        scarcity = features.get("scarcity")
        two.metric("Scarcity", f"{scarcity:.2f}" if scarcity is not None else "-")
        rarity = features.get("concept_rarity")
        two.caption(f"concept rarity {rarity:.3f}" if rarity is not None else "no concept tag")
        three.metric("Reward rank", f"{features.get('reward_rank', 0):.2f}")
        three.caption("high: the reward sees nothing wrong (reward vs human disagree)")
        neighbours = features.get("nearest_corpus") or []
        if neighbours:
            st.caption("Nearest corpus captions: " + " · ".join(map(literal, neighbours)))
        probabilities = route.evidence.get("probabilities") or {}
        if probabilities:
            st.bar_chart(pd.Series(probabilities, name="probability"))
    if len(detail.routes) > 1:
        st.caption(
            "Earlier routes: "
            + "; ".join(f"{r.track} by {literal(r.decider_ref)}" for r in detail.routes[1:])
        )

st.markdown("**Override the route**")
name = reviewer()
if name is None:
    st.info("Sign in (sidebar) to override routes.")
elif case.status not in ("open", "routed", "awaiting_triage"):
    st.caption(f"A {case.status} case keeps its route.")
else:
    with st.form(f"override-{case.id}"):
        new_track = st.selectbox("Track", [t.value for t in Track])
        why = st.text_input("Why")
        if st.form_submit_button("Route it"):
            from flywheel.attribution.service import override_route

            try:
                with session() as s:
                    override_route(
                        s,
                        case_id=case.id,
                        track=Track(new_track),
                        reviewer=name,
                        reason=why or None,
                    )
            except (LookupError, ValueError) as exc:
                st.error(literal(exc))
            else:
                st.success(f"Case {case.id} routed to {new_track} by {literal(name)}.")

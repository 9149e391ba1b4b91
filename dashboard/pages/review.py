"""Review queue: claim the next item, see its artefact, decide."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.common import literal, page, reviewer, session, show_image
from flywheel.db.models import ReviewKind, Track
from flywheel.review.service import (
    ItemNotFoundError,
    ReviewError,
    ReviewItemOut,
    approve,
    claim_next,
    claimed_by,
    list_queue,
    reject,
    release,
)

page("Review queue")
with session() as s:
    waiting = list_queue(s, limit=200)
counts = pd.Series([i.kind for i in waiting], dtype="object").value_counts()
st.caption(
    f"{len(waiting)} waiting"
    + (": " + ", ".join(f"{n} {k}" for k, n in counts.items()) if len(waiting) else "")
)
name = reviewer()
if name is None:
    st.info("Sign in (sidebar) to claim and decide items.")
    st.stop()

kinds = ["any", *[k.value for k in ReviewKind]]
left, right = st.columns([3, 1])
kind = left.selectbox("Claim the next", kinds)
if right.button("Claim", type="primary"):
    with session() as s:
        item = claim_next(s, reviewer=name, kind=ReviewKind(kind) if kind != "any" else None)
    if item is None:
        st.info("Nothing is waiting.")
    else:
        st.toast(f"#{item.id} is yours for 15 minutes")

with session() as s:
    mine = claimed_by(s, reviewer=name)
if not mine:
    st.info("You hold no item: claim one.")
    st.stop()


def _promotion(artefact: dict[str, Any]) -> None:
    evaluation = artefact.get("evaluation") or {}
    st.markdown(
        f"Candidate **{literal(artefact.get('candidate'))}** "
        f"vs serving **{literal(artefact.get('base'))}**"
    )
    tracks = evaluation.get("tracks") or {}
    if tracks:
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "track": t,
                        "cases": f["cases"],
                        "failure rate, current": f["failure_rate_before"],
                        "failure rate, candidate": f["failure_rate_after"],
                    }
                    for t, f in tracks.items()
                ]
            ),
            hide_index=True,
        )
    regression = evaluation.get("regression") or {}
    if regression:
        st.metric(
            "Regression suite",
            f"{regression['score_after']:.3f}",
            delta=f"{regression['score_after'] - regression['score_before']:+.3f}",
        )
    gate = artefact.get("gate") or {}
    st.markdown(
        f"Gate: **{'passed' if gate.get('passed') else 'failed'}**, "
        f"{literal(gate.get('fixed'))} fixed"
    )


def _augmentation(artefact: dict[str, Any]) -> None:
    plan = artefact.get("plan") or {}
    st.markdown(
        f"Concepts **{literal(', '.join(plan.get('concepts') or []))}**: "
        f"{len(plan.get('retrieved') or [])} retrieved, "
        f"synthesized {literal(plan.get('synthesized'))}, {literal(plan.get('replay'))} "
        f"replayed, mixture weight {literal(plan.get('mixture_weight'))}"
    )
    shares = (artefact.get("diagnosis") or {}).get("concepts") or []
    if shares:
        st.bar_chart(pd.Series({c["concept"]: c["share"] for c in shares}, name="corpus share"))
    retrieved = plan.get("retrieved") or []
    if retrieved:
        st.dataframe(
            pd.DataFrame([{"key": r.get("key"), "text": r.get("text")} for r in retrieved[:200]]),
            hide_index=True,
        )


def _recalibration(artefact: dict[str, Any]) -> None:
    """People's preference pairs and the reward's agreement with them: the world's artefact
    (under ``preferences``, with the round's prompts) or a team stack's (flat)."""
    preferences = artefact.get("preferences")
    data = preferences if isinstance(preferences, dict) else artefact
    st.markdown(
        f"{literal(data.get('pairs'))} preference pairs from people's feedback; the reward "
        "is recalibrated on them before the round trains against it"
    )
    agreement = data.get("agreement") or {}
    if isinstance(agreement, dict) and isinstance(agreement.get("agreement"), dict):
        agreement = agreement["agreement"]  # a team stack's: per category
    if agreement:
        st.markdown("How often the current reward prefers what people preferred")
        st.bar_chart(pd.Series(agreement, name="agreement"))
    counts = data.get("by_source") or {}
    if counts:
        st.dataframe(pd.Series(counts, name="pairs"))
    prompts = artefact.get("prompts") or []
    if prompts:
        st.dataframe(pd.DataFrame({"round prompt": prompts[:200]}), hide_index=True)


def _enhancer_data(artefact: dict[str, Any]) -> None:
    st.markdown(
        f"{literal(artefact.get('pairs'))} pairs for "
        f"**{literal(', '.join(artefact.get('concepts') or []))}** "
        f"({literal(artefact.get('user_worded'))} in the users' words, "
        f"{literal(artefact.get('echo'))} echo)"
    )
    examples = artefact.get("examples") or []
    if examples:
        st.dataframe(pd.DataFrame(examples, columns=["user prompt", "enhanced"]), hide_index=True)


def _triage(artefact: dict[str, Any], item: ReviewItemOut) -> None:
    features = artefact.get("features") or {}
    st.markdown(f"**Prompt**: {literal(artefact.get('prompt'))}")
    st.markdown(f"Rewritten: {literal(features.get('rewritten_prompt', '-'))}")
    probabilities = artefact.get("probabilities") or {}
    if probabilities:
        st.bar_chart(pd.Series(probabilities, name="probability"))
    from flywheel.cases.browse import case_detail

    if item.case_id is not None:
        with session() as s:
            detail = case_detail(s, case_id=item.case_id)
        if detail is not None:
            shown = [sig for sig in detail.signals if sig.image_uri][:4]
            for column, sig in zip(st.columns(4), shown, strict=False):
                with column:
                    show_image(sig.image_uri, caption=f"{sig.source} #{sig.id}")


_SHOW = {
    "model_promotion": lambda a, i: _promotion(a),
    "augmentation_batch": lambda a, i: _augmentation(a),
    "reward_recalibration": lambda a, i: _recalibration(a),
    "prompt_enhancer_data": lambda a, i: _enhancer_data(a),
    "triage_case": _triage,
}

for item in mine:
    with st.container(border=True):
        assert item.lease_expires_at is not None
        st.subheader(f"#{item.id} · {item.kind}")
        st.markdown(literal(item.title))
        st.caption(f"yours until {item.lease_expires_at:%H:%M:%S} UTC")
        artefact = item.artefact or {}
        _SHOW[item.kind](artefact, item)
        with st.expander("The artefact as stored"):
            st.json(artefact)
        with st.form(f"decide-{item.id}"):
            decision = st.radio("Decision", ["approve", "reject", "release"], horizontal=True)
            track = (
                st.selectbox("Route the case to", [t.value for t in Track])
                if item.kind == "triage_case"
                else None
            )
            edits_text = (
                st.text_area("Edits (JSON object; approve as edited)", "")
                if item.kind not in ("triage_case", "model_promotion")
                else ""
            )
            reason = st.text_input("Reason")
            if st.form_submit_button("Submit"):
                try:
                    edits = json.loads(edits_text) if edits_text.strip() else None
                    with session() as s:
                        if decision == "approve":
                            out = approve(
                                s,
                                item_id=item.id,
                                reviewer=name,
                                reason=reason or None,
                                track=Track(track) if track else None,
                                edits=edits,
                            )
                        elif decision == "reject":
                            out = reject(s, item_id=item.id, reviewer=name, reason=reason)
                        else:
                            out = release(s, item_id=item.id, reviewer=name)
                except json.JSONDecodeError as exc:
                    st.error(f"The edits are not JSON: {exc.msg}")
                except (ReviewError, ItemNotFoundError) as exc:
                    st.error(literal(exc))
                else:
                    st.success(f"#{out.id}: {out.status}")
                    st.rerun()

"""Themes: failure cases grouped into clusters with a label a person can read.

:func:`assign_themes` gives every open case without a cluster one:

- **Evaluated failures** carry the evaluator's element verdicts (``details.spec.elements``
  of their signals, as ``flywheel eval`` and the probe miner store them): their theme is the
  skill and what was asked and missed, e.g. ``colour: purple`` or ``count: 3`` — one cluster
  per such label.
- **Other failures** (feedback, other miner hits) are themed by prompt: each joins the prompt
  cluster whose centroid (mean unit embedding of its members' prompts) is within
  ``similarity``; the rest are grouped by average-linkage clustering at that similarity
  (scipy) and each new cluster is labelled by its most distinctive words (class-based
  TF-IDF against every open case's prompt): ``prompts: cat, hat``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy.cluster.hierarchy import fcluster, linkage
from sqlalchemy.orm import Session

from flywheel.cases import repository
from flywheel.db.models import Json
from retrieval.embedding import TextEmbedder

PROMPT_THEME = "prompts: "
"""The label prefix of clusters themed by prompt."""

_WORD = re.compile(r"[^\W\d_]{3,}")
_STOPWORDS = frozenset(
    [
        "the",
        "and",
        "with",
        "for",
        "from",
        "that",
        "this",
        "its",
        "are",
        "was",
        "were",
        "has",
        "have",
        "into",
        "onto",
        "over",
        "under",
        "very",
        "some",
        "any",
        "all",
        "not",
        "but",
        "one",
        "two",
        "three",
    ]
)


@dataclass(kw_only=True, slots=True)
class ThemeConfig:
    """How prompt themes are drawn."""

    similarity: float = 0.7
    """Cosine similarity from which a prompt belongs to a theme."""
    label_words: int = 3
    """Words in a prompt theme's label."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if not 0.0 < self.similarity < 1.0 or self.label_words < 1:
            raise ValueError("ThemeConfig: similarity in (0, 1), label_words >= 1")


class ThemeReport(BaseModel):
    """What one :func:`assign_themes` call did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cases_themed: int
    clusters_created: int
    labels: dict[str, int]
    """Cases given each label by this call."""


def evaluation_theme(details: Json) -> str | None:
    """``<skill>: <what was asked and missed>`` from an evaluation signal's details, or None."""
    if not isinstance(details, dict):
        return None
    skill, spec = details.get("skill"), details.get("spec")
    elements = spec.get("elements") if isinstance(spec, dict) else None
    if not isinstance(skill, str) or not isinstance(elements, list):
        return None
    failed = [e for e in elements if isinstance(e, dict) and e.get("passed") is False]
    own = [e for e in failed if e.get("kind") == skill] or failed
    asked = sorted({str(e.get("asked")) for e in own})
    return f"{skill}: {', '.join(asked[:3])}" if asked else None


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.casefold()) if w not in _STOPWORDS]


def distinctive_words(group: Sequence[str], everything: Sequence[str], count: int) -> list[str]:
    """The ``count`` words of ``group``'s texts that are frequent there and rare in
    ``everything`` (class-based TF-IDF), most distinctive first, ties alphabetical."""
    documents = [set(_words(text)) for text in everything]
    frequency = Counter(w for text in group for w in _words(text))
    total = sum(frequency.values()) or 1

    def score(word: str) -> float:
        seen = sum(word in doc for doc in documents)
        return frequency[word] / total * math.log(1 + len(documents) / max(seen, 1))

    return sorted(frequency, key=lambda w: (-score(w), w))[:count]


def assign_themes(
    session: Session, *, embedder: TextEmbedder, config: ThemeConfig | None = None
) -> ThemeReport:
    """Give every open case without a cluster its theme (see the module docstring)."""
    config = config or ThemeConfig()
    config.validate()
    cases = repository.unthemed_open_cases(session)
    if not cases:
        return ThemeReport(cases_themed=0, clusters_created=0, labels={})
    details = repository.evaluation_details(session, case_ids=[c.id for c in cases])
    clusters = repository.clusters_by_label(session)
    labels: Counter[str] = Counter()
    created = 0
    by_prompt = []
    for case in cases:
        label = next(
            (t for t in map(evaluation_theme, details.get(case.id, [])) if t is not None), None
        )
        if label is None:
            by_prompt.append(case)
            continue
        if label not in clusters:
            clusters[label] = repository.insert_cluster(session, label=label)
            created += 1
        repository.set_cluster(session, case_ids=[case.id], cluster_id=clusters[label])
        labels[label] += 1

    if by_prompt:
        vectors = embedder.embed([c.prompt for c in by_prompt])  # (n, d)
        members = repository.cluster_prompts(session, label_prefix=PROMPT_THEME)
        ids = list(members)
        label_of = {cluster_id: label for label, cluster_id in clusters.items()}
        label_of.update(repository.cluster_labels(session, cluster_ids=ids))
        centroids = _centroids(embedder, [members[i] for i in ids])  # (m, d)
        rest = []
        for row, case in enumerate(by_prompt):
            if len(ids):
                similarities = centroids @ vectors[row]
                best = int(np.argmax(similarities))
                if similarities[best] >= config.similarity:
                    repository.set_cluster(session, case_ids=[case.id], cluster_id=ids[best])
                    labels[label_of[ids[best]]] += 1
                    continue
            rest.append(row)
        everything = repository.open_case_prompts(session)
        for group in _groups(vectors[rest], config.similarity):
            chosen = [by_prompt[rest[i]] for i in group]
            words = distinctive_words([c.prompt for c in chosen], everything, config.label_words)
            label = PROMPT_THEME + (", ".join(words) or chosen[0].prompt[:60])
            if label not in clusters:  # a theme of that label (its cases fixed, say) is reused
                clusters[label] = repository.insert_cluster(session, label=label)
                created += 1
            cluster_id = clusters[label]
            repository.set_cluster(session, case_ids=[c.id for c in chosen], cluster_id=cluster_id)
            labels[label] += len(chosen)
    session.commit()
    return ThemeReport(
        cases_themed=sum(labels.values()), clusters_created=created, labels=dict(labels)
    )


def _centroids(embedder: TextEmbedder, prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """(m, d) unit mean embeddings of each cluster's prompts."""
    if not prompts:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    rows = [embedder.embed(list(group)).mean(axis=0) for group in prompts]
    matrix = np.stack(rows)
    unit: np.ndarray = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return unit


def _groups(vectors: np.ndarray, similarity: float) -> list[list[int]]:
    """Rows of ``vectors`` grouped by average linkage at cosine distance 1 - similarity,
    groups in order of their first row."""
    if len(vectors) == 0:
        return []
    if len(vectors) == 1:
        return [[0]]
    tree = linkage(vectors, method="average", metric="cosine")
    assignment = fcluster(tree, t=1.0 - similarity, criterion="distance")
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(assignment.tolist()):
        groups.setdefault(group, []).append(row)
    return list(groups.values())

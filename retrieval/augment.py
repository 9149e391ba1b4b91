"""Retrieval for augmentation: diverse data that would fill a gap, with its provenance.

For a failure's prompt, :func:`retrieve_for_augmentation` asks a collection for neighbours in
the candidate pool (and, if asked, the corpus, whose items a round can up-weight), filtered
by tags. Relevance alone returns near-copies of one another; Qdrant's maximal marginal
relevance (MMR, ``diversity`` in [0, 1]: 0 is plain top-k) trades relevance for spread among
``candidates`` nearest points. Pool items that duplicate a corpus item (cosine similarity
>= ``duplicate_similarity`` to their nearest corpus point) are dropped: training already has
them. Each :class:`Candidate` carries its payload's provenance for the review queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict
from qdrant_client import QdrantClient, models

from retrieval.embedding import Vectors
from retrieval.index import CORPUS, POOL, Split
from retrieval.scarcity import CORPUS_FILTER
from retrieval.store import check_embedders


@dataclass(kw_only=True, slots=True)
class AugmentConfig:
    """What to retrieve for one query."""

    limit: int = 16
    """Candidates returned (fewer when duplicates are dropped)."""
    splits: tuple[Split, ...] = (POOL,)
    """Where to look: the candidate pool, and the corpus too if listed."""
    tags_all: tuple[str, ...] = ()
    """Tags every candidate must have."""
    tags_any: tuple[str, ...] = ()
    """Tags of which a candidate must have one (empty: no such condition)."""
    diversity: float = 0.5
    """MMR's diversity in [0, 1]; 0: plain nearest neighbours."""
    candidates: int = 100
    """Nearest points MMR chooses from."""
    extra: int = 8
    """Candidates fetched beyond ``limit`` so that dropped duplicates leave ``limit``."""
    duplicate_similarity: float = 0.98
    """A pool candidate this similar to a corpus item is a duplicate of it."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.limit < 1 or self.extra < 0 or self.candidates < self.limit + self.extra:
            raise ValueError("AugmentConfig: limit >= 1, extra >= 0, candidates >= limit + extra")
        if not 0.0 <= self.diversity <= 1.0:
            raise ValueError(f"AugmentConfig.diversity must be in [0, 1], got {self.diversity}")
        if not self.splits or set(self.splits) - {CORPUS, POOL}:
            raise ValueError(f"AugmentConfig.splits must be some of {CORPUS!r}, {POOL!r}")


class Candidate(BaseModel):
    """One retrieved item, as the review queue shows it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    point_id: str
    key: str
    dataset: str
    split: str
    similarity: float
    """Cosine similarity to the query."""
    text: str | None
    image: str | None
    tags: list[str]
    stage: int | None
    provenance: dict[str, str]
    nearest_corpus_similarity: float | None
    """For a pool candidate: its similarity to the nearest corpus item (how new it is)."""


def _filter(config: AugmentConfig) -> models.Filter:
    must: list[models.Condition] = [
        models.FieldCondition(key="split", match=models.MatchAny(any=list(config.splits)))
    ]
    must += [
        models.FieldCondition(key="tags", match=models.MatchValue(value=t)) for t in config.tags_all
    ]
    if config.tags_any:
        must.append(
            models.FieldCondition(key="tags", match=models.MatchAny(any=list(config.tags_any)))
        )
    return models.Filter(must=must)


def retrieve_for_augmentation(
    client: QdrantClient,
    name: str,
    vector: str,
    model_id: str,
    query: Vectors,
    config: AugmentConfig,
) -> list[Candidate]:
    """Diverse candidates near ``query`` (one unit-norm row) in collection ``name``'s
    ``vector`` vectors (built by ``model_id``); see the module docstring."""
    config.validate()
    check_embedders(client, name, {vector: model_id})
    row = np.asarray(query, dtype=np.float32).reshape(-1).tolist()
    nearest: models.NearestQuery = models.NearestQuery(
        nearest=row,
        mmr=models.Mmr(diversity=config.diversity, candidates_limit=config.candidates)
        if config.diversity > 0
        else None,
    )
    hits = client.query_points(
        name,
        query=nearest,
        using=vector,
        query_filter=_filter(config),
        limit=config.limit + config.extra,
        with_payload=True,
        with_vectors=[vector],
    ).points
    # MMR scores are its own trade-off; report the plain similarity to the query.
    similarities = [float(np.dot(_vector(hit, vector), row)) for hit in hits]
    pool = [i for i, hit in enumerate(hits) if (hit.payload or {}).get("split") == POOL]
    closest: dict[int, float] = {}
    if pool:
        responses = client.query_batch_points(
            name,
            requests=[
                models.QueryRequest(
                    query=_vector(hits[i], vector), using=vector, filter=CORPUS_FILTER, limit=1
                )
                for i in pool
            ],
        )
        for i, response in zip(pool, responses, strict=True):
            closest[i] = response.points[0].score if response.points else -1.0
    out = []
    for i, hit in enumerate(hits):
        if closest.get(i, -1.0) >= config.duplicate_similarity:
            continue
        payload = hit.payload or {}
        out.append(
            Candidate(
                point_id=str(hit.id),
                key=str(payload.get("key")),
                dataset=str(payload.get("dataset")),
                split=str(payload.get("split")),
                similarity=similarities[i],
                text=payload.get("text"),
                image=payload.get("image"),
                tags=list(payload.get("tags") or []),
                stage=payload.get("stage"),
                provenance=dict(payload.get("provenance") or {}),
                nearest_corpus_similarity=closest.get(i),
            )
        )
    return out[: config.limit]


def redundancy(vectors: Vectors | Sequence[Sequence[float]]) -> float:
    """Mean pairwise cosine similarity of unit-norm ``vectors`` (lower: more diverse)."""
    matrix = np.asarray(vectors, dtype=np.float64)
    if len(matrix) < 2:
        return 0.0
    gram = matrix @ matrix.T
    n = len(matrix)
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


def _vector(hit: models.ScoredPoint, vector: str) -> list[float]:
    vectors = hit.vector
    if not isinstance(vectors, dict) or vector not in vectors:
        raise ValueError(f"point {hit.id} came back without its {vector!r} vector")
    return list(vectors[vector])  # type: ignore[arg-type]

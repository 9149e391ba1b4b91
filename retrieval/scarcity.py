"""Data-scarcity diagnosis: is a failure's concept rare in what the model was trained on?

A concept the training corpus holds in plenty has close neighbours there; a scarce one has
few and far ones. "Close" only means something next to the corpus' own density, so a
:class:`Calibration` measures it first: for ``points`` corpus points (a seeded sample), the
mean similarity of each one's ``k`` nearest *other* corpus points. A query's mean ``k``-NN
similarity to the corpus is then placed in that distribution::

    scarcity = share of calibration points whose neighbourhood is denser than the query's
             = #{c : knn(c) > knn(query)} / points                  (in [0, 1])

0: denser than every sampled corpus point (a common concept); 1: sparser than all of them
(nothing like it was trained on). ``within_radius`` counts the corpus points closer than
the calibration's median ``k``-th neighbour similarity (the radius), and the nearest
examples come back as evidence. Everything is read from the ``split = corpus`` points of a
collection; :func:`diagnose` answers a batch of vectors with two batched queries, and
:func:`calibration_for` keeps the calibration in the collection's metadata until the corpus
changes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict
from qdrant_client import QdrantClient, models

from retrieval.embedding import Vectors
from retrieval.index import CORPUS
from retrieval.store import check_embedders, scroll_all

CORPUS_FILTER = models.Filter(
    must=[models.FieldCondition(key="split", match=models.MatchValue(value=CORPUS))]
)


@dataclass(kw_only=True, slots=True)
class ScarcityConfig:
    """How scarcity is measured."""

    k: int = 10
    """Neighbours whose mean similarity measures density."""
    calibration_points: int = 256
    """Corpus points sampled to calibrate (all of them if the corpus is smaller)."""
    evidence: int = 5
    """Nearest corpus examples returned with a diagnosis."""
    max_within_radius: int = 1000
    """Most neighbours counted within the radius."""
    seed: int = 0
    """Seed of the calibration sample."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.k < 1 or self.calibration_points < 2 or self.evidence < 0:
            raise ValueError("ScarcityConfig: k >= 1, calibration_points >= 2, evidence >= 0")


@dataclass(kw_only=True, slots=True)
class Calibration:
    """The corpus' own density: sorted mean k-NN similarities of sampled corpus points."""

    collection: str
    vector: str
    model_id: str
    k: int
    knn_similarities: np.ndarray
    """(points,) ascending."""
    radius: float
    """The median similarity of the sampled points' k-th neighbour."""

    def scarcity(self, knn_similarity: float) -> float:
        """Share of calibration points denser than ``knn_similarity``."""
        denser = len(self.knn_similarities) - np.searchsorted(
            self.knn_similarities, knn_similarity, side="right"
        )
        return float(denser) / len(self.knn_similarities)


class Neighbour(BaseModel):
    """One corpus example near the query."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    dataset: str
    similarity: float
    text: str | None
    image: str | None
    tags: list[str]


class Diagnosis(BaseModel):
    """How scarce one query is in the training corpus, with the evidence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scarcity: float
    """In [0, 1]; see the module docstring."""
    knn_similarity: float
    """Mean similarity of the k nearest corpus points."""
    corpus_knn_median: float
    """The same, median over the calibration points (what is normal for the corpus)."""
    within_radius: int
    """Corpus points closer than the radius (capped at ``max_within_radius``)."""
    radius: float
    neighbours: list[Neighbour]
    """The nearest corpus examples, nearest first."""


def calibrate(
    client: QdrantClient, name: str, vector: str, model_id: str, config: ScarcityConfig
) -> Calibration:
    """Measure the corpus' density in collection ``name`` (its ``vector`` vectors, built by
    ``model_id``)."""
    config.validate()
    check_embedders(client, name, {vector: model_id})
    ids = [str(point.id) for point in scroll_all(client, name, where=CORPUS_FILTER)]
    if len(ids) <= config.k:
        raise ValueError(f"{name}: {len(ids)} corpus points, need more than k = {config.k}")
    chosen = sorted(
        random.Random(config.seed).sample(ids, min(len(ids), config.calibration_points))
    )
    points = client.retrieve(name, ids=chosen, with_vectors=[vector])
    requests = [
        models.QueryRequest(
            query=_vector_of(point, vector),
            using=vector,
            filter=models.Filter(
                must=CORPUS_FILTER.must,
                must_not=[models.HasIdCondition(has_id=[point.id])],
            ),
            limit=config.k,
        )
        for point in points
    ]
    knn, kth = [], []
    for response in client.query_batch_points(name, requests=requests):
        scores = [hit.score for hit in response.points]
        knn.append(float(np.mean(scores)))
        kth.append(scores[-1])
    return Calibration(
        collection=name,
        vector=vector,
        model_id=model_id,
        k=config.k,
        knn_similarities=np.sort(np.asarray(knn)),
        radius=float(np.median(kth)),
    )


def calibration_for(
    client: QdrantClient, name: str, vector: str, model_id: str, config: ScarcityConfig
) -> Calibration:
    """The collection's stored calibration when it still fits (same embedder, ``k``, sample
    size and seed, and the same corpus points: ids and content digests), else a new one,
    stored in the collection's metadata (``calibration.<vector>``) for the next caller."""
    check_embedders(client, name, {vector: model_id})
    corpus_points, fingerprint = _corpus_fingerprint(client, name)
    metadata = client.get_collection(name).config.metadata or {}
    calibrations = dict(metadata.get("calibration") or {})
    stored = calibrations.get(vector)
    wanted = {
        "model_id": model_id,
        "k": config.k,
        "calibration_points": config.calibration_points,
        "seed": config.seed,
        "corpus_points": corpus_points,
        "corpus_fingerprint": fingerprint,
    }
    if isinstance(stored, dict) and all(stored.get(key) == value for key, value in wanted.items()):
        return Calibration(
            collection=name,
            vector=vector,
            model_id=model_id,
            k=config.k,
            knn_similarities=np.asarray(stored["knn_similarities"], dtype=np.float64),
            radius=float(stored["radius"]),
        )
    calibration = calibrate(client, name, vector, model_id, config)
    record = {
        **wanted,
        "knn_similarities": calibration.knn_similarities.tolist(),
        "radius": calibration.radius,
    }
    calibrations[vector] = record  # the other vectors' calibrations stay
    client.update_collection(name, metadata={"calibration": calibrations})
    return calibration


def diagnose(
    client: QdrantClient,
    calibration: Calibration,
    queries: Vectors,
    config: ScarcityConfig,
) -> list[Diagnosis]:
    """One :class:`Diagnosis` per row of ``queries`` (unit-norm vectors of the calibration's
    embedder), in two batched queries."""
    if calibration.k != config.k:
        raise ValueError(f"the calibration used k = {calibration.k}, the config k = {config.k}")
    check_embedders(client, calibration.collection, {calibration.vector: calibration.model_id})
    name, vector = calibration.collection, calibration.vector

    def corpus_queries(limit: int, **options: object) -> list[models.QueryResponse]:
        requests = [
            models.QueryRequest(
                query=row.tolist(), using=vector, filter=CORPUS_FILTER, limit=limit, **options
            )
            for row in queries
        ]
        return client.query_batch_points(name, requests=requests)

    nearest = corpus_queries(max(config.k, config.evidence), with_payload=True)
    close = corpus_queries(config.max_within_radius, score_threshold=calibration.radius)
    median = float(np.median(calibration.knn_similarities))
    out = []
    for hits, within in zip(nearest, close, strict=True):
        knn = float(np.mean([hit.score for hit in hits.points[: config.k]]))
        out.append(
            Diagnosis(
                scarcity=calibration.scarcity(knn),
                knn_similarity=knn,
                corpus_knn_median=median,
                within_radius=len(within.points),
                radius=calibration.radius,
                neighbours=[_neighbour(hit) for hit in hits.points[: config.evidence]],
            )
        )
    return out


def _neighbour(hit: models.ScoredPoint) -> Neighbour:
    payload = hit.payload or {}
    return Neighbour(
        key=str(payload.get("key")),
        dataset=str(payload.get("dataset")),
        similarity=hit.score,
        text=payload.get("text"),
        image=payload.get("image"),
        tags=list(payload.get("tags") or []),
    )


def _corpus_fingerprint(client: QdrantClient, name: str) -> tuple[int, str]:
    """How many corpus points there are, and a SHA-256 over their ids and digests."""
    points = scroll_all(client, name, where=CORPUS_FILTER, with_payload=["digest"])
    records = sorted(f"{point.id}:{(point.payload or {}).get('digest')}" for point in points)
    return len(records), hashlib.sha256("\n".join(records).encode()).hexdigest()


def _vector_of(point: models.Record, vector: str) -> list[float]:
    vectors = point.vector
    if not isinstance(vectors, dict) or vector not in vectors:
        raise ValueError(f"point {point.id} has no {vector!r} vector")
    return list(vectors[vector])  # type: ignore[arg-type]

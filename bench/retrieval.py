"""Benchmark of retrieval/: index throughput, query latency and recall@10 against exact search.

The points are caption embeddings of the world's scenes (all-MiniLM-L6-v2, 384-d): ``base``
distinct rich captions are embedded for real, and the collection of ``points`` is made of
them plus small Gaussian jitter, renormalized (the corpus' cluster structure, at any size
without embedding 100k captions). Measured, on the backend ``FLYWHEEL_QDRANT_URL`` names or
else qdrant-client's local mode on disk (the embedded default):

- index throughput, points per second: with embedding (``retrieval.index.index_items`` on
  real captions, ``base`` of them) and without (the same call path's upserts of precomputed
  vectors, ``points`` of them, in batches of 256, ``wait=True``);
- query latency: p50 / p99 of ``queries`` top-10 queries (held-out captions' vectors with
  jitter), one at a time, with and without a payload filter on ``split``;
- recall@10 of those queries against exact search (numpy, float64 cosine over all points),
  the baseline whose p50 is measured in the same run: ``qdrant / exact`` p50 ratio.

Local mode searches exactly (numpy under the hood), so its recall is 1.0 by construction and
its latency grows linearly with the points; a Qdrant server's HNSW index trades a little
recall for latency that stays flat. ``--quick`` (under 45 s): 10k points; the default adds
100k. The last line is ``recall@10: X``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from qdrant_client import QdrantClient, models

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.world.scenes import SceneConfig, captions, sample_scene
from retrieval.embedding import TextEmbedder, Vectors
from retrieval.index import CORPUS, POOL, Embedders, IndexItem, index_items
from retrieval.store import QdrantConfig, collection_name, ensure_collection, open_qdrant


def distinct_captions(n: int, seed: int) -> list[str]:
    """``n`` distinct rich captions of world scenes (no text), seeds from ``seed``."""
    found: dict[str, None] = {}
    scene_seed = seed
    config = SceneConfig(text_probability=0.0)
    while len(found) < n:
        found[captions(sample_scene(scene_seed, config)).rich] = None
        scene_seed += 1
    return list(found)


def jittered(base: Vectors, n: int, sigma: float, rng: np.random.Generator) -> Vectors:
    """``n`` unit vectors: rows of ``base`` in turn plus N(0, sigma^2) noise, renormalized."""
    rows = base[np.arange(n) % len(base)] + rng.normal(0.0, sigma, (n, base.shape[1]))
    unit: Vectors = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return unit


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``."""
    return float(np.percentile(np.asarray(values), q))


def run_size(
    client: QdrantClient,
    config: QdrantConfig,
    embedder: TextEmbedder,
    base: Vectors,
    queries: Vectors,
    points: int,
    rng: np.random.Generator,
) -> float:
    """Index ``points`` jittered vectors into a fresh collection, query, print; returns recall."""
    config = QdrantConfig(url=config.url, path=config.path, prefix=f"bench{points}")  # own
    name = ensure_collection(client, config, "prompts", {"text": (embedder.model_id, embedder.dim)})
    vectors = jittered(base, points, 0.02, rng)
    started = time.perf_counter()
    for start in range(0, points, 256):
        chunk = vectors[start : start + 256]
        client.upsert(
            name,
            points=[
                models.PointStruct(
                    id=start + i,
                    vector={"text": row.tolist()},
                    payload={"split": CORPUS if (start + i) % 4 else POOL, "key": str(start + i)},
                )
                for i, row in enumerate(chunk)
            ],
            wait=True,
        )
    upsert_rate = points / (time.perf_counter() - started)

    exact_ms, qdrant_ms, filtered_ms, recalls = [], [], [], []
    matrix = vectors.astype(np.float64)
    only_corpus = models.Filter(
        must=[models.FieldCondition(key="split", match=models.MatchValue(value=CORPUS))]
    )
    for query in queries:
        began = time.perf_counter()
        truth = set(np.argsort(-(matrix @ query.astype(np.float64)))[:10].tolist())
        exact_ms.append((time.perf_counter() - began) * 1e3)
        began = time.perf_counter()
        hits = client.query_points(name, query=query.tolist(), using="text", limit=10).points
        qdrant_ms.append((time.perf_counter() - began) * 1e3)
        recalls.append(len(truth & {int(h.id) for h in hits}) / 10)
        began = time.perf_counter()
        client.query_points(
            name, query=query.tolist(), using="text", limit=10, query_filter=only_corpus
        )
        filtered_ms.append((time.perf_counter() - began) * 1e3)
    recall = statistics.fmean(recalls)
    print(f"\n{points:,} points  ({'server ' + str(config.url) if config.url else 'local mode'})")
    print(f"  index without embedding: {upsert_rate:,.0f} points/s")
    print(
        f"  query top-10:  p50 {percentile(qdrant_ms, 50):.2f} ms  "
        f"p99 {percentile(qdrant_ms, 99):.2f} ms"
    )
    print(
        f"  with a split filter:  p50 {percentile(filtered_ms, 50):.2f} ms  "
        f"p99 {percentile(filtered_ms, 99):.2f} ms"
    )
    print(
        f"  exact numpy baseline:  p50 {percentile(exact_ms, 50):.2f} ms  "
        f"(qdrant / exact p50: {percentile(qdrant_ms, 50) / percentile(exact_ms, 50):.2f}x)"
    )
    print(f"  recall@10 vs exact: {recall:.3f}")
    client.delete_collection(name)
    return recall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k points only (under 45 s)")
    parser.add_argument(
        "--base", type=int, default=None, help="captions embedded for real (300 quick, 1000)"
    )
    parser.add_argument("--queries", type=int, default=200, help="queries per size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [10_000] if args.quick else [10_000, 100_000]
    if args.base is None:
        args.base = 300 if args.quick else 1000
    rng = np.random.default_rng(args.seed)

    embedder = TextEmbedder()
    texts = distinct_captions(args.base + args.queries, args.seed)
    url = os.environ.get("FLYWHEEL_QDRANT_URL")
    with tempfile.TemporaryDirectory() as tmp:
        # Its own collections (prefix "bench..."): never a deployment's flywheel_* ones.
        config = QdrantConfig(url=url, path=None if url else Path(tmp) / "qdrant", prefix="bench")
        client = open_qdrant(config)
        try:
            items = [IndexItem(dataset="bench", split=CORPUS, text=t) for t in texts[: args.base]]
            report = index_items(client, config, "prompts", items, Embedders(text=embedder))
            print(
                f"index with embedding (MiniLM, {args.base} captions): "
                f"{report.added / report.seconds:,.0f} points/s "
                f"({report.embed_seconds / report.seconds:.0%} of it embedding)"
            )
            client.delete_collection(collection_name(config, "prompts"))
            base = embedder.embed(texts[: args.base])
            queries = jittered(embedder.embed(texts[args.base :]), args.queries, 0.02, rng)
            recalls = [run_size(client, config, embedder, base, queries, n, rng) for n in sizes]
        finally:
            client.close()
    print(f"recall@10: {min(recalls):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

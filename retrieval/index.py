"""Indexing: dataset samples -> points of the collections, in batches, incrementally.

An :class:`IndexItem` is one sample as a collection sees it: a text (caption, prompt or
instruction) and / or an image, with its payload. Its point id is derived from its identity
(``uuid5`` of collection, split, dataset and key; a key defaults to the digest of the
content), so
indexing the same item twice writes one point; ``digest`` (SHA-256 over the text, the image
bytes and the payload) tells whether a stored point is still current, and :func:`prune`
deletes the points of a dataset that its current items no longer make. :func:`index_items`
reads the stored digests of a batch first and embeds and upserts only the new and the
changed items (``wait=True``: a returned report means the points are stored).

Payload of every point: ``key``, ``dataset``, ``split`` (:data:`CORPUS`, the training corpus,
or :data:`POOL`, the candidate pool), ``stage`` (curriculum stage or null), ``tags`` (the
annotation's, e.g. ``colour:purple``), ``text`` and ``image`` (path) where there are, the
``provenance`` (source dataset, split and origin URI) and the ``digest``. :func:`count_tagged`
and :func:`count_tags` count the points of a split by these fields (the scarcity of a concept
in the corpus).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict
from qdrant_client import QdrantClient, models
from rich.progress import Progress

from retrieval.embedding import ImageEmbedder, TextEmbedder, Vectors
from retrieval.store import (
    COLLECTIONS,
    VECTOR_KINDS,
    CollectionName,
    QdrantConfig,
    collection_name,
    ensure_collection,
    scroll_all,
)
from training.data import Sample, read_dataset

Split = Literal["corpus", "pool"]
CORPUS: Split = "corpus"
"""Payload ``split`` of what the model was trained on."""
POOL: Split = "pool"
"""Payload ``split`` of the candidate pool augmentation draws from."""

_T = TypeVar("_T")
_NAMESPACE = uuid.UUID("5f0e3c1e-7d0a-4b0c-9a51-6c1f2d8e4b37")


@dataclass(frozen=True, kw_only=True, slots=True)
class IndexItem:
    """One sample as a collection indexes it."""

    dataset: str
    """The dataset it belongs to."""
    split: Split
    """Training corpus or candidate pool."""
    text: str | None = None
    """Caption / prompt (``prompts``) or instruction (``edit_pairs``)."""
    image: Path | None = None
    """Target image (``images``) or source image (``edit_pairs``)."""
    key: str | None = None
    """Identity within the dataset (a sample id); None: the content's digest."""
    stage: int | None = None
    """Curriculum stage, if the dataset has stages."""
    tags: tuple[str, ...] = ()
    """Annotation tags (filterable)."""
    provenance: Mapping[str, str] = field(default_factory=dict)
    """Where the sample comes from (source dataset, split, origin URI)."""

    def content_digest(self) -> str:
        """SHA-256 over the text, the image's bytes and the payload fields."""
        digest = hashlib.sha256()
        if self.text is not None:
            digest.update(b"text\0" + self.text.encode())
        if self.image is not None:
            digest.update(b"image\0" + self.image.read_bytes())
        fields = [self.dataset, self.split, self.stage, sorted(self.tags), dict(self.provenance)]
        digest.update(json.dumps(fields, sort_keys=True).encode())
        return digest.hexdigest()

    def identity(self, digest: str) -> str:
        """The key, or the content digest for an item without one."""
        return self.key if self.key is not None else digest

    def point_id(self, collection: CollectionName, digest: str) -> str:
        """The point's id: ``uuid5`` of collection, split, dataset and identity (a corpus and
        a pool drawn from one dataset keep apart)."""
        name = f"{collection}\0{self.split}\0{self.dataset}\0{self.identity(digest)}"
        return str(uuid.uuid5(_NAMESPACE, name))


class IndexReport(BaseModel):
    """What one :func:`index_items` call did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    collection: str
    added: int
    updated: int
    unchanged: int
    seconds: float
    embed_seconds: float
    """Of ``seconds``, the time spent embedding."""


@dataclass(kw_only=True, slots=True)
class Embedders:
    """The embedders an indexing or a query needs (by kind)."""

    text: TextEmbedder | None = None
    image: ImageEmbedder | None = None

    def for_collection(self, collection: CollectionName) -> dict[str, tuple[str, int]]:
        """Vector name -> (model_id, dim) of ``collection``'s vectors."""
        out = {}
        for vector in COLLECTIONS[collection]:
            embedder = self.text if VECTOR_KINDS[vector] == "text" else self.image
            if embedder is None:
                raise ValueError(f"{collection} needs a {VECTOR_KINDS[vector]} embedder")
            out[vector] = (embedder.model_id, embedder.dim)
        return out

    def embed(self, vector: str, items: Sequence[IndexItem]) -> Vectors:
        """The ``vector`` vectors of ``items``."""
        if VECTOR_KINDS[vector] == "text":
            assert self.text is not None
            return self.text.embed([_required(item.text, "text") for item in items])
        assert self.image is not None
        return self.image.embed([_required(item.image, "image") for item in items])


def _required(value: _T | None, what: str) -> _T:
    if value is None:
        raise ValueError(f"an item without its {what}")
    return value


def index_items(
    client: QdrantClient,
    config: QdrantConfig,
    collection: CollectionName,
    items: Sequence[IndexItem],
    embedders: Embedders,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> IndexReport:
    """Index ``items`` into ``collection`` (created if missing): new and changed items are
    embedded and upserted, current ones skipped."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    name = ensure_collection(client, config, collection, embedders.for_collection(collection))
    start, embed_seconds = time.perf_counter(), 0.0
    added = updated = unchanged = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"indexing {name}", total=len(items))
        for batch in _batches(items, batch_size):
            digests = [item.content_digest() for item in batch]
            ids = [item.point_id(collection, d) for item, d in zip(batch, digests, strict=True)]
            stored = {
                str(point.id): (point.payload or {}).get("digest")
                for point in client.retrieve(name, ids=ids, with_payload=["digest"])
            }
            todo = [
                (item, digest, point_id)
                for item, digest, point_id in zip(batch, digests, ids, strict=True)
                if stored.get(point_id) != digest
            ]
            unchanged += len(batch) - len(todo)
            added += sum(point_id not in stored for _, _, point_id in todo)
            updated += sum(point_id in stored for _, _, point_id in todo)
            if todo:
                began = time.perf_counter()
                vectors = {
                    vector: embedders.embed(vector, [item for item, _, _ in todo])
                    for vector in COLLECTIONS[collection]
                }
                embed_seconds += time.perf_counter() - began
                points = [
                    models.PointStruct(
                        id=point_id,
                        vector={vector: vectors[vector][row].tolist() for vector in vectors},
                        payload=_payload(item, digest),
                    )
                    for row, (item, digest, point_id) in enumerate(todo)
                ]
                client.upsert(name, points=points, wait=True)
            bar.advance(task, len(batch))
    return IndexReport(
        collection=name,
        added=added,
        updated=updated,
        unchanged=unchanged,
        seconds=time.perf_counter() - start,
        embed_seconds=embed_seconds,
    )


def prune(
    client: QdrantClient,
    config: QdrantConfig,
    collection: CollectionName,
    items: Sequence[IndexItem],
    *,
    dataset: str,
    split: Split,
) -> int:
    """Delete the points of ``dataset`` / ``split`` in ``collection`` that none of ``items``
    (the dataset as it is now) makes: samples removed from the dataset, and the old points of
    keyless items whose content changed. Returns how many were deleted."""
    name = collection_name(config, collection)
    if not client.collection_exists(name):
        return 0
    keep = {item.point_id(collection, item.content_digest()) for item in items}
    which = _where(split, dataset=dataset)
    stale = [
        point.id for point in scroll_all(client, name, where=which) if str(point.id) not in keep
    ]
    if stale:
        client.delete(name, points_selector=models.PointIdsList(points=stale), wait=True)
    return len(stale)


# ---- counts by the payload ---------------------------------------------------------------

FACET_LIMIT = 100_000
"""Most distinct tags one facet query counts; a collection with more is counted by a scroll."""


def _where(split: str, *, dataset: str | None = None, tag: str | None = None) -> models.Filter:
    """The points of ``split`` (of ``dataset`` and with ``tag``, when given)."""
    must: list[models.Condition] = []
    if dataset is not None:
        must.append(models.FieldCondition(key="dataset", match=models.MatchValue(value=dataset)))
    must.append(models.FieldCondition(key="split", match=models.MatchValue(value=split)))
    if tag is not None:
        must.append(models.FieldCondition(key="tags", match=models.MatchValue(value=tag)))
    return models.Filter(must=must)


def count_tagged(
    client: QdrantClient,
    name: str,
    split: str,
    tag: str | None = None,
    *,
    dataset: str | None = None,
) -> int:
    """Points of ``split`` in collection ``name`` (with ``tag`` and of ``dataset``, when
    given): one exact count."""
    where = _where(split, dataset=dataset, tag=tag)
    return client.count(name, count_filter=where, exact=True).count


def count_tags(
    client: QdrantClient,
    name: str,
    dataset: str | None,
    split: str,
    *,
    limit: int = FACET_LIMIT,
) -> Counter[str]:
    """Points of ``dataset`` (None: every dataset) / ``split`` in collection ``name`` per
    tag: one exact facet query, or (when the facet may have been cut at ``limit`` values) a
    scroll over the points' tags."""
    where = _where(split, dataset=dataset)
    facet = client.facet(name, key="tags", facet_filter=where, limit=limit, exact=True)
    if len(facet.hits) < limit:
        return Counter({str(hit.value): hit.count for hit in facet.hits})
    counts: Counter[str] = Counter()
    offset = None
    while True:  # page by page: only one page of payloads in memory
        page, offset = client.scroll(
            name, scroll_filter=where, limit=1024, offset=offset, with_payload=["tags"]
        )
        for point in page:
            counts.update(set((point.payload or {}).get("tags") or []))
        if offset is None:
            return counts


TERM = re.compile(r"[^\W_]+")
"""A term of a text: a run of letters and digits (compared case-folded)."""


def terms(text: str) -> set[str]:
    """The distinct terms of ``text``, case-folded."""
    return set(TERM.findall(text.casefold()))


def count_terms(
    client: QdrantClient, name: str, split: str, *, dataset: str | None = None
) -> Counter[str]:
    """Per term, how many points of ``split`` (of ``dataset``, when given) in collection
    ``name`` have it in their ``text`` (a scroll, one page of payloads in memory at a time)."""
    where = _where(split, dataset=dataset)
    counts: Counter[str] = Counter()
    offset = None
    while True:
        page, offset = client.scroll(
            name, scroll_filter=where, limit=1024, offset=offset, with_payload=["text"]
        )
        for point in page:
            text = (point.payload or {}).get("text")
            if isinstance(text, str):
                counts.update(terms(text))
        if offset is None:
            return counts


def _batches(items: Sequence[IndexItem], size: int) -> Iterator[Sequence[IndexItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _payload(item: IndexItem, digest: str) -> dict[str, object]:
    return {
        "key": item.identity(digest),
        "dataset": item.dataset,
        "split": item.split,
        "stage": item.stage,
        "tags": list(item.tags),
        "text": item.text,
        "image": str(item.image) if item.image is not None else None,
        "provenance": dict(item.provenance),
        "digest": digest,
    }


def annotation_tags(sample: Sample) -> tuple[str, ...]:
    """Tags from a sample's structured annotation (``image_type:``, ``style:``,
    ``language:``, ``watermark``, ``abnormal``) plus ``editing`` for an editing sample."""
    tags = ["editing"] if sample.is_editing else []
    note = sample.annotation
    if note is not None:
        tags += [f"image_type:{note.image_type}", f"style:{note.style}"]
        if note.language:
            tags.append(f"language:{note.language}")
        if note.watermarks:
            tags.append("watermark")
        if note.abnormal_element:
            tags.append("abnormal")
    return tuple(tags)


def dataset_items(
    directory: Path,
    collection: CollectionName,
    *,
    split: Split,
    stage: int | None = None,
    extra_tags: Callable[[Sample], Sequence[str]] | None = None,
) -> list[IndexItem]:
    """The items of the dataset at ``directory`` (``samples.jsonl``) for ``collection``:
    text-to-image samples with a caption (``prompts``), every sample's target (``images``),
    editing samples (``edit_pairs``: instruction and first input image). Tags: the
    annotation's, plus ``extra_tags(sample)``."""
    root = Path(directory)
    items = []
    for sample in read_dataset(root):
        if collection == "prompts" and (sample.is_editing or not sample.caption):
            continue
        if collection == "edit_pairs" and not sample.is_editing:
            continue
        tags = annotation_tags(sample) + tuple(extra_tags(sample) if extra_tags else ())
        source = sample.input_images[0] if collection == "edit_pairs" else sample.image
        items.append(
            IndexItem(
                dataset=sample.provenance.dataset,
                split=split,
                key=sample.id,
                text=sample.instruction if collection == "edit_pairs" else sample.caption,
                image=None if collection == "prompts" else root / source,
                stage=stage,
                tags=tuple(dict.fromkeys(tags)),
                provenance=sample.provenance.model_dump(),
            )
        )
    return items

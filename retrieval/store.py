"""Qdrant: the client (a server, or local mode on disk), the collections and what built them.

One code path for both backends: :func:`open_qdrant` gives a ``QdrantClient`` on
``FLYWHEEL_QDRANT_URL`` when it is set, else qdrant-client's local mode under
``$FLYWHEEL_HOME/qdrant``. Everything else talks to that client.

The collections (:data:`COLLECTIONS`), all cosine distance, named vectors:

- ``prompts`` (vector ``text``): a caption / prompt of a sample;
- ``images`` (``image``): a sample's target image;
- ``edit_pairs`` (``instruction``, ``image``): an editing sample, its instruction and its
  source image;
- ``failure_cases`` (``text``): a failure case's prompt (:mod:`flywheel.cases`: a failure
  whose prompt nearly repeats an open case's joins that case).

Each collection's metadata records which embedder built each vector (``model_id``, see
:mod:`retrieval.embedding`) and its width; :func:`ensure_collection` creates a collection
with that record and refuses to use an existing one built by another model
(:class:`EmbedderMismatchError`), as do the queries. On a server, payload indexes cover what is
filtered: ``dataset``, ``split``, ``stage``, ``tags`` and ``key`` (local mode scans payloads
and has no payload indexes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qdrant_client import QdrantClient, models

from flywheel.settings import Settings

CollectionName = Literal["prompts", "images", "edit_pairs", "failure_cases"]

COLLECTIONS: dict[CollectionName, tuple[str, ...]] = {
    "prompts": ("text",),
    "images": ("image",),
    "edit_pairs": ("instruction", "image"),
    "failure_cases": ("text",),
}
"""The collections and their named vectors."""

VECTOR_KINDS: dict[str, Literal["text", "image"]] = {
    "text": "text",
    "instruction": "text",
    "image": "image",
}
"""Which embedder kind makes each named vector."""

PAYLOAD_INDEXES: dict[str, models.PayloadSchemaType] = {
    "dataset": models.PayloadSchemaType.KEYWORD,
    "split": models.PayloadSchemaType.KEYWORD,
    "stage": models.PayloadSchemaType.INTEGER,
    "tags": models.PayloadSchemaType.KEYWORD,
    "key": models.PayloadSchemaType.KEYWORD,
}
"""The payload fields queries filter on, indexed (a server uses them; local mode scans)."""


class EmbedderMismatchError(ValueError):
    """A collection built by one embedder was asked to take vectors of another."""


@dataclass(kw_only=True, slots=True)
class QdrantConfig:
    """Where the collections live."""

    url: str | None = None
    """A Qdrant server (``http://host:6333``); None: local mode at ``path``."""
    path: Path | None = None
    """Local mode's directory; None: an in-memory store (tests and benchmarks)."""
    api_key: str | None = None
    """The server's API key, if it asks for one."""
    prefix: str = "flywheel"
    """Collection names are ``<prefix>_<collection>``."""
    timeout: float = 30.0
    """Seconds a server request may take."""
    hnsw: models.HnswConfigDiff = field(
        default_factory=lambda: models.HnswConfigDiff(m=16, ef_construct=128)
    )
    """The server's HNSW graph (local mode searches exactly)."""


def qdrant_config(settings: Settings) -> QdrantConfig:
    """The config the settings name: ``FLYWHEEL_QDRANT_URL``, else local mode on disk."""
    if settings.qdrant_url:
        return QdrantConfig(url=settings.qdrant_url, api_key=settings.qdrant_api_key)
    return QdrantConfig(path=settings.qdrant_path)


def open_qdrant(config: QdrantConfig) -> QdrantClient:
    """A client for ``config``: the server, local mode on disk, or in memory."""
    if config.url is not None:
        # No client-server version probe: it runs in a thread at construction and can only
        # warn; an unreachable or incompatible server fails the first request instead.
        return QdrantClient(
            url=config.url,
            api_key=config.api_key,
            timeout=int(config.timeout),
            check_compatibility=False,
        )
    if config.path is None:
        return QdrantClient(location=":memory:")
    config.path.mkdir(parents=True, exist_ok=True)
    return QdrantClient(path=str(config.path))


def collection_name(config: QdrantConfig, collection: CollectionName) -> str:
    """The Qdrant name of ``collection``."""
    return f"{config.prefix}_{collection}"


def ensure_collection(
    client: QdrantClient,
    config: QdrantConfig,
    collection: CollectionName,
    embedders: Mapping[str, tuple[str, int]],
) -> str:
    """Create ``collection`` if missing, recording ``embedders`` (vector name -> (model_id,
    dim)) in its metadata, with its payload indexes; an existing one must have been built by
    the same embedders. Returns the Qdrant name."""
    name = collection_name(config, collection)
    wanted = set(COLLECTIONS[collection])
    if set(embedders) != wanted:
        raise ValueError(
            f"{collection} takes the vectors {sorted(wanted)}, got {sorted(embedders)}"
        )
    record = {vector: {"model_id": mid, "dim": dim} for vector, (mid, dim) in embedders.items()}
    if client.collection_exists(name):
        check_embedders(client, name, {v: mid for v, (mid, _) in embedders.items()})
        return name
    client.create_collection(
        name,
        vectors_config={
            vector: models.VectorParams(size=dim, distance=models.Distance.COSINE)
            for vector, (_, dim) in embedders.items()
        },
        hnsw_config=config.hnsw if config.url is not None else None,
        metadata={"embedders": record},
    )
    if config.url is not None:  # local mode scans payloads (and warns that indexes do nothing)
        for field_name, schema in PAYLOAD_INDEXES.items():
            client.create_payload_index(name, field_name=field_name, field_schema=schema, wait=True)
    return name


def scroll_all(
    client: QdrantClient,
    name: str,
    *,
    where: models.Filter,
    with_payload: bool | list[str] = False,
) -> list[models.Record]:
    """Every point of collection ``name`` that ``where`` selects, page by page (no vectors)."""
    records: list[models.Record] = []
    offset = None
    while True:
        page, offset = client.scroll(
            name, scroll_filter=where, limit=1024, offset=offset, with_payload=with_payload
        )
        records += page
        if offset is None:
            return records


def recorded_embedders(client: QdrantClient, name: str) -> dict[str, str]:
    """Vector name -> the ``model_id`` that built it, as the collection's metadata says."""
    metadata = client.get_collection(name).config.metadata or {}
    record = metadata.get("embedders")
    if not isinstance(record, dict):
        raise EmbedderMismatchError(f"{name}: no embedder record (not built by flywheel)")
    return {vector: str(entry["model_id"]) for vector, entry in record.items()}


def check_embedders(client: QdrantClient, name: str, model_ids: Mapping[str, str]) -> None:
    """Raise :class:`EmbedderMismatchError` unless every named vector of ``model_ids`` was
    built by that model."""
    recorded = recorded_embedders(client, name)
    for vector, model_id in model_ids.items():
        if recorded.get(vector) != model_id:
            raise EmbedderMismatchError(
                f"{name}: its {vector!r} vectors were built by {recorded.get(vector)!r}, "
                f"not {model_id!r}; re-index into a new collection (another prefix)"
            )

"""Near-duplicate failures by prompt embedding: a Qdrant collection of open cases' prompts.

Two failures are near-duplicates when their prompts mean the same — a paraphrase, another
spelling, other spacing — for the same task and model version. :class:`CasePrompts` keeps
the prompt embedding of every case it is told about in the ``failure_cases`` collection
(:mod:`retrieval.store`; point id = case id) and answers which cases lie within
``threshold`` cosine similarity of a new failure's prompt. With all-MiniLM-L6-v2, 0.95 joins
paraphrases of one world caption (0.99) but not the same caption with another colour (0.89)
or background (0.91).
"""

from __future__ import annotations

from dataclasses import dataclass

from qdrant_client import QdrantClient, models

from flywheel.db.models import Task
from retrieval.embedding import TextEmbedder, Vectors
from retrieval.store import QdrantConfig, check_embedders, ensure_collection


@dataclass(kw_only=True, slots=True)
class CasePrompts:
    """The embeddings of cases' prompts, and the near-duplicate lookup."""

    client: QdrantClient
    """Where the ``failure_cases`` collection lives."""
    config: QdrantConfig
    """Its backend and collection prefix."""
    embedder: TextEmbedder
    """What embeds the prompts (recorded in the collection; another is refused)."""
    threshold: float = 0.95
    """Cosine similarity from which two prompts are one failure."""

    def collection(self) -> str:
        """The collection's name, created (or checked) on first use."""
        return ensure_collection(
            self.client,
            self.config,
            "failure_cases",
            {"text": (self.embedder.model_id, self.embedder.dim)},
        )

    def embed(self, prompts: list[str]) -> Vectors:
        """Unit-norm prompt embeddings."""
        return self.embedder.embed(prompts)

    def near(self, vector: Vectors, *, task: Task, model_version_id: int | None) -> list[int]:
        """Case ids within ``threshold`` of ``vector`` for that task and version, nearest
        first."""
        name = self.collection()
        check_embedders(self.client, name, {"text": self.embedder.model_id})
        hits = self.client.query_points(
            name,
            query=vector.tolist(),
            using="text",
            query_filter=models.Filter(
                must=[
                    models.FieldCondition(key="task", match=models.MatchValue(value=task.value)),
                    models.FieldCondition(
                        key="model_version_id",
                        match=models.MatchValue(value=_version(model_version_id)),
                    ),
                ]
            ),
            limit=32,  # closed cases stay in the collection; the caller keeps open ones
            score_threshold=self.threshold,
        ).points
        return [int(hit.id) for hit in hits]

    def add(
        self, case_id: int, vector: Vectors, *, task: Task, model_version_id: int | None
    ) -> None:
        """Remember a case's prompt embedding (stored before this returns)."""
        self.client.upsert(
            self.collection(),
            points=[
                models.PointStruct(
                    id=case_id,
                    vector={"text": vector.tolist()},
                    payload={"task": task.value, "model_version_id": _version(model_version_id)},
                )
            ],
            wait=True,
        )


def _version(model_version_id: int | None) -> int:
    return -1 if model_version_id is None else model_version_id

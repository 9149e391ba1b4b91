"""The prompt-enhancer track's artefact on the ports: reverse-engineered training pairs.

The routed cases name concepts the users say in words the generator does not draw well.
Their nearest **train** corpus items (each case's reference and prompt embedded with the
text embedder, searched in the ``prompts`` collection that :func:`flywheel.parts.index_corpus`
built, filtered to the corpus' dataset and the ``corpus`` split) show those concepts: each
item's rich caption is what the generator was trained on (the target), the same caption
through the project's :class:`~flywheel.ports.CaptionDegrader` is what a user types (the
input). Echo pairs (a rich caption to itself), drawn from the *other* train items, keep what
the enhancer already handles unchanged.

The routed prompts themselves are never trained on: the gate judges them. A pair whose
input or target is one of the cases' prompts or references (compared by
:func:`same_prompt_key`: words, case-folded, without punctuation and articles) is held out;
so is an echo of such a caption. A caption the degrader leaves as it was makes no pair.

Files, in ``out_dir``: ``pairs.jsonl`` (``{"prompt": ..., "target": ...}`` a line, what the
``pe_sft`` recipe reads from ``artefacts.pairs``) and ``artefact.json``
(:class:`EnhancerPairsArtefact`). The same cases, index, degrader and seed give the same
files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from qdrant_client import QdrantClient, models

from flywheel.parts import Parts
from flywheel.ports import PortError
from flywheel.tracks.routed import RoutedCase, prompt_keys, same_prompt_key
from retrieval.embedding import TextEmbedder
from retrieval.index import CORPUS
from retrieval.store import QdrantConfig, check_embedders, collection_name
from training.io import atomic_write_text

PAIRS_FILE = "pairs.jsonl"
"""The pairs, in the format of the ``pe_sft`` recipe."""
ARTEFACT_FILE = "artefact.json"
"""The :class:`EnhancerPairsArtefact`, for the review queue."""
EXAMPLES = 8
"""Pairs shown in the artefact."""


@dataclass(kw_only=True, slots=True)
class EnhancerDataConfig:
    """What :func:`build_enhancer_pairs` builds."""

    pairs_per_case: int = 32
    """Nearest train corpus items per routed case (the union over the cases is degraded)."""
    echo_share: float = 0.5
    """Echo pairs (rich caption -> itself), as a share of the degraded pairs."""
    seed: int = 0
    """Seed of the degrader, the echo draw and the order of the pairs."""
    min_pairs: int = 8
    """Fewer degraded pairs than this: no artefact."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.pairs_per_case < 1 or self.min_pairs < 1:
            raise ValueError("EnhancerDataConfig: pairs_per_case and min_pairs must be >= 1")
        if not 0.0 <= self.echo_share <= 4.0:
            raise ValueError("EnhancerDataConfig.echo_share must be in [0, 4]")


class EnhancerPair(BaseModel):
    """One training pair (a line of ``pairs.jsonl``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    """What the user types (the degraded caption; the rich caption itself for an echo)."""
    target: str = Field(min_length=1)
    """What the enhancer should write: the corpus item's rich caption."""


class EnhancerPairsArtefact(BaseModel):
    """The reviewed artefact (``artefact.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    themes: list[str]
    """The cases' theme labels (sorted; cases without one add none)."""
    pairs: int
    """Lines of ``pairs.jsonl``: degraded + echo."""
    degraded: int
    """Pairs whose input (the degraded caption) differs from the target."""
    echo: int
    """Echo pairs (input = target)."""
    held_out: int
    """Pairs left out because their input or target is the prompt or reference of a routed
    case, the gate share's included."""
    examples: list[EnhancerPair]
    """The first pairs of the file (at most 8)."""
    pairs_file: str
    """Path of ``pairs.jsonl``."""
    source_items: list[str]
    """Ids of the train corpus items the degraded pairs come from (the failing themes'
    nearest), sorted."""
    echo_items: list[str]
    """Ids of the train corpus items the echo pairs come from, sorted."""
    cases: list[int]
    """Ids of the cases whose queries found corpus items, sorted."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Neighbour:
    item: str
    caption: str
    score: float


def _queries(case: RoutedCase) -> list[str]:
    return list(dict.fromkeys(t for t in (case.reference.strip(), case.prompt.strip()) if t))


def _corpus_filter(dataset: str) -> models.Filter:
    return models.Filter(
        must=[
            models.FieldCondition(key="split", match=models.MatchValue(value=CORPUS)),
            models.FieldCondition(key="dataset", match=models.MatchValue(value=dataset)),
        ]
    )


def _neighbour(point: models.ScoredPoint) -> _Neighbour | None:
    payload = point.payload or {}
    text = payload.get("text")
    provenance = payload.get("provenance")
    item = provenance.get("item") if isinstance(provenance, dict) else None
    if item is None:
        key = str(payload.get("key", ""))
        item = key.split("/", 1)[1] if key.startswith("train/") else None
    if not isinstance(text, str) or not text.strip() or not isinstance(item, str):
        return None
    return _Neighbour(item=item, caption=text, score=float(point.score))


def _nearest(
    cases: Sequence[RoutedCase],
    *,
    client: QdrantClient,
    name: str,
    dataset: str,
    embedder: TextEmbedder,
    limit: int,
) -> dict[int, list[_Neighbour]]:
    """Case id -> its ``limit`` nearest train items (best score over its queries; ties by
    item id)."""
    asked = [(case.case_id, text) for case in cases for text in _queries(case)]
    if not asked:
        return {}
    vectors = embedder.embed([text for _, text in asked])
    responses = client.query_batch_points(
        name,
        requests=[
            models.QueryRequest(
                query=row.tolist(),
                using="text",
                filter=_corpus_filter(dataset),
                limit=limit,
                with_payload=True,
            )
            for row in vectors
        ],
    )
    best: dict[int, dict[str, _Neighbour]] = {}
    for (case_id, _), response in zip(asked, responses, strict=True):
        found = best.setdefault(case_id, {})
        for point in response.points:
            hit = _neighbour(point)
            if hit is not None and (hit.item not in found or found[hit.item].score < hit.score):
                found[hit.item] = hit
    return {
        case_id: sorted(found.values(), key=lambda n: (-n.score, n.item))[:limit]
        for case_id, found in best.items()
        if found
    }


def _echo_draw(
    items: Iterable[tuple[str, str]], *, count: int, rng: random.Random
) -> list[tuple[str, str]]:
    """``count`` of ``items`` drawn uniformly (reservoir sampling, one pass), in their order."""
    chosen: list[tuple[int, tuple[str, str]]] = []
    for index, item in enumerate(items):
        if len(chosen) < count:
            chosen.append((index, item))
        else:
            slot = rng.randrange(index + 1)
            if slot < count:
                chosen[slot] = (index, item)
    return [item for _, item in sorted(chosen)]


def build_enhancer_pairs(
    cases: Sequence[RoutedCase],
    *,
    parts: Parts,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
    out_dir: Path,
    config: EnhancerDataConfig,
    held_out: Sequence[RoutedCase] = (),
) -> EnhancerPairsArtefact | str:
    """Build the pairs for ``cases`` (the track's train share, :func:`split_cases`) and write
    ``pairs.jsonl`` and ``artefact.json`` into ``out_dir``; or why there is no artefact (no
    case, the corpus not indexed, too few pairs). No pair's input or target is the prompt or
    reference of a case in ``cases``, or the prompt of one in ``held_out`` (the gate share):
    the gate judges prompts no round trained on. :class:`~flywheel.ports.PortError` when the
    degrader or the corpus fails; :class:`~retrieval.store.EmbedderMismatchError` when the
    index was built by another embedder."""
    config.validate()
    if not cases:
        return "no routed cases"
    name = collection_name(qdrant, "prompts")
    dataset = parts.corpus.name
    if not client.collection_exists(name):
        return f"the corpus {dataset!r} is not indexed (no {name} collection: index_corpus)"
    check_embedders(client, name, {"text": embedder.model_id})
    ordered = sorted(cases, key=lambda c: c.case_id)
    nearest = _nearest(
        ordered,
        client=client,
        name=name,
        dataset=dataset,
        embedder=embedder,
        limit=config.pairs_per_case,
    )
    if not nearest:
        return f"no train item of the corpus {dataset!r} is near the routed cases (not indexed?)"

    # The train share's prompts and references, and the gate share's prompts: what the gate
    # judges is never an input or a target.
    routed = prompt_keys(ordered) | prompt_keys(held_out, references=False)
    sources: dict[str, str] = {}
    for case in ordered:
        for hit in nearest.get(case.case_id, []):
            sources.setdefault(hit.item, hit.caption)
    captions = list(sources.values())
    degraded_texts = parts.degrader.degrade(captions, seed=config.seed)
    if len(degraded_texts) != len(captions):
        raise PortError(
            "degrader", f"returned {len(degraded_texts)} prompts for {len(captions)} captions"
        )
    withheld = 0
    pairs: list[EnhancerPair] = []
    used: list[str] = []
    for item, caption, prompt in zip(sources, captions, degraded_texts, strict=True):
        prompt, key = prompt.strip(), same_prompt_key(prompt)
        if key in routed or same_prompt_key(caption) in routed:
            withheld += 1
            continue
        if key and key != same_prompt_key(caption):
            pairs.append(EnhancerPair(prompt=prompt, target=caption))
            used.append(item)
    if len(pairs) < config.min_pairs:
        return (
            f"{len(pairs)} degraded pair(s) from {len(sources)} corpus item(s) near the routed "
            f"cases, fewer than min_pairs ({config.min_pairs})"
        )

    rng = random.Random(config.seed)
    wanted = round(config.echo_share * len(pairs))
    others = (
        (item.id, item.rich_caption)
        for item in parts.corpus.items("train")
        if item.id not in sources
        and item.rich_caption.strip()
        and same_prompt_key(item.rich_caption) not in routed
    )
    echoes = _echo_draw(others, count=wanted, rng=rng)
    if len(echoes) < wanted:  # a small corpus: the neighbours echo too
        spare = list(zip(used, (p.target for p in pairs), strict=True))
        rng.shuffle(spare)
        echoes += spare[: wanted - len(echoes)]
    echo_pairs = [EnhancerPair(prompt=caption, target=caption) for _, caption in echoes]

    everything = pairs + echo_pairs
    rng.shuffle(everything)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs_file = out_dir / PAIRS_FILE
    lines = (
        json.dumps({"prompt": p.prompt, "target": p.target}, ensure_ascii=False) + "\n"
        for p in everything
    )
    atomic_write_text(pairs_file, "".join(lines))
    artefact = EnhancerPairsArtefact(
        themes=sorted({case.theme for case in ordered if case.theme}),
        pairs=len(everything),
        degraded=len(pairs),
        echo=len(echo_pairs),
        held_out=withheld,
        examples=everything[:EXAMPLES],
        pairs_file=str(pairs_file),
        source_items=sorted(used),
        echo_items=sorted({item for item, _ in echoes}),
        cases=sorted(nearest),
    )
    atomic_write_text(out_dir / ARTEFACT_FILE, artefact.model_dump_json(indent=2) + "\n")
    return artefact

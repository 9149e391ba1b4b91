"""The pretraining-gap track's artefact on the ports: what the corpus lacks, retrieved from
the pool and synthesized, filtered, and written as a continued-pretraining dataset.

1. **Diagnosis.** The concepts the routed cases ask for are the corpus' tags whose value (the
   part after ``:``; a multiword value as a phrase) appears in a case's reference or prompt.
   Each is counted in the ``prompts`` index (:func:`flywheel.parts.index_corpus`: the corpus'
   dataset, ``corpus`` split): a concept is **scarce** when its count is below
   ``scarce_below`` times the median count of its family's tags (the prefix before ``:``;
   ``colour:purple`` against the other colours). Tags without a family (flags such as
   ``watermark``) are not concepts. The cases' own density (:mod:`retrieval.scarcity`: each
   reference's scarcity among the corpus' neighbourhoods) is reported beside the counts.
2. **Augmentation.** For each scarce concept, diverse pool items showing it are retrieved
   (:func:`retrieval.augment.retrieve_for_augmentation`: MMR over the pool, filtered on the
   concept's tag, corpus near-copies dropped); the queries are the references of the cases
   that name it — the caller passes the track's train share
   (:func:`flywheel.tracks.routed.split_cases`: the gate's cases are never retrieval queries).
   Where the project configures a synthesizer, it fills the
   rest of the concept's share of ``budget`` (without one, retrieval is asked for all of it).
3. **The filter chain** (:func:`flywheel.media.filters.filter_candidates`, thresholds from the
   project's ``[filters]``, alignment scored by the project's reward) runs over every
   retrieved and synthesized sample; each filter's drop count goes into the artefact.
4. **The dataset**: ``replay`` train items (a seeded draw, against forgetting) plus the kept
   augmentation, in the format of :mod:`training.data` (``samples.jsonl`` and PNG images),
   for a continued-pretraining round that draws ``mixture_weight`` of its batches from the
   augmentation.

Files, in ``out_dir`` (built in a temporary sibling directory and renamed into place when
complete, so a failure — a corpus file that does not decode, a synthesizer that fails:
:class:`~flywheel.ports.PortError` — leaves neither a half-written directory nor the
temporary one)::

    <out_dir>/artefact.json                  GapArtefact
    <out_dir>/dataset/samples.jsonl          training.data samples
    <out_dir>/dataset/images/<origin>-<n>.png
    <out_dir>/synthesized/<k>-<concept>/...  what the synthesizer wrote (kept or dropped)

The same cases, index, corpus, synthesizer and seed give the same files.
"""

from __future__ import annotations

import random
import re
import shutil
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict
from qdrant_client import QdrantClient, models
from torch import Tensor

from flywheel.media.access import ImageAccessConfig, ImagePolicy
from flywheel.media.filters import difference_hash, filter_candidates
from flywheel.parts import Parts
from flywheel.ports import CorpusItem
from flywheel.tracks.routed import RoutedCase, prompt_keys, same_prompt_key
from retrieval.augment import AugmentConfig, Candidate, retrieve_for_augmentation
from retrieval.embedding import TextEmbedder
from retrieval.index import CORPUS, POOL, count_tagged
from retrieval.index import count_tags as count_tags  # re-exported: tests import it here
from retrieval.scarcity import ScarcityConfig, calibration_for, diagnose
from retrieval.store import QdrantConfig, check_embedders, collection_name
from training.data import Provenance, Sample, write_dataset
from training.io import atomic_write_text, fsync_directory, fsync_tree, local_path

ARTEFACT_FILE = "artefact.json"
"""The :class:`GapArtefact`, for the review queue and the round."""
DATASET_DIR = "dataset"
"""The round's dataset (:mod:`training.data` format), inside ``out_dir``."""
SYNTHESIZED_DIR = "synthesized"
"""What the synthesizer wrote, one folder per concept, inside ``out_dir``."""
SYNTHESIZED = "synthesized"
"""The provenance split of a synthesized sample (``train``: replayed; ``pool``: retrieved)."""

Origin = Literal["replay", "retrieved", "synthesized"]
Reader = Callable[[CorpusItem], Tensor]


@dataclass(kw_only=True, slots=True)
class GapDataConfig:
    """What :func:`build_gap_data` diagnoses, retrieves, synthesizes and writes."""

    scarce_below: float = 0.5
    """A concept is scarce when its corpus count is below this share of the median count of
    its family's tags."""
    budget: int = 64
    """Augmentation samples wanted (retrieved + synthesized, before the filter chain), split
    evenly over the scarce concepts."""
    retrieved_share: float = 0.5
    """Share of each concept's budget retrieved from the pool; the rest (and what the pool
    could not give) is synthesized when the project has a synthesizer. Without one, the whole
    budget is asked of the pool."""
    mixture_weight: float = 0.4
    """Share of the round's batches drawn from the augmentation (the rest from the replayed
    train items); recorded for the round, which weighs samples by their provenance split."""
    replay: int = 256
    """Train corpus items replayed in the round's dataset, against forgetting (a seeded
    draw; all of them when the corpus has fewer)."""
    diversity: float = 0.5
    """MMR's diversity in [0, 1] for the pool retrieval (0: plain nearest neighbours)."""
    corpus_neighbours: int = 64
    """Train items nearest to each retrieval query whose images are hashed for the
    near-duplicate filter."""
    seed: int = 0
    """Seed of the density calibration, the synthesizer and the replay draw."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.scarce_below <= 0:
            raise ValueError("GapDataConfig.scarce_below must be > 0")
        if self.budget < 1 or self.replay < 0 or self.corpus_neighbours < 0:
            raise ValueError("GapDataConfig: budget >= 1, replay >= 0, corpus_neighbours >= 0")
        if not 0.0 <= self.retrieved_share <= 1.0 or not 0.0 <= self.diversity <= 1.0:
            raise ValueError("GapDataConfig: retrieved_share and diversity must be in [0, 1]")
        if not 0.0 < self.mixture_weight < 1.0:
            raise ValueError("GapDataConfig.mixture_weight must be in (0, 1)")


# ---- the artefact ----------------------------------------------------------------------------


class ConceptCount(BaseModel):
    """One concept tag's presence in the train corpus."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concept: str
    """The tag (``colour:purple``)."""
    family: str
    """The tag's prefix (``colour``): what its count is compared with."""
    corpus_items: int
    """Train items carrying the tag."""
    share: float
    """``corpus_items`` over the median count of the family's tags in the corpus (0 when the
    family has none there)."""
    scarce: bool
    """``share`` is below ``scarce_below``."""
    asked: bool
    """A case's reference or prompt names it."""


class CaseDensity(BaseModel):
    """How scarce one case's reference is among the corpus' neighbourhoods."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    case_id: int
    query: str
    """The case's reference (in the corpus' caption style)."""
    scarcity: float
    """Share of corpus points whose neighbourhood is denser, in [0, 1]."""
    knn_similarity: float
    """Mean similarity of its k nearest corpus points."""
    within_radius: int
    """Corpus points closer than the corpus' median k-th neighbour."""


class GapDiagnosis(BaseModel):
    """What the cases ask for that the corpus lacks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus_items: int
    """Train items of the corpus in the index."""
    scarce_below: float
    concepts: list[ConceptCount]
    """Every tag of the families the cases ask about, rarest first."""
    scarce: list[str]
    """The scarce concepts the cases ask for (what the augmentation is for)."""
    density: list[CaseDensity]
    """Per case, its reference's density."""


class RetrievedSample(BaseModel):
    """One pool item retrieved for a scarce concept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item: str
    """The corpus item's id."""
    image: str
    """Its image URI."""
    caption: str
    """Its rich caption."""
    similarity: float
    """Cosine similarity of its caption to the query that found it."""
    tags: list[str]
    concept: str
    """The scarce concept it was retrieved for."""
    dropped_by: str | None
    """The filter that dropped it (None: it is in the dataset)."""


class FilterSummary(BaseModel):
    """What the filter chain kept and what each filter dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: int
    kept: int
    dropped: dict[str, int]
    """Filter -> samples it dropped (every filter named, in the order they run)."""


class GapArtefact(BaseModel):
    """The augmentation batch: the diagnosis, what was retrieved and synthesized, what the
    filters dropped, and the round's dataset (``artefact.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["flywheel-gap-data/1"] = "flywheel-gap-data/1"
    diagnosis: GapDiagnosis
    retrieved: list[RetrievedSample]
    """Every pool item retrieved, kept or dropped."""
    synthesized: dict[str, int]
    """Scarce concept -> samples the synthesizer made (before the filters; empty: none)."""
    filters: FilterSummary
    """Over retrieved + synthesized samples."""
    dataset_dir: str
    """The round's dataset (:mod:`training.data` format)."""
    replay: int
    """Train items replayed in it."""
    augmentation: dict[str, int]
    """``retrieved`` / ``synthesized`` -> samples kept in it."""
    samples: int
    """Samples in the dataset: ``replay`` + the kept augmentation."""
    mixture_weight: float
    """Share of the round's batches drawn from the augmentation."""
    cases: list[int]
    """The routed cases' ids (all of them named the concepts; the train share's references
    were the retrieval queries)."""
    held_out: int = 0
    """Pool items retrieved but left out because their caption is a gate-share case's prompt
    (the gate judges prompts no round trained on)."""


# ---- diagnosis -------------------------------------------------------------------------------


def _where(dataset: str, split: str) -> models.Filter:
    return models.Filter(
        must=[
            models.FieldCondition(key="dataset", match=models.MatchValue(value=dataset)),
            models.FieldCondition(key="split", match=models.MatchValue(value=split)),
        ]
    )


def _phrase(value: str) -> re.Pattern[str]:
    words = value.replace("_", " ").casefold().split()
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)")


def _family(tag: str) -> tuple[str, str] | None:
    family, sep, value = tag.partition(":")
    return (family, value) if sep and family and value.strip() else None


def names_concept(text: str, concept: str) -> bool:
    """Whether ``text`` names ``concept``'s value (case-insensitively, as a whole phrase)."""
    parts = _family(concept)
    return parts is not None and _phrase(parts[1]).search(text.casefold()) is not None


def _count_concepts(
    counts: Counter[str], known: Iterable[str], cases: Sequence[RoutedCase], scarce_below: float
) -> list[ConceptCount]:
    texts = [f"{case.reference}\n{case.prompt}" for case in cases]
    asked = {tag for tag in known if any(names_concept(text, tag) for text in texts)}
    families = {tag.partition(":")[0] for tag in asked}
    out = []
    for family in sorted(families):
        in_corpus = [n for tag, n in counts.items() if tag.startswith(f"{family}:") and n > 0]
        median = statistics.median(in_corpus) if in_corpus else 0.0
        tags = {t for t in counts if t.startswith(f"{family}:")} | {
            t for t in asked if t.startswith(f"{family}:")
        }
        for tag in tags:
            share = counts.get(tag, 0) / median if median > 0 else 0.0
            out.append(
                ConceptCount(
                    concept=tag,
                    family=family,
                    corpus_items=counts.get(tag, 0),
                    share=share,
                    scarce=share < scarce_below,
                    asked=tag in asked,
                )
            )
    return sorted(out, key=lambda c: (c.share, c.concept))


def _density(
    cases: Sequence[RoutedCase],
    *,
    client: QdrantClient,
    name: str,
    embedder: TextEmbedder,
    corpus_points: int,
    seed: int,
) -> list[CaseDensity]:
    config = ScarcityConfig(k=min(10, corpus_points - 1), seed=seed)
    calibration = calibration_for(client, name, "text", embedder.model_id, config)
    found = diagnose(client, calibration, embedder.embed([c.reference for c in cases]), config)
    return [
        CaseDensity(
            case_id=case.case_id,
            query=case.reference,
            scarcity=d.scarcity,
            knn_similarity=d.knn_similarity,
            within_radius=d.within_radius,
        )
        for case, d in zip(cases, found, strict=True)
    ]


# ---- retrieval -------------------------------------------------------------------------------


def _item(payload: dict[str, object], *, split: Literal["train", "pool"]) -> CorpusItem | None:
    """The corpus item an index point names (None: not indexed by index_corpus)."""
    provenance = payload.get("provenance")
    if not isinstance(provenance, dict):
        return None
    image, item = provenance.get("image"), provenance.get("item")
    if not isinstance(image, str) or not isinstance(item, str) or not image or not item:
        return None
    text = payload.get("text")
    tags = payload.get("tags")
    return CorpusItem(
        id=item,
        image=image,
        rich_caption=text if isinstance(text, str) else "",
        tags=[str(t) for t in tags] if isinstance(tags, list) else [],
        split=split,
        provenance={str(k): str(v) for k, v in provenance.items() if k not in ("image", "item")},
    )


def _candidate_item(candidate: Candidate) -> CorpusItem | None:
    payload: dict[str, object] = {
        "provenance": candidate.provenance,
        "text": candidate.text,
        "tags": candidate.tags,
    }
    return _item(payload, split="pool")


@dataclass(kw_only=True, slots=True)
class _Retrieved:
    item: CorpusItem
    candidate: Candidate
    concept: str


def _retrieve(
    concept: str,
    wanted: int,
    queries: Sequence[str],
    *,
    client: QdrantClient,
    name: str,
    dataset: str,
    embedder: TextEmbedder,
    taken: set[str],
    diversity: float,
) -> list[_Retrieved]:
    """Up to ``wanted`` pool items of ``dataset`` showing ``concept``, none in ``taken``: each
    query's MMR ranking (``wanted`` long, so that overlapping queries still fill it), taken
    in turns — every query's first, then every query's second, ..."""
    augment = AugmentConfig(
        limit=wanted,
        splits=(POOL,),
        tags_all=(concept,),
        diversity=diversity,
        candidates=max(100, 4 * wanted),  # local mode: MMR must choose among more than limit
    )
    rankings = [
        retrieve_for_augmentation(client, name, "text", embedder.model_id, vector, augment)
        for vector in embedder.embed(list(queries))
    ]
    found: dict[str, _Retrieved] = {}
    for rank in range(max(len(r) for r in rankings)):
        for ranking in rankings:
            if rank >= len(ranking) or len(found) == wanted:
                continue
            candidate = ranking[rank]
            item = _candidate_item(candidate) if candidate.dataset == dataset else None
            if item is not None and item.id not in taken and item.id not in found:
                found[item.id] = _Retrieved(item=item, candidate=candidate, concept=concept)
    return list(found.values())


def _nearest_train(
    queries: Sequence[str],
    *,
    client: QdrantClient,
    name: str,
    dataset: str,
    embedder: TextEmbedder,
    limit: int,
) -> list[CorpusItem]:
    """The train items nearest to each query, each once, in a stable order."""
    if not queries or limit == 0:
        return []
    requests = [
        models.QueryRequest(
            query=row.tolist(),
            using="text",
            filter=_where(dataset, CORPUS),
            limit=limit,
            with_payload=True,
        )
        for row in embedder.embed(list(queries))
    ]
    found: dict[str, CorpusItem] = {}
    for response in client.query_batch_points(name, requests=requests):
        for hit in response.points:
            item = _item(dict(hit.payload or {}), split="train")
            if item is not None:
                found.setdefault(item.id, item)
    return list(found.values())


# ---- the dataset -----------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "concept"


def _png(image: Tensor, path: Path) -> None:
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())
    Image.fromarray(array, "RGB").save(path, format="PNG")


def _policy_reader(root: Path, images: ImageAccessConfig) -> Reader:
    """Reads the images a synthesizer wrote under ``root`` (and nothing else)."""
    policy = ImagePolicy(
        ImageAccessConfig(max_bytes=images.max_bytes, max_pixels=images.max_pixels), home=root
    )

    def read(item: CorpusItem) -> Tensor:
        rgb = policy.read_image(item.image).convert("RGB")
        pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8))
        return pixels.permute(2, 0, 1).contiguous().to(torch.float32) / 255.0

    return read


def _replay(items: Iterable[CorpusItem], count: int, seed: int) -> list[CorpusItem]:
    """A seeded uniform draw of ``count`` items (all when fewer), in corpus order; one pass,
    ``count`` items held."""
    rng = random.Random(seed)
    chosen: list[tuple[int, CorpusItem]] = []
    for index, item in enumerate(items):
        if index < count:
            chosen.append((index, item))
        elif (slot := rng.randrange(index + 1)) < count:
            chosen[slot] = (index, item)
    return [item for _, item in sorted(chosen, key=lambda pair: pair[0])]


def _stale_siblings(out_dir: Path) -> Iterable[Path]:
    return out_dir.parent.glob(f".{out_dir.name}.*.tmp")


def _check_replaceable(out_dir: Path) -> None:
    """``FileExistsError`` when ``out_dir`` exists and is not an earlier batch."""
    if out_dir.exists() and not (out_dir / ARTEFACT_FILE).is_file():
        raise FileExistsError(f"{out_dir} exists and is not a gap-data batch ({ARTEFACT_FILE})")


def _move_into_place(work: Path, out_dir: Path) -> None:
    """``work`` becomes ``out_dir`` (an earlier batch there is replaced only once the new one
    is complete)."""
    fsync_tree(work)
    _check_replaceable(out_dir)
    old: Path | None = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
    work.rename(out_dir)
    fsync_directory(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)


# ---- the track -------------------------------------------------------------------------------


def build_gap_data(
    cases: Sequence[RoutedCase],
    *,
    parts: Parts,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
    out_dir: Path,
    config: GapDataConfig,
    held_out: Sequence[RoutedCase] = (),
) -> GapArtefact | str:
    """Diagnose, retrieve, synthesize, filter and write the augmentation batch into
    ``out_dir`` (see the module docstring); the artefact, or why there is none (nothing is
    written then). A pool item whose caption is the prompt of a ``held_out`` (gate-share)
    case is never retrieved into it (``held_out`` in the artefact counts them).

    The near-duplicate filter compares each sample with the train items nearest to the
    retrieval queries (``corpus_neighbours`` each), not with the whole corpus: hashing every
    train image would read and decode the whole training set each round (millions of images,
    often remote), while a copy that matters is a copy of what the concept looks like in the
    corpus — the train items whose captions are near the queries — and retrieval has already
    dropped pool items whose caption nearly copies any corpus caption (similarity >= 0.98).

    :class:`~flywheel.ports.PortError` (a corpus file that does not decode, a records file
    broken mid-way, a failing synthesizer) propagates, with nothing left in ``out_dir``'s
    directory; a pool item whose image does not decode is only dropped (``broken``). An
    earlier batch in ``out_dir`` is replaced once the new one is complete; anything else
    there is refused (``FileExistsError``) before any work. One build per ``out_dir`` at a
    time: a build removes the temporary siblings a killed one left."""
    config.validate()
    out_dir = out_dir.absolute()
    _check_replaceable(out_dir)
    if not cases:
        return "no routed cases"
    corpus = parts.corpus
    name = collection_name(qdrant, "prompts")
    if not client.collection_exists(name):
        return f"{name} does not exist: index the corpus first"
    check_embedders(client, name, {"text": embedder.model_id})

    # 1. Diagnosis.
    counts = count_tags(client, name, corpus.name, CORPUS)
    total = count_tagged(client, name, CORPUS, dataset=corpus.name)
    if total < 2:
        return f"the index holds {total} train item(s) of {corpus.name!r}: index the corpus first"
    known = set(counts) | set(count_tags(client, name, corpus.name, POOL))
    concepts = _count_concepts(counts, known, cases, config.scarce_below)
    scarce = [c.concept for c in concepts if c.scarce and c.asked]  # rarest first
    if not any(c.asked for c in concepts):
        return "the cases name no concept the corpus is tagged with"
    if not scarce:
        return "no concept the cases ask for is scarce in the corpus"
    diagnosis = GapDiagnosis(
        corpus_items=total,
        scarce_below=config.scarce_below,
        concepts=concepts,
        scarce=scarce,
        density=_density(
            cases,
            client=client,
            name=name,
            embedder=embedder,
            corpus_points=total,
            seed=config.seed,
        ),
    )

    # 2. Retrieval (from the index; no file is written yet).
    train = list(cases)  # the caller passes the train share only
    synthesizer = parts.synthesizer
    shares = [
        config.budget // len(scarce) + (k < config.budget % len(scarce)) for k in range(len(scarce))
    ]
    retrieved: list[_Retrieved] = []
    queries_used: list[str] = []
    missing: dict[str, int] = {}
    for concept, share in zip(scarce, shares, strict=True):
        wanted = share if synthesizer is None else round(share * config.retrieved_share)
        queries = list(
            dict.fromkeys(
                c.reference for c in train if names_concept(f"{c.reference}\n{c.prompt}", concept)
            )
        ) or [concept.partition(":")[2]]
        queries_used += queries
        found: list[_Retrieved] = []
        if wanted > 0:
            found = _retrieve(
                concept,
                wanted,
                queries,
                client=client,
                name=name,
                dataset=corpus.name,
                embedder=embedder,
                taken={r.item.id for r in retrieved},
                diversity=config.diversity,
            )
        retrieved += found
        missing[concept] = share - len(found)
    gate_keys = prompt_keys(held_out, references=False)
    kept_retrieved = [
        r
        for r in retrieved
        if not {same_prompt_key(r.item.rich_caption), same_prompt_key(r.item.raw_caption)}
        & gate_keys
    ]
    held = len(retrieved) - len(kept_retrieved)
    retrieved = kept_retrieved
    if not retrieved and synthesizer is None:
        return f"the pool has no item showing {', '.join(scarce)} and no synthesizer is set"

    # 3.-4. Synthesis, the filters, the dataset: in a temporary sibling of out_dir.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_siblings(out_dir):  # a run killed before it could clean up
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        artefact = _write_batch(
            cases,
            diagnosis,
            retrieved,
            missing,
            queries_used,
            parts=parts,
            client=client,
            name=name,
            embedder=embedder,
            work=work,
            out_dir=out_dir,
            config=config,
            held_out=held,
        )
        if isinstance(artefact, str):
            shutil.rmtree(work)
            return artefact
        _move_into_place(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return artefact


def _write_batch(
    cases: Sequence[RoutedCase],
    diagnosis: GapDiagnosis,
    retrieved: list[_Retrieved],
    missing: dict[str, int],
    queries: Sequence[str],
    *,
    parts: Parts,
    client: QdrantClient,
    name: str,
    embedder: TextEmbedder,
    work: Path,
    out_dir: Path,
    config: GapDataConfig,
    held_out: int,
) -> GapArtefact | str:
    corpus = parts.corpus
    synthesized_root = work / SYNTHESIZED_DIR
    readers: dict[str, Reader] = {}
    origins: dict[str, tuple[Origin, CorpusItem]] = {}
    candidates: list[CorpusItem] = []

    def add(origin: Origin, sample_id: str, item: CorpusItem, read: Reader) -> str:
        while sample_id in origins:
            sample_id += "+"
        origins[sample_id] = (origin, item)
        readers[sample_id] = read
        candidates.append(item.model_copy(update={"id": sample_id}))
        return sample_id

    retrieved_ids = [
        add("retrieved", f"retrieved/{r.item.id}", r.item, corpus.image) for r in retrieved
    ]

    synthesized: dict[str, int] = {}
    if parts.synthesizer is not None:
        synthesized_root.mkdir()
        read_synthesized = _policy_reader(synthesized_root, parts.project.images)
        for k, (concept, count) in enumerate(missing.items()):
            if count <= 0:
                continue
            folder = synthesized_root / f"{k:02d}-{_slug(concept)}"
            made = parts.synthesizer.synthesize(concept, count, out=folder, seed=config.seed + k)
            synthesized[concept] = len(made)
            for item in made:
                add("synthesized", f"synthesized/{concept}/{item.id}", item, read_synthesized)

    corpus_hashes = [
        difference_hash(corpus.image(item))
        for item in _nearest_train(
            queries,
            client=client,
            name=name,
            dataset=corpus.name,
            embedder=embedder,
            limit=config.corpus_neighbours,
        )
    ]
    report = filter_candidates(
        candidates,
        read=lambda item: readers[item.id](origins[item.id][1]),
        corpus_hashes=corpus_hashes,
        thresholds=parts.project.filters,
        reward=parts.reward,
    )
    if not report.kept:
        dropped = ", ".join(f"{f} {n}" for f, n in report.dropped.items() if n)
        return f"the filter chain kept none of {len(candidates)} candidates ({dropped})"

    replayed = _replay(corpus.items("train"), config.replay, config.seed)
    dataset = work / DATASET_DIR
    images = dataset / "images"
    images.mkdir(parents=True)
    samples: list[Sample] = []

    def write(origin: Origin, sample_id: str, item: CorpusItem, image: Tensor) -> None:
        relative = f"images/{origin}-{len(samples):06d}.png"
        _png(image, dataset / relative)
        uri = item.image
        path = local_path(uri) if origin == "synthesized" else None
        if path is not None and path.resolve().is_relative_to(work.resolve()):
            # Where the synthesizer's file will be once the batch is in place.
            uri = (out_dir / path.resolve().relative_to(work.resolve())).as_uri()
        split = {"replay": "train", "retrieved": "pool", "synthesized": SYNTHESIZED}[origin]
        samples.append(
            Sample(
                id=sample_id,
                image=relative,
                caption=item.rich_caption,
                provenance=Provenance(dataset=corpus.name, split=split, origin_uri=uri),
            )
        )

    for item in replayed:
        write("replay", f"replay/{item.id}", item, corpus.image(item))
    kept = Counter[str]()
    for sample in report.kept:
        origin, item = origins[sample.id]
        kept[origin] += 1
        write(origin, sample.id, item, readers[sample.id](item))
    write_dataset(dataset, samples)

    artefact = GapArtefact(
        diagnosis=diagnosis,
        retrieved=[
            RetrievedSample(
                item=r.item.id,
                image=r.item.image,
                caption=r.item.rich_caption,
                similarity=r.candidate.similarity,
                tags=list(r.item.tags),
                concept=r.concept,
                dropped_by=report.reasons.get(sample_id),
            )
            for r, sample_id in zip(retrieved, retrieved_ids, strict=True)
        ],
        synthesized=synthesized,
        filters=FilterSummary.model_validate(report.summary()),
        dataset_dir=str(out_dir / DATASET_DIR),
        replay=len(replayed),
        augmentation={origin: kept[origin] for origin in ("retrieved", "synthesized")},
        samples=len(samples),
        mixture_weight=config.mixture_weight,
        cases=[case.case_id for case in cases],
        held_out=held_out,
    )
    atomic_write_text(work / ARTEFACT_FILE, artefact.model_dump_json(indent=2) + "\n")
    return artefact

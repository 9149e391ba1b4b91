"""``flywheel retrieval``: index datasets into Qdrant, diagnose scarcity, retrieve for
augmentation. The backend is the settings': ``FLYWHEEL_QDRANT_URL``, else local mode under
``$FLYWHEEL_HOME/qdrant``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from flywheel.cli.output import console, fail
from flywheel.cli.services import qdrant

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

    from retrieval.embedding import TextEmbedder
    from retrieval.store import QdrantConfig
    from training.data import Sample

retrieval_app = typer.Typer(
    help="Qdrant indexes of the training data: index, diagnose scarcity, retrieve.",
    no_args_is_help=True,
)

COLLECTION_HELP = "prompts (captions), images (targets) or edit_pairs (instruction + source)."


def _world_tags(dataset: Path) -> Callable[[Sample], Sequence[str]] | None:
    from flywheel.world.corpus import SPECS_FILE, read_specs, scene_tags

    if not (dataset / SPECS_FILE).is_file():
        return None
    specs = read_specs(dataset)
    return lambda sample: scene_tags(specs[sample.id].spec) if sample.id in specs else ()


def _indexed_prompts(client: QdrantClient, config: QdrantConfig) -> str:
    """The name of the prompts collection; exits 2 when nothing was indexed yet."""
    from retrieval.store import collection_name

    name = collection_name(config, "prompts")
    if not client.collection_exists(name):
        fail(f"no {name} collection: run `flywheel retrieval index` first")
    return name


def _text_embedder() -> TextEmbedder:
    from retrieval.embedding import TextEmbedder

    try:
        return TextEmbedder()
    except ValueError as exc:
        fail(str(exc).splitlines()[0])


@retrieval_app.command("index")
def index(
    dataset: Annotated[
        Path, typer.Option("--dataset", help="A dataset directory (samples.jsonl).")
    ],
    split: Annotated[
        str, typer.Option("--split", help="corpus (trained on) or pool (candidates).")
    ],
    collection: Annotated[str, typer.Option("--collection", help=COLLECTION_HELP)] = "prompts",
    stage: Annotated[int | None, typer.Option("--stage", help="Curriculum stage.")] = None,
    image_model: Annotated[
        Path | None,
        typer.Option("--image-model", help="open_clip directory (default: the world reward)."),
    ] = None,
    prune_stale: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Then delete this dataset's points (same dataset name and split) that the "
            "directory no longer makes.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Index a dataset's samples (only new or changed ones are embedded)."""
    from flywheel.world.base_model import BASE_REWARD
    from retrieval.embedding import ImageEmbedder, TextEmbedder
    from retrieval.index import CORPUS, POOL, Embedders, dataset_items, index_items, prune
    from retrieval.store import COLLECTIONS, VECTOR_KINDS, EmbedderMismatchError

    if split not in (CORPUS, POOL):
        fail(f"--split {split!r}: corpus or pool")
    indexable = [name for name in COLLECTIONS if name != "failure_cases"]
    if collection not in indexable:
        fail(f"--collection {collection!r}: one of {', '.join(indexable)}")
    if not (dataset / "samples.jsonl").is_file():
        fail(f"--dataset {dataset}: no samples.jsonl")
    kinds = {VECTOR_KINDS[v] for v in COLLECTIONS[collection]}
    try:
        items = dataset_items(
            dataset,
            collection,
            split=split,
            stage=stage,
            extra_tags=_world_tags(dataset),
        )
        embedders = Embedders(
            text=TextEmbedder() if "text" in kinds else None,
            image=ImageEmbedder(image_model or BASE_REWARD) if "image" in kinds else None,
        )
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    with qdrant() as (client, config):
        try:
            report = index_items(
                client,
                config,
                collection,
                items,
                embedders,
                progress=not as_json,
            )
            pruned = 0
            if prune_stale:
                datasets = {item.dataset for item in items}
                pruned = sum(
                    prune(client, config, collection, items, dataset=name, split=split)
                    for name in datasets
                )
        except (EmbedderMismatchError, OSError) as exc:  # OSError: a missing or bad image
            fail(str(exc).splitlines()[0])
    if as_json:
        console.print_json(json.dumps({**report.model_dump(), "pruned": pruned}))
        return
    console.print(
        f"{report.collection}: {report.added} added, {report.updated} updated, "
        f"{report.unchanged} unchanged, {pruned} pruned in {report.seconds:.1f} s",
        highlight=False,
    )


@retrieval_app.command("diagnose")
def diagnose_prompts(
    prompts: Annotated[list[str], typer.Argument(help="Failure prompts.")],
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours measuring density.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """How scarce each prompt's concept is in the training corpus (0 common .. 1 absent)."""
    from retrieval.scarcity import ScarcityConfig, calibration_for, diagnose
    from retrieval.store import EmbedderMismatchError

    config = ScarcityConfig(k=k)
    embedder = _text_embedder()
    with qdrant() as (client, qconfig):
        name = _indexed_prompts(client, qconfig)
        try:
            calibration = calibration_for(client, name, "text", embedder.model_id, config)
            results = diagnose(client, calibration, embedder.embed(prompts), config)
        except (EmbedderMismatchError, ValueError) as exc:
            fail(str(exc).splitlines()[0])
    if as_json:
        rows = [{"prompt": p, **r.model_dump()} for p, r in zip(prompts, results, strict=True)]
        console.print_json(json.dumps(rows))
        return
    table = Table("prompt", "scarcity", f"mean {k}-NN sim", "within radius", "nearest")
    for prompt, result in zip(prompts, results, strict=True):
        nearest = result.neighbours[0].text if result.neighbours else ""
        table.add_row(
            prompt,
            f"{result.scarcity:.2f}",
            f"{result.knn_similarity:.3f} (corpus {result.corpus_knn_median:.3f})",
            str(result.within_radius),
            nearest or "",
        )
    console.print(table)


@retrieval_app.command("augment")
def augment(
    prompt: Annotated[str, typer.Argument(help="The failure's prompt.")],
    limit: Annotated[int, typer.Option("--limit", min=1, help="Candidates.")] = 16,
    diversity: Annotated[
        float, typer.Option("--diversity", min=0.0, max=1.0, help="MMR diversity; 0: top-k.")
    ] = 0.5,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="A tag every candidate has (repeatable).")
    ] = None,
    with_corpus: Annotated[
        bool, typer.Option("--with-corpus", help="Search the corpus too, not only the pool.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Diverse candidates for a prompt from the pool, deduplicated against the corpus."""
    from retrieval.augment import AugmentConfig, retrieve_for_augmentation
    from retrieval.index import CORPUS, POOL
    from retrieval.store import EmbedderMismatchError

    config = AugmentConfig(
        limit=limit,
        diversity=diversity,
        tags_all=tuple(tag or ()),
        splits=(POOL, CORPUS) if with_corpus else (POOL,),
    )
    config.candidates = max(config.candidates, config.limit + config.extra)
    embedder = _text_embedder()
    with qdrant() as (client, qconfig):
        name = _indexed_prompts(client, qconfig)
        try:
            found = retrieve_for_augmentation(
                client, name, "text", embedder.model_id, embedder.embed([prompt])[0], config
            )
        except EmbedderMismatchError as exc:
            fail(str(exc))
    if as_json:
        console.print_json(json.dumps([c.model_dump() for c in found]))
        return
    table = Table("similarity", "split", "dataset/key", "text", "tags")
    for c in found:
        table.add_row(
            f"{c.similarity:.3f}", c.split, f"{c.dataset}/{c.key}", c.text or "", " ".join(c.tags)
        )
    console.print(table)

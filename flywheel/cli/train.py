"""``flywheel train``: run a training recipe into a directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli.output import console, fail


def train_command(
    recipe: Annotated[
        str | None, typer.Argument(help="The recipe to run (see --list).", show_default=False)
    ] = None,
    list_recipes: Annotated[
        bool, typer.Option("--list", help="List the recipes and exit.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (resumed when it has a run).")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=0, help="Steps to train to (recipe's default).")
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Start from these weights: a run directory, its checkpoints/ or a checkpoint.",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Train on this pre-encoded cache (flywheel cache produce); "
            "required by recipes without a generated dataset.",
        ),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")
    ] = True,
) -> None:
    """Train a recipe into --out: metrics.jsonl and checkpoints; resumes an interrupted run."""
    from training.cache import CacheError
    from training.checkpoint import CheckpointError
    from training.recipes import RECIPES

    if list_recipes:
        for name, build in RECIPES.items():
            doc = (build.__doc__ or "").strip().splitlines()
            console.print(f"{name}: {doc[0] if doc else ''}", highlight=False, soft_wrap=True)
        return
    if recipe is None:
        fail("give a RECIPE to run, or --list")
    if recipe not in RECIPES:
        fail(f"unknown recipe {recipe!r}; known: {', '.join(sorted(RECIPES))}")
    if out is None:
        fail("give --out DIR, the directory to train into")
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a directory")

    from training.trainer import train as run_training

    config = RECIPES[recipe]()
    if init is not None:
        if not hasattr(config, "init_from"):
            fail(f"{recipe} does not start from trained weights; drop --init")
        if not init.exists():
            fail(f"--init {init}: no such file or directory")
        config.init_from = init
    recipe_data = getattr(config, "data", None)
    if data is not None:
        if recipe_data is None or not hasattr(recipe_data, "cache_dir"):
            fail(f"{recipe} does not read a training cache; drop --data")
        if not data.is_dir():
            fail(f"--data {data}: no such directory")
        recipe_data.cache_dir = data
    elif (
        getattr(recipe_data, "cache_dir", True) is None
        and getattr(recipe_data, "synthetic", True) is None
    ):
        fail(f"{recipe} trains on a prepared cache: give --data DIR")
    try:
        result = run_training(config, out=out, max_steps=max_steps, progress=progress, name=recipe)
    except (CacheError, CheckpointError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    except OSError as exc:  # e.g. an out/cache that is something else
        fail(f"{out}: {exc}", code=1)
    except RuntimeError as exc:  # e.g. device "cuda" on a machine without CUDA
        fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, code=1)
    plot = ""
    if result.losses:
        from training.plot import PLOT_FILE, plot_metrics

        plot = f", curves in {plot_metrics(result.metrics, out / PLOT_FILE, title=recipe)}"
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    start = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    console.print(
        f"trained {recipe} to step {result.step}{start}{last} in {result.seconds:.1f}s; "
        f"metrics in {result.metrics}{plot}, checkpoint {result.checkpoint}",
        highlight=False,
        soft_wrap=True,
    )

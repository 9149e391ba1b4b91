"""``flywheel cache``: encode a dataset into the pre-encoded training cache
(:mod:`training.cache`) that ``flywheel train --data`` reads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from flywheel.cli.output import console, fail

if TYPE_CHECKING:  # torch and the model stack load only when a command runs
    from model.condition import ConditionEncoderConfig
    from model.vae import ResidualVAE

cache_app = typer.Typer(help="The pre-encoded training cache.", no_args_is_help=True)

VaeRecipe = Literal["debug", "f16c64", "f8c16"]
ConditionRecipe = Literal["minilm", "qwen25-vl", "qwen3-vl"]


def _condition_config(recipe: ConditionRecipe, path: Path | None) -> ConditionEncoderConfig:
    from model.condition import minilm_condition, qwen3_vl_condition, qwen25_vl_condition

    if recipe == "minilm":
        return minilm_condition()
    if path is None:
        fail(f"--condition {recipe} needs --condition-path (the model directory)")
    return qwen25_vl_condition(path) if recipe == "qwen25-vl" else qwen3_vl_condition(path)


def _build_vae(recipe: VaeRecipe, weights: Path | None, init_seed: int) -> ResidualVAE:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from model.vae import ResidualVAE, vae_debug, vae_f8c16, vae_f16c64

    config = {"f16c64": vae_f16c64, "f8c16": vae_f8c16, "debug": vae_debug}[recipe]()
    with torch.random.fork_rng(devices=[]):  # seeded weights, the global RNG left alone
        torch.manual_seed(init_seed)
        vae = ResidualVAE(config)
    if weights is not None:
        try:
            vae.load_state_dict(load_file(str(weights)), strict=True)
        except (SafetensorError, OSError, RuntimeError) as exc:  # unreadable, or another VAE
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fail(f"--vae-weights {weights}: not weights of the {recipe} VAE ({reason})")
    return vae.eval()


@cache_app.command("produce")
def cache_produce(
    data: Annotated[Path, typer.Option("--data", help="Dataset directory.")],
    cache: Annotated[Path, typer.Option("--cache", help="New or empty cache directory.")],
    vae: Annotated[VaeRecipe, typer.Option("--vae", help="VAE recipe.")] = "f16c64",
    vae_weights: Annotated[
        Path | None,
        typer.Option(
            "--vae-weights",
            help="Safetensors state dict of the VAE (`flywheel vae export` writes one).",
        ),
    ] = None,
    init_seed: Annotated[
        int, typer.Option("--init-seed", help="Seed of random VAE weights (tests only).")
    ] = 0,
    condition: Annotated[
        ConditionRecipe,
        typer.Option(
            "--condition",
            help="Condition encoder: the packaged MiniLM, or Qwen2.5-VL / Qwen3-VL from a "
            "directory.",
        ),
    ] = "minilm",
    condition_path: Annotated[
        Path | None,
        typer.Option("--condition-path", help="Local model directory (Qwen encoders)."),
    ] = None,
    target_area: Annotated[int, typer.Option("--target-area", help="Pixels per bucket.")] = (
        1024 * 1024
    ),
    extra_areas: Annotated[
        str,
        typer.Option(
            "--extra-areas",
            help="Comma-separated further bucket areas, for images with at least that many pixels.",
        ),
    ] = "",
    aspect_ratios: Annotated[
        str, typer.Option("--aspect-ratios", help="Comma-separated width/height ratios.")
    ] = "1,1.3333333,0.75,1.5,0.6666667,1.7777778,0.5625",
    multiple_of: Annotated[int, typer.Option("--multiple-of", help="Bucket side multiple.")] = 32,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per shard.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per encoder call.")] = 8,
) -> None:
    """Encode a dataset into a cache directory: VAE latents and prompt conditions, in shards
    per resolution bucket (and per further bucket area of --extra-areas)."""
    from model.condition import ConditionEncoder
    from training.cache import CacheError, ProducerConfig, produce
    from training.data import BucketConfig, DatasetError, read_dataset

    if vae_weights is None and vae != "debug":
        fail("--vae-weights is required except for the debug VAE")
    if vae_weights is not None and not vae_weights.is_file():
        fail(f"--vae-weights {vae_weights}: no such file")
    try:
        ratios = tuple(float(r) for r in aspect_ratios.split(","))
        areas = tuple(int(a) for a in extra_areas.split(",") if a.strip())
    except ValueError as exc:
        fail(f"--aspect-ratios / --extra-areas: {exc}")
    if cache.exists() and (not cache.is_dir() or any(cache.iterdir())):
        fail(f"--cache {cache}: exists and is not an empty directory")
    try:
        config = ProducerConfig(
            buckets=BucketConfig(
                target_area=target_area, aspect_ratios=ratios, multiple_of=multiple_of
            ),
            shard_size=shard_size,
            batch_size=batch_size,
            extra_areas=areas,
        )
        config.validate()
        read_dataset(data)  # the settings and the dataset are checked before the encoders load
        settings = _condition_config(condition, condition_path)
        model = _build_vae(vae, vae_weights, init_seed)
        encoder = ConditionEncoder.load(settings)
        shards = produce(data, cache, vae=model, encoder=encoder, config=config)
    except (DatasetError, CacheError, ValueError) as exc:  # bad input
        fail(str(exc).strip().splitlines()[0])
    console.print(f"wrote {shards} shards to {cache}", highlight=False, soft_wrap=True)

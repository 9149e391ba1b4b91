"""``flywheel convert``: checkpoints between the diffusers layout and ours."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli.output import console, fail


def convert_command(
    out: Annotated[Path, typer.Option("--out", help="Directory to write.")],
    from_diffusers: Annotated[
        Path | None,
        typer.Option("--from-diffusers", help="A diffusers checkpoint directory to convert."),
    ] = None,
    to_diffusers: Annotated[
        Path | None,
        typer.Option("--to-diffusers", help="One of our checkpoint directories to convert."),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option(help="Shard the weights above this size, e.g. 5GB or 500MB.")
    ] = "5GB",
    height: Annotated[int, typer.Option(min=16, help="A pipeline's image height.")] = 1024,
    width: Annotated[int, typer.Option(min=16, help="A pipeline's image width.")] = 1024,
) -> None:
    """Convert a Qwen-Image-2.1 transformer or VAE checkpoint between diffusers and ours; a
    whole QwenImage21Pipeline directory (model_index.json) becomes a generator directory."""
    from model.convert.directory import convert_from_diffusers, convert_to_diffusers

    if (from_diffusers is None) == (to_diffusers is None):
        fail("give exactly one of --from-diffusers DIR and --to-diffusers DIR")
    source = from_diffusers or to_diffusers
    assert source is not None
    if not source.is_dir():
        fail(f"{source}: not a directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"{out}: exists and is not an empty directory")
    if not re.fullmatch(r"\d+(KB|MB|GB|TB)?", max_shard_size):
        fail(f"--max-shard-size {max_shard_size!r}: a byte count or a size like 500MB, 5GB")
    if from_diffusers is not None and (from_diffusers / "model_index.json").is_file():
        from model.convert.pipeline import convert_pipeline

        try:  # a whole pipeline: a generator directory Generator.load reads
            convert_pipeline(from_diffusers, out, height=height, width=width)
        except ValueError as exc:  # ConversionError, CheckpointError
            fail(str(exc).splitlines()[0])
        console.print(f"converted the pipeline {from_diffusers} into the generator directory {out}")
        return
    try:
        if from_diffusers is not None:
            converted = convert_from_diffusers(source, out, max_shard_size=max_shard_size)
        else:
            converted = convert_to_diffusers(source, out, max_shard_size=max_shard_size)
    except ValueError as exc:  # CheckpointError, ConversionError
        fail(str(exc).splitlines()[0])
    console.print(
        f"converted {converted.component} ({converted.tensors} tensors) into {out}: "
        + ", ".join(p.name for p in converted.files)
    )

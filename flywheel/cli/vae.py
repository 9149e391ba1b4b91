"""``flywheel vae``: a trained VAE's weights, as the cache producer reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli.output import console, fail

vae_app = typer.Typer(help="The VAE of a training run.", no_args_is_help=True)


@vae_app.command("export")
def vae_export(
    run: Annotated[
        Path, typer.Argument(help="A VAE training run, its checkpoints/ or one checkpoint.")
    ],
    out: Annotated[Path, typer.Argument(help="The safetensors file to write.")],
) -> None:
    """Write a VAE training run's VAE weights (the projection dropped) as the safetensors
    file `flywheel cache produce --vae-weights` reads; prints its path."""
    from training.checkpoint import CheckpointError
    from training.vae_training import save_vae_weights

    if not run.exists():
        fail(f"{run}: no such file or directory")
    if out.is_dir():
        fail(f"{out}: a directory; give the safetensors file to write")
    try:
        path = save_vae_weights(run, out)
    except (CheckpointError, ValueError) as exc:  # not a run, not a VAE run
        fail(str(exc).splitlines()[0])
    except OSError as exc:
        fail(f"{out}: {exc.strerror or exc}", code=1)
    console.print(str(path), highlight=False, soft_wrap=True)

"""The training loop every objective runs in: AdamW, metrics, resumable checkpoints, progress.

An objective (pretraining, SFT, DPO, GRPO, distillation, VAE, prompt-enhancer SFT / GRPO) is
built by its module into an :class:`Objective`: the module it trains and a ``step`` function
that draws its own batch and returns the loss (with its graph) and the objective's figures.
:func:`run_loop` does the rest, the same for all of them, writing into an output directory::

    <out>/metrics.jsonl     one JSON object per optimizer step: ``step``, ``loss``, the
                            objective's figures, ``grad_norm``, ``lr``
    <out>/checkpoints/      :mod:`training.checkpoint` (every ``checkpoint_every`` steps, last step)

When ``<out>/checkpoints`` holds a checkpoint, :func:`run_loop` continues from it: weights,
optimizer, step, the objective's generator and its data state are restored, and the metrics
of steps after the checkpoint (written by a run killed before its next checkpoint) are
dropped, so an interrupted and resumed run equals an uninterrupted one. A checkpoint written
under another configuration (its ``identity``) is refused.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
NOISE_RNG = "noise"
"""Name of the objective generator's state in a checkpoint."""

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW and its learning rate."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (per unit of learning rate)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr / warmup_steps to lr; 0: constant lr from the start."""
    decay_steps: int | None = None
    """Cosine decay from lr to ``min_lr_ratio * lr`` over this many steps after the warm-up
    (then held there); None: constant lr after the warm-up."""
    min_lr_ratio: float = 0.1
    """Where the cosine decay ends, as a fraction of lr."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; None: no clipping (the norm is still logged)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("OptimizerConfig: lr, eps > 0 and weight_decay, warmup_steps >= 0")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"OptimizerConfig.decay_steps must be >= 1, got {self.decay_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"OptimizerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
            )
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimizerConfig.betas must be in [0, 1), got {self.betas}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"OptimizerConfig.grad_clip must be > 0, got {self.grad_clip}")

    def learning_rate(self, step: int) -> float:
        """The learning rate of the step after ``step`` steps: linear warm-up, then constant or
        cosine-decayed."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay_steps is None:
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass(kw_only=True, slots=True)
class LoopConfig:
    """How long an objective trains, how it is optimized, checkpointed and seeded."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings."""
    max_steps: int = 1000
    """Optimizer steps of a full run (``max_steps=`` of the train call overrides it)."""
    checkpoint_every: int = 500
    """Write a checkpoint every this many steps (and always at the last step)."""
    keep_checkpoints: int | None = 3
    """Checkpoints kept on disk (the newest); None: all."""
    log_every: int = 1
    """Refresh the progress display every this many steps (metrics are written every step)."""
    seed: int = 0
    """Seed of the initial weights, of the objective's generator (noise, times, sampling) and
    of the data order."""
    device: str = "cpu"
    """Torch device to train on ("cpu", "cuda", "cuda:1", ...)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.optimizer.validate()
        if self.max_steps < 0 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("LoopConfig: max_steps >= 0, checkpoint_every and log_every >= 1")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError("LoopConfig.keep_checkpoints must be >= 1 or None")


NOT_IDENTITY = ("max_steps", "device", "log_every", "keep_checkpoints")
"""LoopConfig fields a resumed run may change (they do not change what is trained)."""


@dataclass(kw_only=True, slots=True)
class StepOutput:
    """One step's loss (with its graph, for backward) and the objective's figures."""

    loss: Tensor
    """0-d: what the optimizer minimizes."""
    metrics: dict[str, float]
    """``loss`` and the objective's own figures (each documented by its step function)."""


def _no_state() -> dict[str, Any]:
    return {}


def _ignore_state(state: dict[str, Any]) -> None:
    del state


@dataclass(kw_only=True, slots=True)
class Objective:
    """One objective, built and ready for :func:`run_loop`."""

    model: nn.Module
    """The trained module: its parameters that require grad are optimized, its state dict is
    checkpointed. Frozen parts an objective needs (a reference, a teacher, reward models) are
    not in it: they are rebuilt from the configuration on resume."""
    step: Callable[[torch.Generator], StepOutput]
    """One optimizer step's loss: draws the batch itself; every random number comes from the
    CPU generator it is given (seeded by the loop, saved in checkpoints)."""
    data_state: Callable[[], dict[str, Any]] = _no_state
    """The data position and any state the next steps depend on (tensors allowed)."""
    load_data_state: Callable[[dict[str, Any]], None] = _ignore_state
    """Restore what :attr:`data_state` returned."""


@dataclass(kw_only=True, slots=True)
class TrainResult:
    """What a training call did."""

    step: int
    """Optimizer steps taken in total (this call's and those resumed from)."""
    resumed_from: int | None
    """Step of the checkpoint the call continued from; None: it started fresh."""
    losses: list[float]
    """Loss of each step this call ran, in order."""
    checkpoint: Path | None
    """The latest checkpoint when the call returned; None: none written."""
    metrics: Path
    """The metrics file (``<out>/metrics.jsonl``)."""
    seconds: float
    """Wall time of the call (data preparation included)."""


def seeded(seed: int, build: Callable[[], ModuleT]) -> ModuleT:
    """``build()`` under ``torch.manual_seed(seed)``, the global RNG state left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def infinite(make: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """Items of ``make()`` over and over (a fresh iterator each time one ends)."""
    while True:
        yield from make()


# ---- resume rules -----------------------------------------------------------------------


def parse_metrics_line(line: str) -> dict[str, Any] | None:
    """The record of a metrics line; None for a line that is not a complete record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # e.g. half written by a killed run
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the complete metrics of steps up to ``step`` (rewritten atomically)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        record = parse_metrics_line(line)
        if record is not None and record["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def identity_differences(stored: Any, current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields where ``stored`` and ``current`` differ."""
    if not isinstance(stored, dict):
        return [prefix or "identity"]
    names: list[str] = []
    for key in sorted(set(stored) | set(current)):
        name = f"{prefix}{key}"
        mine, theirs = current.get(key), stored.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            names += identity_differences(theirs, mine, f"{name}.")
        elif mine != theirs or (key in stored) != (key in current):
            names.append(name)
    return names


# ---- the loop ---------------------------------------------------------------------------


def round_loop(
    steps: int,
    *,
    lr: float,
    seed: int = 0,
    warmup: int = 20,
    checkpoints: int = 2,
    optimizer: OptimizerConfig | None = None,
) -> LoopConfig:
    """The loop of a short fine-tuning round: ``min(warmup, steps // 4)`` warm-up steps, a
    cosine decay over the rest, ``checkpoints`` checkpoints over the run (the last one kept),
    ``optimizer``'s other fields (betas, clipping) where given."""
    if steps < 1 or checkpoints < 1:
        raise ValueError(f"steps and checkpoints must be >= 1, got {steps} and {checkpoints}")
    ramp = min(warmup, steps // 4)
    base = optimizer or OptimizerConfig()
    return LoopConfig(
        optimizer=replace(base, lr=lr, warmup_steps=ramp, decay_steps=max(1, steps - ramp)),
        max_steps=steps,
        checkpoint_every=max(1, steps // checkpoints),
        keep_checkpoints=1,
        log_every=5,
        seed=seed,
    )


def run_loop(
    objective: Objective,
    *,
    loop: LoopConfig,
    identity: dict[str, Any],
    out: Path,
    name: str = "train",
    max_steps: int | None = None,
    progress: bool = False,
    started: float | None = None,
) -> TrainResult:
    """Train ``objective`` into ``out`` up to ``max_steps`` (default ``loop.max_steps``).

    ``identity`` (JSON-able) is stored in every checkpoint; resuming under a different one
    raises :class:`CheckpointError` naming the fields that differ. A run already at or past
    ``max_steps`` returns at once. A non-finite loss or gradient norm raises ``ValueError``
    before that step is taken or checkpointed.
    """
    started = time.monotonic() if started is None else started
    loop.validate()
    total = loop.max_steps if max_steps is None else max_steps
    if total < 0:
        raise ValueError(f"max_steps must be >= 0, got {total}")
    out.mkdir(parents=True, exist_ok=True)
    model = objective.model
    model.train()
    opt = loop.optimizer
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
    )
    generator = torch.Generator().manual_seed(loop.seed + 1)

    step, resumed_from = 0, None
    checkpoint_dir = out / CHECKPOINT_DIR
    loaded = load_checkpoint(checkpoint_dir)
    if loaded is not None:
        differences = identity_differences(loaded.extra.get("identity"), identity)
        if differences:
            raise CheckpointError(
                f"{loaded.path} was written by a run with another configuration (differs in "
                f"{', '.join(differences)}); use a new output directory"
            )
        model.load_state_dict(loaded.model)
        optimizer.load_state_dict(loaded.optimizer)
        generator.set_state(loaded.rng[NOISE_RNG])
        objective.load_data_state(loaded.data)
        step = resumed_from = loaded.step
    metrics_path = out / METRICS_FILE
    _truncate_metrics(metrics_path, step)
    losses: list[float] = []
    latest = loaded.path if loaded is not None else None

    def checkpoint() -> None:
        nonlocal latest
        latest = save_checkpoint(
            checkpoint_dir,
            step=step,
            model=model,
            optimizer=optimizer,
            rng={NOISE_RNG: generator.get_state()},
            data=objective.data_state(),
            extra={"identity": identity},
            keep=loop.keep_checkpoints,
        )

    columns = (
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    display = Progress(*columns, console=Console(stderr=True), disable=not progress)
    with display, metrics_path.open("a") as metrics_file:
        task = display.add_task(name, total=total, completed=min(step, total), loss="-")
        while step < total:
            lr = opt.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            result = objective.step(generator)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(result.loss)
            max_norm = opt.grad_clip if opt.grad_clip is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
            loss = float(result.loss.detach())
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise ValueError(
                    f"step {step + 1}: loss {loss} or gradient norm {grad_norm} is not finite; "
                    "stopped before the step was taken or checkpointed"
                )
            optimizer.step()
            step += 1

            record: dict[str, Any] = {"step": step, "loss": loss, **result.metrics}
            record.update(grad_norm=grad_norm, lr=lr)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            losses.append(loss)
            if step % loop.log_every == 0 or step == total:
                display.update(task, completed=step, loss=f"{loss:.4f}")
            if step % loop.checkpoint_every == 0 or step == total:
                checkpoint()

    return TrainResult(
        step=step,
        resumed_from=resumed_from,
        losses=losses,
        checkpoint=latest,
        metrics=metrics_path,
        seconds=time.monotonic() - started,
    )

"""Benchmark of the pretraining step: samples per second, ours vs diffusers' transformer.

One step is what ``training.loop.run_loop`` does for a flow-matching objective: the loss of a
batch, backward, gradient-norm clipping, an AdamW step (learning rate, betas, weight decay and
clipping of the ``pretrain-debug`` recipe). Ours computes the loss with
``training.flow_matching.flow_matching_step``; the reference runs the same loop with diffusers'
``QwenImage21Transformer2DModel`` holding the same weights (converted by
``model.convert.transformer``) and the same math written out::

    e ~ N(0, I), t = sigmoid(n), n ~ N(0, 1)       drawn from a generator seeded alike
    x_t = (1 - t) x0 + t e, v = e - x0             loss = mean((model(x_t, t, c) - v)^2)

with the inputs packed into diffusers' token layout (``diffusers_inputs``). Both loops see
the same batches and draw the same noise. As a check that they do the same work, the loss of
the initial weights (the same in both) on an unpadded batch must agree within 1e-4 in float32
(it does to ~1e-7; a larger gap is reported as a mismatch, exit status 1). The training
batches are right-padded like the cache's, and there the models differ on purpose: diffusers
counts padded prompt positions into the rotary positions, ours gives each sample its unpadded
positions (see ``model/transformer.py``), so the loss trajectories drift apart slowly; the
first step's and the last steps' losses of both are printed too.

Batches are synthetic random tensors of the recipe's shapes (the step is measured, not the data
pipeline; no encoder is loaded): for ``debug``, ``pretrain-debug``'s 32 x 32 images through
``vae_debug`` (8x, 8 channels) give 4 x 4 latents, its MiniLM captions about 9 384-d tokens
(right-padded, masked), batch 4. After a warm-up, rounds alternate between the two loops (the
first to run alternates too, so drift in the machine's load hits both alike); a round runs
``steps / rounds`` steps of each, and the figure is the median over rounds of samples per
second. On the CPU it runs one thread (``--threads``; tiny steps gain nothing from more, and
lose much on a loaded machine). ``--budget`` stops the rounds early (after an even number of
them, at least two) once the run has taken that long since its imports; ``--quick`` sets 25 s,
so a loaded machine still finishes in time. The last line is ``ratio (ours / diffusers samples
per s): X``; above 1 means ours is faster.

FLOPs per step are counted by torch's ``FlopCounterMode`` on one forward + backward of our
model (the optimizer's elementwise work is not counted); TFLOP/s uses our median step time,
and MFU divides it by the device's dense bf16 peak (H100 / H200 / A100 known, or
``--peak-tflops``). MFU is meaningful on CUDA with ``--dtype bfloat16`` (autocast over float32
master weights, as mixed-precision training runs), e.g. on the ~1 B config::

    python bench/train.py --quick                                     # CPU, under 45 s
    python bench/train.py --quick --threads 0                         # torch's CPU threads
    python bench/train.py --device cuda --dtype bfloat16 --config 1b  # MFU on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from model.convert.transformer import diffusers_inputs, transformer_to_diffusers
from model.torchvision_compat import import_torchvision
from model.transformer import (
    DiffusionTransformer,
    TransformerConfig,
    from_tokens,
    transformer_1b,
    transformer_debug,
    transformer_small,
)
from model.vae import vae_debug
from training.flow_matching import (
    FlowMatchingConfig,
    flow_matching_step,
    loss_weights,
    sample_timesteps,
)
from training.loop import OptimizerConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Dense tensor-core peaks in TFLOP/s for bf16 (SXM parts).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
# The first-step losses of the two models must agree this closely (absolute), by dtype.
LOSS_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


@dataclass(frozen=True, slots=True)
class Workload:
    """The shapes of one training batch."""

    batch: int
    """B: samples per step."""
    size: tuple[int, int]
    """Latent height and width."""
    condition_length: int
    """Lc: condition tokens per sample (the longest; shorter ones are padded and masked)."""


def debug_config() -> TransformerConfig:
    """The ``pretrain-debug`` recipe's transformer: ``transformer_debug`` on vae_debug latents."""
    config = transformer_debug()
    config.latent_channels = vae_debug().latent_channels
    return config


CONFIGS: dict[str, tuple[Callable[[], TransformerConfig], Workload]] = {
    # pretrain-debug: 32 x 32 px / 8 = 4 x 4 latents, ~9 MiniLM caption tokens, batch 4.
    "debug": (debug_config, Workload(batch=4, size=(4, 4), condition_length=9)),
    "small": (transformer_small, Workload(batch=4, size=(16, 16), condition_length=32)),
    # A 1024 x 1024 image (f16 latents: 64 x 64 tokens) and a 256-token condition.
    "1b": (transformer_1b, Workload(batch=2, size=(64, 64), condition_length=256)),
}

# pretrain-debug's optimizer (training/recipes.py); grad_clip is the loop's default.
OPTIMIZER = OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup_steps=5)


@dataclass(slots=True)
class Trainer:
    """One model's training loop state: its weights, optimizer, noise generator and losses."""

    name: str
    model: nn.Module
    loss: Callable[[nn.Module, dict[str, Tensor], torch.Generator], Tensor]
    optimizer: torch.optim.Optimizer
    parameters: list[nn.Parameter]
    generator: torch.Generator
    losses: list[float] = dataclasses.field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps (under 45 s on CPU)")
    parser.add_argument(
        "--config", choices=list(CONFIGS), default="debug", help="model and batch (default debug)"
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"default {default_device}")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="bfloat16: autocast over float32 weights (default float32)",
    )
    parser.add_argument("--batch-size", type=int, help="override the config's batch size")
    parser.add_argument(
        "--steps", type=int, help="timed steps per model (default 240 quick, 1000 otherwise)"
    )
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 24, 40)")
    parser.add_argument("--warmup", type=int, help="untimed steps per model (default 5, 20)")
    parser.add_argument(
        "--budget", type=float, help="stop the rounds after this many seconds (25 quick, none)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 0: torch's default (default 1)"
    )
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (TFLOP/s)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (240 if args.quick else 1000)
    args.rounds = min(args.rounds or (24 if args.quick else 40), args.steps)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.quick else 20)
    args.budget = args.budget if args.budget is not None else (25.0 if args.quick else math.inf)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def make_batches(
    config: TransformerConfig, workload: Workload, count: int
) -> list[dict[str, Tensor]]:
    """``count`` cache-like CPU batches: latents, condition (right-padded) and mask."""
    generator = torch.Generator().manual_seed(0)
    w = workload
    batches = []
    for _ in range(count):
        # Valid lengths between ~3/4 of the longest and the longest; the longest is present.
        shortest = max(1, (3 * w.condition_length) // 4)
        lengths = torch.randint(shortest, w.condition_length + 1, (w.batch,), generator=generator)
        lengths[0] = w.condition_length
        mask = torch.arange(w.condition_length)[None] < lengths[:, None]  # (B, Lc)
        shape = (w.batch, w.condition_length, config.condition_dim)
        condition = torch.randn(shape, generator=generator)  # (B, Lc, Dc)
        batches.append(
            {
                "latents": torch.randn(
                    w.batch, config.latent_channels, *w.size, generator=generator
                ),  # (B, C, H, W)
                "condition": condition * mask[..., None],  # (B, Lc, Dc), zeros at padding
                "mask": mask,
            }
        )
    return batches


def ours_loss(
    model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator, flow: FlowMatchingConfig
) -> Tensor:
    assert isinstance(model, DiffusionTransformer)
    return flow_matching_step(model, batch, config=flow, generator=generator).loss


def reference_loss(
    reference: nn.Module,
    batch: dict[str, Tensor],
    generator: torch.Generator,
    flow: FlowMatchingConfig,
) -> Tensor:
    """``flow_matching_step``'s math through diffusers' model (its figures computed too)."""
    parameter = next(reference.parameters())
    device = parameter.device
    x0 = batch["latents"].to(device=device, dtype=torch.float32)  # (B, C, H, W)
    condition = batch["condition"].to(device=device, dtype=parameter.dtype)  # (B, L, D)
    mask = batch["mask"].to(device)  # (B, L)
    noise = torch.randn(x0.shape, generator=generator).to(device)  # (B, C, H, W)
    t = sample_timesteps(x0.shape[0], flow, generator).to(device)  # (B,)

    t_ = t[:, None, None, None]  # (B, 1, 1, 1)
    x_t = (1 - t_) * x0 + t_ * noise  # (B, C, H, W)
    target = noise - x0  # (B, C, H, W)

    h, w = x0.shape[2:]
    out: Tensor = reference(**diffusers_inputs(x_t, t, condition, mask))[0]  # (B, Lc + T, C)
    prediction = from_tokens(out[:, -h * w :], h, w, 1).float()  # (B, C, H, W): the target's
    per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    loss = (loss_weights(t, flow) * per_sample).mean()
    with torch.no_grad():  # the figures flow_matching_step reports (same work, same syncs)
        _metrics = {
            "loss": float(loss),
            "t_mean": float(t.mean()),
            "target_ms": float(target.square().mean()),
            "prediction_ms": float(prediction.square().mean()),
        }
    return loss


def build_reference(ours: DiffusionTransformer) -> nn.Module:
    """diffusers' QwenImage21Transformer2DModel with our model's weights."""
    import_torchvision()  # diffusers -> transformers -> torchvision: see model/torchvision_compat
    from diffusers import QwenImage21Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    state = {name: tensor.detach().float().cpu() for name, tensor in ours.state_dict().items()}
    diffusers_config, diffusers_state = transformer_to_diffusers(state, ours.config)
    reference: nn.Module = QwenImage21Transformer2DModel(**diffusers_config)
    reference.load_state_dict(diffusers_state, strict=True)
    return reference.to(ours.latent_in.weight.device)


def make_trainer(
    name: str,
    model: nn.Module,
    loss: Callable[[nn.Module, dict[str, Tensor], torch.Generator], Tensor],
) -> Trainer:
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZER
    optimizer = torch.optim.AdamW(
        parameters, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
    )
    # The loop seeds its objective generator with seed + 1.
    generator = torch.Generator().manual_seed(1)
    return Trainer(name, model, loss, optimizer, parameters, generator)


def train_step(trainer: Trainer, batch: dict[str, Tensor], autocast: Callable[[], Any]) -> None:
    """One step of ``run_loop``: lr, loss, backward, clipping, the finiteness check, AdamW."""
    opt = OPTIMIZER
    lr = opt.learning_rate(len(trainer.losses))
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    with autocast():
        loss = trainer.loss(trainer.model, batch, trainer.generator)
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    max_norm = opt.grad_clip if opt.grad_clip is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainer.parameters, max_norm))
    value = float(loss.detach())
    if not (math.isfinite(value) and math.isfinite(grad_norm)):
        raise ValueError(f"{trainer.name}: step {len(trainer.losses) + 1} is not finite")
    trainer.optimizer.step()
    trainer.losses.append(value)


def initial_losses(
    trainers: list[Trainer], batch: dict[str, Tensor], autocast: Callable[[], Any]
) -> list[float]:
    """Each trainer's loss on ``batch`` with the same fresh generator (no update)."""
    losses = []
    for trainer in trainers:
        with torch.no_grad(), autocast():
            loss = trainer.loss(trainer.model, batch, torch.Generator().manual_seed(7))
        losses.append(float(loss))
    return losses


def count_flops(trainer: Trainer, batch: dict[str, Tensor], autocast: Callable[[], Any]) -> float:
    """FLOPs of one forward + backward of ``trainer``'s model (no update; its own generator)."""
    generator = torch.Generator().manual_seed(12345)
    with FlopCounterMode(display=False) as counter:
        with autocast():
            loss = trainer.loss(trainer.model, batch, generator)
        torch.autograd.backward(loss)
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peak(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return float(args.peak_tflops)
    if device.type != "cuda" or args.dtype == "float32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> int:
    began = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    recipe, workload = CONFIGS[args.config]
    if args.batch_size:
        workload = dataclasses.replace(workload, batch=args.batch_size)
    config = recipe()
    if config.patch_size != 1:
        raise ValueError("the reference comparison packs latents with patch_size 1")
    flow = FlowMatchingConfig()
    dtype = args.dtype

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])

    torch.manual_seed(0)
    with torch.device(device):
        ours = DiffusionTransformer(config)
    reference = build_reference(ours)
    trainers = [
        make_trainer("ours", ours, lambda m, b, g: ours_loss(m, b, g, flow)),
        make_trainer("diffusers", reference, lambda m, b, g: reference_loss(m, b, g, flow)),
    ]
    batches = make_batches(config, workload, count=8)

    def batch_stream() -> Iterator[dict[str, Tensor]]:
        while True:
            yield from batches

    streams = {trainer.name: batch_stream() for trainer in trainers}
    unpadded = {**batches[0], "mask": torch.ones_like(batches[0]["mask"])}
    parity = initial_losses(trainers, unpadded, autocast)
    flops = count_flops(trainers[0], batches[0], autocast)

    def run(trainer: Trainer, steps: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(trainer, next(streams[trainer.name]), autocast)
        synchronize(device)
        return time.perf_counter() - start

    for trainer in trainers:
        run(trainer, 1 + args.warmup)
    per_round = args.steps // args.rounds
    rates: dict[str, list[float]] = {trainer.name: [] for trainer in trainers}
    for r in range(args.rounds):
        if r >= 2 and r % 2 == 0 and time.perf_counter() - began > args.budget:
            break
        for trainer in trainers if r % 2 == 0 else trainers[::-1]:
            rates[trainer.name].append(per_round * workload.batch / run(trainer, per_round))

    ours_rate = statistics.median(rates["ours"])
    reference_rate = statistics.median(rates["diffusers"])
    ours_losses, reference_losses = trainers[0].losses, trainers[1].losses
    first_diff = abs(parity[0] - parity[1])
    tail = min(20, len(ours_losses))
    peak = device_peak(args, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    params = sum(p.numel() for p in ours.parameters())
    tokens = workload.size[0] * workload.size[1]
    print(
        f"pretraining step ({args.config}: {params / 1e6:.2f} M params, batch {workload.batch}, "
        f"{tokens} image + {workload.condition_length} condition tokens), {dtype}, {where}"
        + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else "")
    )
    print(
        f"{args.warmup} warm-up steps, then {len(rates['ours'])} alternating rounds of {per_round} "
        f"steps per model; median over rounds" + (f"; peak {peak:.0f} TFLOP/s" if peak else "")
    )
    header = f"{'model':<10} {'samples/s':>10} {'ms/step':>9} {'TFLOP/s':>8} {'MFU':>6}"
    print(header)
    print("-" * len(header))
    for name, rate in (("ours", ours_rate), ("diffusers", reference_rate)):
        seconds = workload.batch / rate
        tflops = flops / seconds / 1e12
        mfu = f"{100 * tflops / peak:5.1f}%" if peak else f"{'-':>6}"
        print(f"{name:<10} {rate:10.1f} {seconds * 1e3:9.2f} {tflops:8.4f} {mfu}")
    print(
        f"initial loss, unpadded batch: ours {parity[0]:.6f}, diffusers {parity[1]:.6f}, "
        f"|diff| {first_diff:.1e}"
    )
    print(
        f"training loss, padded batches (RoPE positions differ): step 1 ours "
        f"{ours_losses[0]:.4f}, diffusers {reference_losses[0]:.4f}; mean of the last {tail} "
        f"of {len(ours_losses)} steps ours {statistics.fmean(ours_losses[-tail:]):.4f}, "
        f"diffusers {statistics.fmean(reference_losses[-tail:]):.4f}"
    )
    print(f"forward+backward FLOPs per step: {flops:.3e} (torch FlopCounterMode, ours)")
    print(f"({time.perf_counter() - began:.1f} s after imports)")
    status = 0
    if first_diff > LOSS_TOLERANCE[dtype]:
        print(
            f"MISMATCH: the initial losses differ by {first_diff:.1e} "
            f"(> {LOSS_TOLERANCE[dtype]:.0e}): the two loops do not compute the same thing",
            file=sys.stderr,
        )
        status = 1
    print(f"ratio (ours / diffusers samples per s): {ours_rate / reference_rate:.2f}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())

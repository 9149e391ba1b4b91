"""Benchmark of the diffusion transformer: a training step (forward + backward), ours vs diffusers.

Both models hold the same weights (ours converted to diffusers' ``QwenImage21Transformer2DModel``
by ``model.convert.transformer``) and get the same inputs; the loss is the mean square of the
target's prediction. Steps of the two models alternate (so drift in the machine's load hits
both alike), after a warm-up; the figure is the median step time. The table also shows the
largest difference between the two predictions, as a check that the work is the same.

Cases (``--config`` picks the configs): text-to-image at each config, plus editing (one input
image as large as the target) at ``small``. The last line is ``ratio (diffusers time / ours):
X`` for the ``small`` text-to-image case (else the last config run); above 1 means ours is
faster.

FLOPs are counted analytically, per forward, for what our model computes (B samples, L joint
tokens = P prefix + T target tokens, Lc condition tokens, N image tokens, width D, MLP width
M = mlp_ratio * D, H heads of Dh channels, C * p * p features per image token)::

    blocks      num_layers * 2 * B * L * (4 * D^2 + 3 * D * M)         q, k, v, out; gate, up, down
    attention   num_layers * 4 * B * H * Dh * (sum_g n_g * e_g + T * L)   QK^T and AV
                (block-causal: prefix group g, a text run or an image, has n_g queries that
                see the e_g keys up to its end; without block-causal attention: L^2)
    embeddings  2 * B * (Lc * (Dc * D + D^2) + N * C p^2 * D + T * D * C p^2)
    timestep    2 * B' * (F * D + 5 * D^2) + 2 * B * D^2     B' = B + 1 with causal_condition

A training step is 3x the forward (the backward costs two forwards' matmuls). Masked entries
(causal text rows, padding) count as computed, as the kernels compute them. On the 1b config
the formula equals torch's FlopCounterMode count (math attention) exactly, forward and
backward. TFLOP/s = step FLOPs / median step time; MFU = TFLOP/s / the device's dense peak
(bf16/fp16 peaks of H100 / H200 / A100 are known; ``--peak-tflops`` sets it otherwise).

    python bench/transformer.py --quick                                   # CPU, under 45 s
    python bench/transformer.py --device cuda --dtype bfloat16 --config 1b
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from model.convert.transformer import diffusers_inputs, transformer_to_diffusers
from model.torchvision_compat import import_torchvision
from model.transformer import (
    DiffusionTransformer,
    TransformerConfig,
    build_layout,
    from_tokens,
    transformer_1b,
    transformer_debug,
    transformer_small,
)

HEADLINE_CONFIG = "small"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Dense tensor-core peaks in TFLOP/s for bf16 / fp16 (SXM parts).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


@dataclass(frozen=True, slots=True)
class Workload:
    """The inputs of one case: a batch of targets, a condition, optionally input images."""

    batch: int
    """B: samples per step."""
    size: tuple[int, int]
    """Latent height and width of the target (and of each input image)."""
    condition_length: int
    """Lc: condition tokens per sample."""
    input_images: int
    """Number of input images (editing); 0 for text-to-image."""


CONFIGS: dict[str, tuple[Callable[[], TransformerConfig], Workload]] = {
    "tiny": (
        transformer_debug,
        Workload(batch=2, size=(8, 8), condition_length=16, input_images=0),
    ),
    "small": (
        transformer_small,
        Workload(batch=2, size=(16, 16), condition_length=32, input_images=0),
    ),
    # A 1024 x 1024 image (f16 latents: 64 x 64 tokens) and a 256-token condition.
    "1b": (transformer_1b, Workload(batch=2, size=(64, 64), condition_length=256, input_images=0)),
}


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    config_name: str
    config: TransformerConfig
    workload: Workload


@dataclass(frozen=True, slots=True)
class Inputs:
    latents: Tensor  # (B, C, H, W)
    timestep: Tensor  # (B,)
    condition: Tensor  # (B, Lc, Dc)
    input_latents: tuple[Tensor, ...]  # each (B, C, H, W)


@dataclass(frozen=True, slots=True)
class Result:
    case: Case
    ours_s: float
    reference_s: float | None
    max_diff: float | None
    flops: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps (under 45 s on CPU)")
    parser.add_argument(
        "--config",
        default="tiny,small",
        help=f"comma-separated configs among {', '.join(CONFIGS)} (default: tiny,small)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch", type=int, help="override every case's batch size")
    parser.add_argument("--steps", type=int, help="timed steps per model (default 5 quick, 15)")
    parser.add_argument("--warmup", type=int, help="untimed steps per model (default 2 quick, 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-reference", action="store_true", help="time only our model")
    parser.add_argument("--no-editing", action="store_true", help="skip the editing case")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="checkpoint our blocks (and theirs)"
    )
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (TFLOP/s)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.config.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        parser.error(f"unknown --config {unknown}; choose among {list(CONFIGS)}")
    args.config_names = names
    args.steps = args.steps or (5 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    return args


def cases(args: argparse.Namespace) -> list[Case]:
    out = []
    for name in args.config_names:
        recipe, workload = CONFIGS[name]
        if args.batch:
            workload = dataclasses.replace(workload, batch=args.batch)
        config = recipe()
        out.append(Case(f"{name} text-to-image", name, config, workload))
        if name == HEADLINE_CONFIG and not args.no_editing:
            edit = dataclasses.replace(workload, input_images=1)
            out.append(Case(f"{name} editing (1 input image)", name, config, edit))
    return out


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype) -> Inputs:
    generator = torch.Generator().manual_seed(0)
    w, c = case.workload, case.config

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return Inputs(
        latents=randn(w.batch, c.latent_channels, *w.size),
        timestep=torch.rand(w.batch, generator=generator).to(device),
        condition=randn(w.batch, w.condition_length, c.condition_dim),
        input_latents=tuple(
            randn(w.batch, c.latent_channels, *w.size) for _ in range(w.input_images)
        ),
    )


def forward_flops(config: TransformerConfig, workload: Workload) -> float:
    """Forward FLOPs of our model on ``workload`` (the module docstring's formula)."""
    b = workload.batch
    p2 = config.patch_size**2
    size = (workload.size[0] // config.patch_size, workload.size[1] // config.patch_size)
    target = size[0] * size[1]
    images = target * (1 + workload.input_images)
    layout = build_layout(workload.condition_length, [size] * (1 + workload.input_images))
    length = layout.length
    d = config.hidden_size
    m = config.mlp_ratio * d
    features = config.latent_channels * p2
    blocks = config.num_layers * 2 * b * length * (4 * d * d + 3 * d * m)
    if config.block_causal:
        # Each prefix group's queries see the keys up to the group's end; the target sees all.
        groups = layout.segments[:-1]
        scores = sum(g.length * (g.start + g.length) for g in groups) + target * length
    else:
        scores = length * length
    attention = config.num_layers * 4 * b * config.num_heads * config.head_dim * scores
    embeddings = (
        2
        * b
        * (
            workload.condition_length * (config.condition_dim * d + d * d)
            + images * features * d
            + target * d * features
        )
    )
    rows = b + 1 if config.causal_condition else b
    timestep = 2 * rows * (config.timestep_features * d + 5 * d * d) + 2 * b * d * d
    return float(blocks + attention + embeddings + timestep)


def build_reference(ours: DiffusionTransformer) -> Any:
    """diffusers' QwenImage21Transformer2DModel with our model's weights."""
    import_torchvision()  # diffusers -> transformers -> torchvision: see model/torchvision_compat
    from diffusers import QwenImage21Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    # It warns that `.to(dtype)` bypasses from_pretrained's fp32 modules (it has none).
    diffusers_logging.set_verbosity_error()

    state = {name: tensor.detach().float().cpu() for name, tensor in ours.state_dict().items()}
    diffusers_config, diffusers_state = transformer_to_diffusers(state, ours.config)
    reference = QwenImage21Transformer2DModel(**diffusers_config)
    reference.load_state_dict(diffusers_state, strict=True)
    weight = ours.latent_in.weight
    return reference.to(device=weight.device, dtype=weight.dtype)


def ours_step(model: DiffusionTransformer, inputs: Inputs) -> Tensor:
    model.zero_grad(set_to_none=True)
    prediction: Tensor = model(
        inputs.latents, inputs.timestep, inputs.condition, input_latents=inputs.input_latents
    )
    torch.autograd.backward(prediction.float().square().mean())
    return prediction.detach()


def reference_step(reference: Any, inputs: Inputs) -> Tensor:
    """The same step through diffusers: input images take slots right after the condition."""
    reference.zero_grad(set_to_none=True)
    _, _, h, w = inputs.latents.shape
    kwargs = diffusers_inputs(
        inputs.latents, inputs.timestep, inputs.condition, input_latents=inputs.input_latents
    )
    out: Tensor = reference(**kwargs)[0]  # (B, N, C): every image's tokens, the target last
    prediction = out[:, -h * w :]  # (B, T, C)
    torch.autograd.backward(prediction.float().square().mean())
    return from_tokens(prediction.detach(), h, w, 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], Tensor], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> Result:
    dtype = DTYPES[args.dtype]
    if case.config.patch_size != 1:
        raise ValueError("the reference comparison packs latents with patch_size 1")
    torch.manual_seed(0)
    with torch.device(device):
        ours = DiffusionTransformer(case.config)
    ours = ours.to(dtype=dtype).train()
    ours.gradient_checkpointing = args.gradient_checkpointing
    inputs = make_inputs(case, device, dtype)
    reference = None
    if not args.no_reference:
        reference = build_reference(ours).train()
        if args.gradient_checkpointing:
            reference.enable_gradient_checkpointing()

    def step_ours() -> Tensor:
        return ours_step(ours, inputs)

    def step_reference() -> Tensor:
        return reference_step(reference, inputs)

    max_diff = None
    first = step_ours()
    if reference is not None:
        max_diff = float((first.float() - step_reference().float()).abs().max())
    for _ in range(args.warmup - 1):
        step_ours()
        if reference is not None:
            step_reference()
    ours_times, reference_times = [], []
    for _ in range(args.steps):
        ours_times.append(timed(step_ours, device))
        if reference is not None:
            reference_times.append(timed(step_reference, device))
    return Result(
        case=case,
        ours_s=statistics.median(ours_times),
        reference_s=statistics.median(reference_times) if reference_times else None,
        max_diff=max_diff,
        flops=3 * forward_flops(case.config, case.workload),
    )


def device_peak(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return float(args.peak_tflops)
    if device.type != "cuda" or args.dtype == "float32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def report(results: list[Result], peak: float | None) -> None:
    header = (
        f"{'case':<32} {'tokens':>7} {'ours ms':>9} {'diffusers ms':>13} {'ratio':>6} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'max |diff|':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        w = r.case.workload
        target = w.size[0] * w.size[1] // r.case.config.patch_size**2
        tokens = w.condition_length + target * (1 + w.input_images)
        ref = f"{r.reference_s * 1e3:13.1f}" if r.reference_s is not None else f"{'-':>13}"
        ratio = f"{r.reference_s / r.ours_s:6.2f}" if r.reference_s is not None else f"{'-':>6}"
        tflops = r.flops / r.ours_s / 1e12
        mfu = f"{100 * tflops / peak:5.1f}%" if peak else f"{'-':>6}"
        diff = f"{r.max_diff:10.2e}" if r.max_diff is not None else f"{'-':>10}"
        print(
            f"{r.case.name:<32} {tokens:>7} {r.ours_s * 1e3:9.1f} {ref} {ratio} "
            f"{tflops:8.3f} {mfu} {diff}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    elif device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    began = time.perf_counter()
    results = []
    for case in cases(args):
        results.append(run_case(case, args, device))
    peak = device_peak(args, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"forward+backward step, {args.dtype}, {where}"
        + (f", {args.threads} thread(s)" if device.type == "cpu" else "")
        + f", median of {args.steps} after {args.warmup} warm-up"
        + (f", peak {peak:.0f} TFLOP/s" if peak else "")
    )
    report(results, peak)
    print(f"({time.perf_counter() - began:.1f} s)")
    compared = [
        r for r in results if r.reference_s is not None and r.case.workload.input_images == 0
    ]
    if not compared:
        return 0
    headline = next((r for r in compared if r.case.config_name == HEADLINE_CONFIG), compared[-1])
    assert headline.reference_s is not None
    print(f"ratio (diffusers time / ours): {headline.reference_s / headline.ours_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

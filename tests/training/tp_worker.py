"""Worker for ``test_tensor_parallel.py``: run under ``torchrun`` on CPU over gloo.

Every rank builds the same seeded tiny transformer, runs forward and backward without
tensor parallelism (the reference), then parallelizes a copy over all ranks and runs the same
inputs again. It compares the outputs, the split weights' gradients with the matching shards
of the reference gradients, and the replicated parameters' gradients with the reference ones.
Rank 0 writes the largest differences (over all ranks) as JSON to the path in ``argv[1]``.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from model.transformer import (
    DiffusionTransformer,
    TransformerBlock,
    TransformerConfig,
    transformer_debug,
)

with warnings.catch_warnings():
    # megatron-core warns at import that Transformer Engine and Apex are absent.
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*", category=UserWarning)
    from megatron.core import parallel_state

    from training.parallel import (
        ColumnParallelProjection,
        RowParallelProjection,
        parallelize_transformer,
    )


def tiny_config() -> TransformerConfig:
    """transformer_debug with 4 heads of 16 channels, so each of 2 ranks runs 2 heads."""
    config = transformer_debug()
    config.num_heads = 4
    config.head_dim = 16
    config.rope_axes_dims = (4, 6, 6)
    config.latent_channels = 16
    config.condition_dim = 32
    return config


Case = Callable[[DiffusionTransformer], Tensor]


def make_cases(config: TransformerConfig) -> dict[str, Case]:
    """Seeded inputs: text-to-image, and editing with one input image; each runs a model."""
    g = torch.Generator().manual_seed(1)
    c = config.latent_channels
    latents = torch.randn(2, c, 4, 6, generator=g)
    timestep = torch.rand(2, generator=g)
    condition = torch.randn(2, 5, config.condition_dim, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    image = torch.randn(2, c, 4, 4, generator=g)

    def text_to_image(model: DiffusionTransformer) -> Tensor:
        return model(latents, timestep, condition, mask)  # type: ignore[no-any-return]

    def editing(model: DiffusionTransformer) -> Tensor:
        return model(  # type: ignore[no-any-return]
            latents, timestep, condition, mask, input_latents=[image]
        )

    return {"text_to_image": text_to_image, "editing": editing}


def run(
    model: DiffusionTransformer, case: Case, weight: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward, backward of ``sum(out * weight)``; the output and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    out = case(model)
    torch.autograd.backward((out * weight).sum())
    grads = {}
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        grads[name] = param.grad.detach().clone()
    return out.detach(), grads


def shard(full: Tensor, param: torch.nn.Parameter, rank: int, tp: int) -> Tensor:
    """The slice of a TP=1 tensor that ``param`` (a split weight) holds on ``rank``."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = int(param.partition_dim)  # type: ignore[attr-defined]  # set by megatron
    size = full.shape[dim] // tp
    return full.narrow(dim, rank * size, size)


def main() -> None:
    out_path = Path(sys.argv[1])
    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = group.rank()

    config = tiny_config()
    torch.manual_seed(0)
    reference = DiffusionTransformer(config)
    # Non-trivial norm weights (they start at ones/zeros), so their gradients are tested too.
    with torch.no_grad():
        for param in reference.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    parallel = parallelize_transformer(copy.deepcopy(reference), tp_group=group)

    heads_local = config.num_heads // tp
    split = 0
    for block in parallel.blocks:
        assert isinstance(block, TransformerBlock)
        assert isinstance(block.attn.q_proj, ColumnParallelProjection)
        assert isinstance(block.attn.out_proj, RowParallelProjection)
        assert isinstance(block.mlp.down_proj, RowParallelProjection)
        assert block.attn.q_proj.weight.shape[0] == heads_local * config.head_dim
        split += sum(getattr(p, "tensor_model_parallel", False) for p in block.parameters())
    assert split == 7 * config.num_layers, split

    g = torch.Generator().manual_seed(2)
    weight = torch.randn(2, config.latent_channels, 4, 6, generator=g)
    results: dict[str, float] = {}
    for label, case in make_cases(config).items():
        for checkpointing in (False, True):
            reference.gradient_checkpointing = checkpointing
            parallel.gradient_checkpointing = checkpointing
            ref_out, ref_grads = run(reference, case, weight)
            par_out, par_grads = run(parallel, case, weight)
            params = dict(parallel.named_parameters())
            assert params.keys() == ref_grads.keys()
            split_diff = 0.0
            replicated_diff = 0.0
            for name, param in params.items():
                expected = shard(ref_grads[name], param, rank, tp)
                assert par_grads[name].shape == expected.shape, name
                diff = (par_grads[name] - expected).abs().max().item()
                if getattr(param, "tensor_model_parallel", False):
                    split_diff = max(split_diff, diff)
                else:
                    replicated_diff = max(replicated_diff, diff)
            suffix = "_checkpointed" if checkpointing else ""
            results[f"{label}{suffix}_output"] = (par_out - ref_out).abs().max().item()
            results[f"{label}{suffix}_split_grad"] = split_diff
            results[f"{label}{suffix}_replicated_grad"] = replicated_diff
            # Sanity: the gradients are not all ~0 (the comparison would prove nothing).
            assert max(gr.abs().max().item() for gr in ref_grads.values()) > 1e-3

    values = torch.tensor(list(results.values()), dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        worst = dict(zip(results, values.tolist(), strict=True))
        out_path.write_text(json.dumps(worst, indent=1))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

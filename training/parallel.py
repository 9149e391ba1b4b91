"""Tensor parallelism for the diffusion transformer with megatron-core, applied from outside.

:func:`parallelize_transformer` swaps each block's projections for megatron-core's
tensor-parallel linears and copies this rank's shard of the existing weights into them:

* attention ``q_proj``/``k_proj``/``v_proj`` and the SwiGLU ``gate_proj``/``up_proj`` become
  ``ColumnParallelLinear`` (``gather_output=False``): each rank holds a contiguous slice of the
  output rows, i.e. ``num_heads / tp`` whole heads, or ``mlp_size / tp`` hidden channels;
* attention ``out_proj`` and the SwiGLU ``down_proj`` become ``RowParallelLinear``
  (``input_is_parallel=True``): each rank holds the matching input columns and the partial
  products are all-reduced over the tensor-parallel group.

Our own attention core (q/k RMS norm, MSRoPE, SDPA) stays: ``Attention`` counts its heads
from the projection width, so a rank simply runs its local heads. The shared modulation, the
norms, the embeddings and the output projection stay replicated on every rank.

The per-head q/k RMS-norm weights are replicated but each rank only sees its own heads, so
their gradient is partial per rank; a gradient hook all-reduces it over the group (the role of
megatron's layer-norm gradient all-reduce in its training loop, done here for our model).

CPU: with ``use_cpu_initialization=True`` and ``perform_initialization=False`` megatron-core's
linears allocate on the CPU and draw nothing from its CUDA RNG tracker; the forward and
backward paths (no sequence parallelism, no gradient-accumulation fusion) use only
``torch.distributed`` collectives, so they run over gloo. Importing megatron-core emits
``UserWarning``s about Transformer Engine and Apex being absent.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from torch import Tensor, nn

from model.transformer import Attention, DiffusionTransformer, SwiGLU


class ColumnParallelProjection(ColumnParallelLinear):  # type: ignore[misc]
    """Megatron's column-parallel linear returning only the (local) output, like ``nn.Linear``."""

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., D) replicated -> (..., out / tp) this rank's columns
        out, _ = super().forward(x)
        return out  # type: ignore[no-any-return]


class RowParallelProjection(RowParallelLinear):  # type: ignore[misc]
    """Megatron's row-parallel linear returning only the (all-reduced) output."""

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., in / tp) this rank's slice -> (..., out) summed over the group
        out, _ = super().forward(x)
        return out  # type: ignore[no-any-return]


def tensor_parallel_config(tp_size: int, dtype: torch.dtype) -> ModelParallelConfig:
    """Megatron's config for our linears: CPU allocation, no init (weights are copied in)."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
    )


def _check_no_bias(linear: nn.Linear) -> None:
    """Refuse a linear with a bias: the parallel copies hold weights only."""
    if linear.bias is not None:
        raise ValueError(
            f"tensor parallelism supports bias-free linears only, got {linear} with a bias"
        )


def _column(linear: nn.Linear, config: ModelParallelConfig, group: dist.ProcessGroup) -> nn.Module:
    """A column-parallel copy of ``linear`` holding this rank's slice of the output rows."""
    _check_no_bias(linear)
    out_features, in_features = linear.weight.shape
    layer = ColumnParallelProjection(
        in_features,
        out_features,
        config=config,
        init_method=nn.init.zeros_,
        bias=False,
        gather_output=False,
        tp_group=group,
    )
    return _adopt_shard(layer, linear, dim=0, group=group)  # rows: out_features / tp


def _row(linear: nn.Linear, config: ModelParallelConfig, group: dist.ProcessGroup) -> nn.Module:
    """A row-parallel copy of ``linear`` holding this rank's slice of the input columns."""
    _check_no_bias(linear)
    out_features, in_features = linear.weight.shape
    layer = RowParallelProjection(
        in_features,
        out_features,
        config=config,
        init_method=nn.init.zeros_,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=group,
    )
    return _adopt_shard(layer, linear, dim=1, group=group)  # columns: in_features / tp


def _adopt_shard(
    layer: nn.Module, linear: nn.Linear, *, dim: int, group: dist.ProcessGroup
) -> nn.Module:
    """Copy this rank's slice of ``linear.weight`` along ``dim`` into ``layer``'s weight."""
    weight = layer.get_parameter("weight")
    size = weight.shape[dim]
    with torch.no_grad():
        weight.copy_(linear.weight.narrow(dim, group.rank() * size, size))
    # Megatron only tags the shard when it initializes it; we copy instead, so tag it here.
    set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
    weight.requires_grad_(linear.weight.requires_grad)
    return layer.to(linear.weight.device)


def _all_reduce_grad(param: nn.Parameter, group: dist.ProcessGroup) -> None:
    """Sum ``param``'s gradient over ``group`` in every backward (before it accumulates)."""

    def hook(grad: Tensor) -> Tensor:
        total = grad.clone()
        dist.all_reduce(total, group=group)
        return total

    param.register_hook(hook)  # type: ignore[no-untyped-call]


def parallelize_transformer(
    model: DiffusionTransformer, *, tp_group: dist.ProcessGroup
) -> DiffusionTransformer:
    """Split every block's attention and MLP over ``tp_group``, in place; returns ``model``.

    Every rank of the group must call this on identical copies of the model (same weights);
    each keeps only its shard of the split projections. The forward must then be run on every
    rank with the same inputs, and gives the same output everywhere.
    """
    tp = tp_group.size()
    config = model.config
    if config.num_heads % tp:
        raise ValueError(f"num_heads={config.num_heads} is not divisible by the TP size {tp}")
    mlp_size = config.mlp_ratio * config.hidden_size
    if mlp_size % tp:
        raise ValueError(f"the MLP width {mlp_size} is not divisible by the TP size {tp}")
    mp_config = tensor_parallel_config(tp, model.latent_in.weight.dtype)
    for block in model.blocks:
        attn = block.attn
        mlp = block.mlp
        if not isinstance(attn, Attention) or not isinstance(mlp, SwiGLU):
            raise TypeError(f"unexpected block layout: {type(attn)}, {type(mlp)}")
        if not isinstance(attn.q_proj, nn.Linear):
            raise ValueError("the model is already parallelized")
        # Each rank keeps num_heads / tp whole heads: rows h * Dh .. (h + 1) * Dh are head h.
        # q/k/v: (D) -> (H / tp * Dh); out: (H / tp * Dh) -> (D)
        # gate/up: (D) -> (M / tp); down: (M / tp) -> (D)
        for module, names, make in (
            (attn, ("q_proj", "k_proj", "v_proj"), _column),
            (attn, ("out_proj",), _row),
            (mlp, ("gate_proj", "up_proj"), _column),
            (mlp, ("down_proj",), _row),
        ):
            for name in names:
                setattr(module, name, make(getattr(module, name), mp_config, tp_group))
        if tp > 1:
            _all_reduce_grad(attn.q_norm, tp_group)
            _all_reduce_grad(attn.k_norm, tp_group)
    return model

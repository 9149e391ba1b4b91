"""The diffusion transformer: text and image tokens in one stream (Qwen-Image-2.1 architecture).

One sequence holds the condition tokens (the condition encoder's hidden states), the tokens
of any input images (editing) and the tokens of the noisy target image, always last::

    [ condition ... (input image 1) ... condition ... (input image 2) ... condition | target ]
    \\______________________________ prefix, P tokens ______________________________/ \\_ T _/

Input-image tokens either replace the positions the encoder reserved for them (``image_slots``,
as a vision-language encoder's ``<|image_pad|>`` tokens do; each slot stands for
``tokens_per_image_slot`` latent tokens) or follow the condition, one image after another.

Every block is pre-norm, with multiplicative modulation: ``x + tanh(gate) * f(LN(x) * (1 +
scale))`` (no shift), where ``f`` is attention or a SwiGLU MLP. One modulation projection is
shared by all blocks: the timestep gives four vectors (scale and gate for attention and MLP).
With ``causal_condition``, prefix tokens are modulated as at ``t = 0`` and only the target
tokens see the sampled timestep, so the prefix does not depend on the noise level.

Positions are MSRoPE over three axes (frame, height, width): condition tokens sit on the
diagonal (the same position on all three axes, advancing by one per valid token); an image
takes the next frame position and a height/width grid centred on zero, then advances the
position by ``max(h, w)``. Padded condition tokens advance nothing, so a sample's positions
do not depend on how far its batch is padded.

Attention is block-causal by default: condition tokens attend causally, each image attends
within itself bidirectionally and to everything before it, the target attends to every
valid token. Padded condition tokens are never attended to.

The numerics and the parameter layout match diffusers' ``QwenImage21Transformer2DModel``
(``model/convert/transformer.py`` maps the weights). Where diffusers counts padded prompt
positions into the rotary positions of a padded batch, this model gives each sample the
positions it has unpadded, i.e. equals diffusers run on each sample alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# ---- configuration ----------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class TransformerConfig:
    """Shape of the diffusion transformer. ``head_dim`` must equal ``sum(rope_axes_dims)``."""

    latent_channels: int = 64
    """C: channels of the VAE latents the model reads (noisy target, input images) and predicts."""
    patch_size: int = 1
    """p: a token is a p x p patch of latent pixels (p * p * C features); 1 in Qwen-Image-2.1."""
    condition_dim: int = 4096
    """Dc: channels of the condition encoder's hidden states."""
    num_layers: int = 32
    """Number of transformer blocks."""
    num_heads: int = 32
    """Attention heads per block."""
    head_dim: int = 128
    """Channels per attention head; the model width is ``num_heads * head_dim``."""
    mlp_ratio: int = 3
    """SwiGLU hidden width as a multiple of the model width."""
    rope_axes_dims: tuple[int, int, int] = (16, 56, 56)
    """Head channels rotated by the frame, height and width positions (even; sum = head_dim)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    eps: float = 1e-6
    """Epsilon of every norm (layer norms, q/k RMS norms, the condition RMS norm)."""
    timestep_features: int = 256
    """Width of the sinusoidal timestep features fed to the timestep MLP."""
    timestep_scale: float = 1000.0
    """The timestep in [0, 1] is multiplied by this before the sinusoids."""
    causal_condition: bool = True
    """Modulate prefix tokens (condition, input images) as at t = 0; only the target sees t."""
    block_causal: bool = True
    """Block-causal attention (see the module docstring); False: every token attends to all."""
    tokens_per_image_slot: int = 4
    """Latent tokens one encoder image slot stands for (a 2 x 2 group), for ``image_slots``."""

    @property
    def hidden_size(self) -> int:
        """D: the model width, ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        positive = {
            "latent_channels": self.latent_channels,
            "patch_size": self.patch_size,
            "condition_dim": self.condition_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "mlp_ratio": self.mlp_ratio,
            "timestep_features": self.timestep_features,
            "tokens_per_image_slot": self.tokens_per_image_slot,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"TransformerConfig.{name} must be >= 1, got {value}")
        if len(self.rope_axes_dims) != 3 or any(d < 2 or d % 2 for d in self.rope_axes_dims):
            raise ValueError(
                f"TransformerConfig.rope_axes_dims must be three even positive sizes, "
                f"got {self.rope_axes_dims}"
            )
        if sum(self.rope_axes_dims) != self.head_dim:
            raise ValueError(
                f"TransformerConfig.rope_axes_dims {self.rope_axes_dims} must sum to "
                f"head_dim={self.head_dim}"
            )
        if self.timestep_features % 2:
            raise ValueError("TransformerConfig.timestep_features must be even")


def transformer_debug() -> TransformerConfig:
    """CPU-tiny: 2 blocks of width 64, a 384-d condition (the embedded MiniLM encoder)."""
    return TransformerConfig(
        latent_channels=64,
        condition_dim=384,
        num_layers=2,
        num_heads=2,
        head_dim=32,
        rope_axes_dims=(8, 12, 12),
    )


def transformer_small() -> TransformerConfig:
    """A few million parameters: 4 blocks of width 256; CPU benchmarks and quick experiments."""
    return TransformerConfig(
        latent_channels=64,
        condition_dim=384,
        num_layers=4,
        num_heads=4,
        head_dim=64,
        rope_axes_dims=(16, 24, 24),
    )


def transformer_1b() -> TransformerConfig:
    """About 1.0 B parameters: 18 blocks of width 2048 (16 x 128), a 4096-d condition."""
    return TransformerConfig(
        latent_channels=64,
        condition_dim=4096,
        num_layers=18,
        num_heads=16,
        head_dim=128,
        rope_axes_dims=(16, 56, 56),
    )


def transformer_qwenimage21() -> TransformerConfig:
    """The published Qwen-Image-2.1 shape (diffusers' defaults): 32 blocks of width 4096."""
    return TransformerConfig()


# ---- the joint sequence -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextRun:
    """A run of condition tokens in the joint sequence."""

    start: int
    """First position in the joint sequence."""
    source: int
    """First index in the condition sequence."""
    length: int
    """Number of tokens."""


@dataclass(frozen=True, slots=True)
class ImageBlock:
    """The tokens of one image (an input image or the target) in the joint sequence."""

    start: int
    """First position in the joint sequence (tokens are in raster order, rows first)."""
    height: int
    """Rows of tokens."""
    width: int
    """Columns of tokens."""

    @property
    def length(self) -> int:
        return self.height * self.width


@dataclass(frozen=True, slots=True)
class SequenceLayout:
    """Where every token of the joint sequence comes from; shared by every sample of a batch."""

    length: int
    """L: tokens in the joint sequence."""
    prefix_length: int
    """P: tokens before the target image (condition and input images); T = L - P."""
    segments: tuple[TextRun | ImageBlock, ...]
    """Text runs and image blocks in sequence order; the target image is the last block."""
    source_index: Tensor
    """(L,) long: index of each token in ``cat([condition, image tokens in block order])``."""
    block_id: Tensor
    """(L,) long: -1 for condition tokens, else the image's index (inputs first, target last)."""


def build_layout(
    condition_length: int,
    image_sizes: Sequence[tuple[int, int]],
    image_slots: Tensor | None = None,
    tokens_per_image_slot: int = 4,
) -> SequenceLayout:
    """Lay out the joint sequence.

    ``image_sizes`` are the (rows, columns) of tokens of every image, input images first and
    the target last. With ``image_slots`` ((Lc,) bool), the input images' tokens replace the
    marked condition positions in order, each slot expanding to ``tokens_per_image_slot``
    tokens; an image's tokens must lie within one run of slots (no image straddles text).
    Without it, the input images follow the condition. The target always comes last.
    """
    if not image_sizes:
        raise ValueError("image_sizes needs at least the target image")
    inputs, target = list(image_sizes[:-1]), image_sizes[-1]
    segments: list[TextRun | ImageBlock] = []
    position = 0
    if image_slots is None:
        if condition_length:
            segments.append(TextRun(start=0, source=0, length=condition_length))
        position = condition_length
        for height, width in inputs:
            segments.append(ImageBlock(start=position, height=height, width=width))
            position += height * width
    else:
        if image_slots.shape != (condition_length,):
            raise ValueError(
                f"image_slots must have shape ({condition_length},) like the condition, "
                f"got {tuple(image_slots.shape)}"
            )
        is_slot = [bool(v) for v in image_slots.tolist()]
        pending = list(inputs)  # input images not placed yet
        index = 0
        while index < condition_length:
            end = index
            while end < condition_length and is_slot[end] == is_slot[index]:
                end += 1
            if not is_slot[index]:
                segments.append(TextRun(start=position, source=index, length=end - index))
                position += end - index
            else:
                room = (end - index) * tokens_per_image_slot
                while room > 0:
                    if not pending:
                        raise ValueError(
                            "image_slots reserve more tokens than the input images have: "
                            f"{sum(image_slots.tolist()) * tokens_per_image_slot} slot tokens for "
                            f"{sum(h * w for h, w in inputs)} image tokens"
                        )
                    height, width = pending.pop(0)
                    if height * width > room:
                        raise ValueError(
                            f"input image {len(inputs) - len(pending) - 1} ({height}x{width} "
                            f"tokens) does not fit the {room} slot tokens left in its run of "
                            "image_slots; an image's tokens must be contiguous"
                        )
                    segments.append(ImageBlock(start=position, height=height, width=width))
                    position += height * width
                    room -= height * width
            index = end
        if pending:
            raise ValueError(
                f"image_slots reserve {sum(is_slot) * tokens_per_image_slot} tokens, "
                f"fewer than the input images' {sum(h * w for h, w in inputs)}"
            )
    prefix_length = position
    segments.append(ImageBlock(start=position, height=target[0], width=target[1]))
    length = position + target[0] * target[1]

    sources: list[Tensor] = []
    block_ids: list[Tensor] = []
    image_offset = condition_length  # image tokens follow the condition in the source tensor
    image_index = 0
    for segment in segments:
        if isinstance(segment, TextRun):
            sources.append(torch.arange(segment.source, segment.source + segment.length))
            block_ids.append(torch.full((segment.length,), -1, dtype=torch.long))
        else:
            sources.append(torch.arange(image_offset, image_offset + segment.length))
            block_ids.append(torch.full((segment.length,), image_index, dtype=torch.long))
            image_offset += segment.length
            image_index += 1
    return SequenceLayout(
        length=length,
        prefix_length=prefix_length,
        segments=tuple(segments),
        source_index=torch.cat(sources),
        block_id=torch.cat(block_ids),
    )


def position_ids(
    layout: SequenceLayout, condition_mask: Tensor | None, device: torch.device | None = None
) -> Tensor:
    """MSRoPE positions (frame, height, width) of every token: (B, L, 3) long, B = 1 without mask.

    Valid condition tokens advance one shared position on all three axes (the diagonal);
    padded ones (``condition_mask`` False) take the next valid token's position and advance
    nothing. An image of h x w tokens sits at frame = the current position, with heights
    ``-(h - h // 2) .. h // 2 - 1`` and widths likewise, and advances the position by max(h, w).
    """
    batch = 1 if condition_mask is None else condition_mask.shape[0]
    device = device if device is not None else layout.source_index.device
    positions = torch.empty(batch, layout.length, 3, dtype=torch.long, device=device)
    base = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1)
    for segment in layout.segments:
        span = slice(segment.start, segment.start + segment.length)
        if isinstance(segment, TextRun):
            if condition_mask is None:
                valid = torch.ones(batch, segment.length, dtype=torch.long, device=device)
            else:
                window = slice(segment.source, segment.source + segment.length)
                valid = condition_mask[:, window].to(device=device, dtype=torch.long)  # (B, n)
            steps = torch.cumsum(valid, dim=1) - valid  # valid tokens before each one
            positions[:, span, :] = (base + steps).unsqueeze(-1)
            base = base + valid.sum(dim=1, keepdim=True)
        else:
            rows = torch.arange(segment.height, device=device) - (
                segment.height - segment.height // 2
            )
            cols = torch.arange(segment.width, device=device) - (segment.width - segment.width // 2)
            positions[:, span, 0] = base
            positions[:, span, 1] = rows.repeat_interleave(segment.width)
            positions[:, span, 2] = cols.repeat(segment.height)
            base = base + max(segment.height, segment.width)
    return positions


def rope_frequencies(positions: Tensor, axes_dims: tuple[int, int, int], theta: float) -> Tensor:
    """Rotary factors for (B, L, 3) positions: (B, L, 1, head_dim / 2) complex64 of modulus 1.

    Pair ``i`` of a head's channels (channels 2i, 2i + 1, read as a complex number) rotates by
    the angle ``position[axis] * theta ** (-2j / axis_dim)``: the first ``axes_dims[0] / 2``
    pairs follow the frame axis (j = 0, 1, ...), the next ones the height axis, the last ones
    the width axis.
    """
    angles = []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / torch.pow(
            theta, torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
        )
        angles.append(positions[..., axis, None].float() * inv_freq)  # (B, L, dim / 2)
    angle = torch.cat(angles, dim=-1).unsqueeze(2)  # (B, L, 1, head_dim / 2)
    return torch.polar(torch.ones_like(angle), angle)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate the channel pairs of x (B, L, H, Dh) by ``rope`` (B, L, 1, Dh / 2), in fp32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, L, H, Dh / 2)
    return torch.view_as_real(pairs * rope).flatten(-2).to(x.dtype)  # (B, L, H, Dh)


@dataclass(frozen=True, slots=True)
class QueryGroup:
    """Prefix queries ``[start, end)`` that attend to the keys ``[0, end)``."""

    start: int
    """First query position."""
    end: int
    """One past the last query position, and the number of keys."""
    mask: Tensor | None
    """(B | 1, 1, end - start, end) bool, True = may attend; None = every key in ``[0, end)``."""


@dataclass(frozen=True, slots=True)
class AttentionMasks:
    """How the queries of one forward attend; shared by every block.

    Block-causal: each text run or image of the prefix is one :class:`QueryGroup` (no prefix
    token sees anything after its own group), then the target's queries attend to all keys
    with ``keys``. Otherwise one attention over the whole sequence with ``keys``.
    """

    block_causal: bool
    """Whether ``groups`` and ``prefix_length`` apply."""
    groups: tuple[QueryGroup, ...]
    """The prefix's query groups, in order, covering ``[0, prefix_length)``."""
    prefix_length: int
    """P: where the target's queries start."""
    keys: Tensor | None
    """(B, 1, 1, L) bool: valid keys for the target's queries (for all, if not block-causal)."""


def attention_masks(
    layout: SequenceLayout,
    key_valid: Tensor | None,
    *,
    block_causal: bool,
    device: torch.device | None = None,
) -> AttentionMasks:
    """Masks for ``key_valid`` (B, L) bool (None: every token valid), on ``device``.

    Block-causal: a text token attends to every key up to itself, an image token to every key
    up to the end of its image (so to all of its image); the target attends to every key.
    Invalid keys are seen by nobody but themselves (so no query row is empty).
    """
    keys = None if key_valid is None else key_valid[:, None, None, :]
    if not block_causal:
        return AttentionMasks(block_causal=False, groups=(), prefix_length=0, keys=keys)
    if device is None:
        device = key_valid.device if key_valid is not None else layout.block_id.device
    groups = []
    for segment in layout.segments[:-1]:  # the last segment is the target
        start, end = segment.start, segment.start + segment.length
        valid = None if key_valid is None else key_valid[:, None, None, :end]  # (B, 1, 1, end)
        if isinstance(segment, ImageBlock):
            groups.append(QueryGroup(start=start, end=end, mask=valid))
            continue
        query = torch.arange(start, end, device=device)[:, None]  # (n, 1)
        key = torch.arange(end, device=device)[None, :]  # (1, end)
        causal = (key <= query)[None, None]  # (1, 1, n, end)
        mask = causal if valid is None else (causal & valid) | (key == query)
        groups.append(QueryGroup(start=start, end=end, mask=mask))
    return AttentionMasks(
        block_causal=True, groups=tuple(groups), prefix_length=layout.prefix_length, keys=keys
    )


def to_tokens(latents: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p) tokens, raster order, features (C, p, p)."""
    b, c, h, w = latents.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not a multiple of patch_size={p}")
    if p == 1:
        return latents.flatten(2).transpose(1, 2)
    x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B,h,w,C,p,p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def from_tokens(tokens: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """(B, h * w, C * p * p) -> (B, C, h * p, w * p); the inverse of :func:`to_tokens`."""
    b, _, features = tokens.shape
    p = patch_size
    c = features // (p * p)
    if p == 1:
        return tokens.transpose(1, 2).reshape(b, c, height, width)
    x = tokens.reshape(b, height, width, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B,C,h,p,w,p)
    return x.reshape(b, c, height * p, width * p)


# ---- modules ----------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """t in [0, 1] (B,) -> (B, D): sinusoids of ``scale * t`` (cos half first), then an MLP.

    The sinusoids are computed in float32 whatever the model's dtype: in bf16 the angles
    (up to ``scale`` = 1000 rad) would be off by more than a radian.
    """

    def __init__(self, features: int, hidden_size: int, scale: float) -> None:
        super().__init__()
        self.features = features
        self.scale = scale
        self.fc1 = nn.Linear(features, hidden_size, bias=False)
        self.fc2 = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, timestep: Tensor) -> Tensor:
        half = self.features // 2
        # Not a buffer: ``model.to(torch.bfloat16)`` would round the frequencies.
        steps = torch.arange(half, dtype=torch.float32, device=timestep.device)
        frequencies = torch.exp(-math.log(10000.0) * steps / half)  # (F / 2,) float32
        args = (self.scale * timestep.float())[:, None] * frequencies[None]  # (B, F/2) float32
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, F) float32
        features = features.to(self.fc1.weight.dtype)
        embedding: Tensor = self.fc2(F.silu(self.fc1(features)))  # (B, D)
        return embedding


class ConditionProjection(nn.Module):
    """Condition hidden states (B, Lc, Dc) -> (B, Lc, D): RMS norm, Linear, GELU(tanh), Linear.

    The norm's weight is stored zero-centred (the scale is ``1 + weight``), computed in fp32.
    """

    def __init__(self, condition_dim: int, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.zeros(condition_dim))
        self.fc1 = nn.Linear(condition_dim, hidden_size, bias=False)
        self.fc2 = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, condition: Tensor) -> Tensor:
        scale = self.norm_weight.float() + 1
        normed = F.rms_norm(condition.float(), (condition.shape[-1],), scale, self.eps)
        normed = normed.to(self.fc1.weight.dtype)
        projected: Tensor = self.fc2(F.gelu(self.fc1(normed), approximate="tanh"))
        return projected


class Attention(nn.Module):
    """Multi-head self-attention with RMS-normed queries and keys and MSRoPE.

    q/k/v and the output projection are separate bias-free ``nn.Linear`` modules, so tensor
    parallelism can split them column- and row-wise; heads are counted from the projection
    width, so a shard with fewer heads works unchanged.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.eps = eps
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)
        self.q_norm = nn.Parameter(torch.ones(head_dim))
        self.k_norm = nn.Parameter(torch.ones(head_dim))

    def forward(self, x: Tensor, rope: Tensor, masks: AttentionMasks) -> Tensor:
        # x: (B, L, D); rope: (B | 1, L, 1, Dh / 2) complex
        dh = self.head_dim
        q = self.q_proj(x).unflatten(-1, (-1, dh))  # (B, L, H, Dh)
        k = self.k_proj(x).unflatten(-1, (-1, dh))
        v = self.v_proj(x).unflatten(-1, (-1, dh))
        # The weight in the activations' dtype: under autocast (bf16 activations, fp32
        # weights) a mixed call falls back from the fused kernel.
        q = F.rms_norm(q, (dh,), self.q_norm.to(q.dtype), self.eps)
        k = F.rms_norm(k, (dh,), self.k_norm.to(k.dtype), self.eps)
        q = apply_rope(q, rope).transpose(1, 2)  # (B, H, L, Dh)
        k = apply_rope(k, rope).transpose(1, 2)
        v = v.transpose(1, 2)
        if masks.block_causal:
            parts = [
                F.scaled_dot_product_attention(
                    q[:, :, g.start : g.end], k[:, :, : g.end], v[:, :, : g.end], attn_mask=g.mask
                )  # (B, H, end - start, Dh)
                for g in masks.groups
            ]
            p = masks.prefix_length
            parts.append(F.scaled_dot_product_attention(q[:, :, p:], k, v, attn_mask=masks.keys))
            out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # (B, H, L, Dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks.keys)
        projected: Tensor = self.out_proj(out.transpose(1, 2).flatten(2))  # (B, L, D)
        return projected


class SwiGLU(nn.Module):
    """(B, L, D) -> (B, L, D): ``down(silu(gate(x)) * up(x))``, hidden width ``mlp_ratio * D``."""

    def __init__(self, hidden_size: int, mlp_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, mlp_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, mlp_size, bias=False)
        self.down_proj = nn.Linear(mlp_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


@dataclass(frozen=True, slots=True)
class Modulation:
    """Per-token modulation shared by every block; each (B, L | 1, D)."""

    attn_scale: Tensor
    """``1 + scale`` applied to the normed input of attention."""
    attn_gate: Tensor
    """``tanh(gate)`` applied to the attention output."""
    mlp_scale: Tensor
    """``1 + scale`` applied to the normed input of the MLP."""
    mlp_gate: Tensor
    """``tanh(gate)`` applied to the MLP output."""


class TransformerBlock(nn.Module):
    """``x += tanh(g1) * attn(LN(x) * (1 + s1)); x += tanh(g2) * mlp(LN(x) * (1 + s2))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.eps = config.eps
        d = config.hidden_size
        self.attn = Attention(d, config.num_heads, config.head_dim, config.eps)
        self.mlp = SwiGLU(d, config.mlp_ratio * d)

    def forward(
        self, x: Tensor, modulation: Modulation, rope: Tensor, masks: AttentionMasks
    ) -> Tensor:
        # x: (B, L, D)
        shape = (x.shape[-1],)
        h = F.layer_norm(x, shape, eps=self.eps) * modulation.attn_scale
        x = torch.addcmul(x, modulation.attn_gate, self.attn(h, rope, masks))
        h = F.layer_norm(x, shape, eps=self.eps) * modulation.mlp_scale
        x = torch.addcmul(x, modulation.mlp_gate, self.mlp(h))
        if x.dtype == torch.float16:
            x = x.clamp(-65504, 65504)
        return x


class DiffusionTransformer(nn.Module):
    """Predicts the flow velocity of the target latents from the condition and input images."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        token_features = config.latent_channels * config.patch_size**2
        self.latent_in = nn.Linear(token_features, d, bias=False)
        self.condition_in = ConditionProjection(config.condition_dim, d, config.eps)
        self.time_embed = TimestepEmbedding(config.timestep_features, d, config.timestep_scale)
        # silu(temb) -> [attn scale, attn gate, mlp scale, mlp gate], shared by every block.
        self.modulation = nn.Linear(d, 4 * d, bias=False)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        # silu(temb) -> the scale of the final layer norm.
        self.final_modulation = nn.Linear(d, d, bias=False)
        self.latent_out = nn.Linear(d, token_features, bias=False)
        # Recompute each block's activations in the backward pass (saves memory in training).
        self.gradient_checkpointing = False

    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        condition: Tensor,
        condition_mask: Tensor | None = None,
        *,
        input_latents: Sequence[Tensor] = (),
        image_slots: Tensor | None = None,
    ) -> Tensor:
        """The velocity for the noisy target ``latents``.

        Args:
            latents: (B, C, H, W) noisy target latents (H, W multiples of ``patch_size``).
            timestep: (B,) flow time in [0, 1] (1 = pure noise), or a 0-d scalar for the batch.
            condition: (B, Lc, Dc) condition-encoder hidden states.
            condition_mask: (B, Lc) bool, True at valid condition tokens; None = all valid.
            input_latents: clean latents of the input images (editing), each (B, C, h_i, w_i),
                in the order they enter the sequence.
            image_slots: (Lc,) bool, True at condition positions reserved for input-image
                tokens (see :func:`build_layout`); None = input images follow the condition.

        Returns:
            (B, C, H, W) velocity, in the dtype of ``latents``.
        """
        config = self.config
        p = config.patch_size
        if latents.ndim != 4 or latents.shape[1] != config.latent_channels:
            raise ValueError(
                f"latents must be (B, C={config.latent_channels}, H, W), got {tuple(latents.shape)}"
            )
        batch, _, height, width = latents.shape
        if timestep.shape not in ((), (batch,)):
            raise ValueError(
                f"timestep must be (B={batch},) like the latents' batch (or a scalar), "
                f"got {tuple(timestep.shape)}"
            )
        if condition.ndim != 3 or condition.shape[0] != batch:
            raise ValueError(f"condition must be (B={batch}, Lc, Dc), got {tuple(condition.shape)}")
        if condition.shape[-1] != config.condition_dim:
            raise ValueError(
                f"condition has {condition.shape[-1]} channels, the model expects "
                f"condition_dim={config.condition_dim}"
            )
        if condition_mask is not None:
            if condition_mask.shape != condition.shape[:2]:
                raise ValueError(
                    f"condition_mask must be (B, Lc) = {tuple(condition.shape[:2])} like the "
                    f"condition, got {tuple(condition_mask.shape)}"
                )
            if condition_mask.dtype.is_floating_point or condition_mask.dtype.is_complex:
                raise ValueError(
                    f"condition_mask must be bool (True = valid token), got {condition_mask.dtype}"
                )
        for i, image in enumerate(input_latents):
            if image.ndim != 4 or image.shape[:2] != latents.shape[:2]:
                raise ValueError(
                    f"input_latents[{i}] must be (B={batch}, C={latents.shape[1]}, h, w), "
                    f"got {tuple(image.shape)}"
                )
        if image_slots is not None and not input_latents:
            raise ValueError("image_slots given without input_latents")
        dtype = self.latent_in.weight.dtype
        device = latents.device

        images = [*input_latents, latents]
        sizes = [(image.shape[2] // p, image.shape[3] // p) for image in images]
        layout = build_layout(condition.shape[1], sizes, image_slots, config.tokens_per_image_slot)
        source_index = layout.source_index.to(device)

        # The joint sequence: condition tokens and image tokens gathered into place.
        image_tokens = torch.cat([to_tokens(image.to(dtype), p) for image in images], dim=1)
        sources = torch.cat([self.condition_in(condition), self.latent_in(image_tokens)], dim=1)
        x = sources.index_select(1, source_index)  # (B, L, D)

        key_valid = None
        if condition_mask is not None and not bool(condition_mask.all()):
            image_valid = torch.ones(batch, image_tokens.shape[1], dtype=torch.bool, device=device)
            key_valid = torch.cat([condition_mask.to(device, torch.bool), image_valid], dim=1)
            key_valid = key_valid.index_select(1, source_index)  # (B, L)
        masks = attention_masks(layout, key_valid, block_causal=config.block_causal, device=device)
        positions = position_ids(layout, condition_mask, device)  # (B | 1, L, 3)
        rope = rope_frequencies(positions, config.rope_axes_dims, config.rope_theta)

        timestep = timestep.to(device=device, dtype=torch.float32).expand(batch)  # (B,)
        modulation, target_temb = self._modulation(timestep, layout)

        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, modulation, rope, masks, use_reentrant=False)
            else:
                x = block(x, modulation, rope, masks)

        # Only the target tokens are read out.
        target = x[:, layout.prefix_length :]  # (B, T, D)
        scale = 1 + self.final_modulation(F.silu(target_temb))  # (B, D)
        target = F.layer_norm(target, (target.shape[-1],), eps=config.eps) * scale[:, None]
        out = self.latent_out(target)  # (B, T, C p p)
        return from_tokens(out, height // p, width // p, p).to(latents.dtype)

    def _modulation(self, timestep: Tensor, layout: SequenceLayout) -> tuple[Modulation, Tensor]:
        """Per-token modulation for the blocks, and the target's timestep embedding (B, D)."""
        batch = timestep.shape[0]
        if self.config.causal_condition:
            timestep = torch.cat([timestep, timestep.new_zeros(1)])  # (B + 1,): last row is t = 0
        temb = self.time_embed(timestep)  # (B | B + 1, D)
        params = self.modulation(F.silu(temb))  # (B | B + 1, 4 D)
        attn_scale, attn_gate, mlp_scale, mlp_gate = params.chunk(4, dim=-1)
        rows = (1 + attn_scale, attn_gate.tanh(), 1 + mlp_scale, mlp_gate.tanh())

        def per_token(row: Tensor) -> Tensor:
            if not self.config.causal_condition:
                return row[:, None]  # (B, 1, D)
            d = row.shape[-1]
            prefix = row[batch:, None].expand(batch, layout.prefix_length, d)  # t = 0
            target = row[:batch, None].expand(batch, layout.length - layout.prefix_length, d)
            return torch.cat([prefix, target], dim=1)  # (B, L, D)

        modulation = Modulation(
            attn_scale=per_token(rows[0]),
            attn_gate=per_token(rows[1]),
            mlp_scale=per_token(rows[2]),
            mlp_gate=per_token(rows[3]),
        )
        return modulation, temb[:batch]

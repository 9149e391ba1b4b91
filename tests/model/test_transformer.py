"""DiffusionTransformer: shapes, masks, MSRoPE positions, gradients, determinism, save/load."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from model.transformer import (
    AttentionMasks,
    DiffusionTransformer,
    ImageBlock,
    TextRun,
    TransformerConfig,
    attention_masks,
    build_layout,
    from_tokens,
    position_ids,
    to_tokens,
    transformer_1b,
    transformer_debug,
    transformer_small,
)


def _config(**overrides: Any) -> TransformerConfig:
    config = TransformerConfig(
        latent_channels=8,
        condition_dim=12,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        rope_axes_dims=(4, 6, 6),
    )
    return dataclasses.replace(config, **overrides)


def _model(config: TransformerConfig | None = None, seed: int = 0) -> DiffusionTransformer:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        model = DiffusionTransformer(config or _config())
    # Norm weights away from their neutral value, so every parameter shapes the output.
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _inputs(
    batch: int = 2, condition_length: int = 6, size: tuple[int, int] = (4, 6), seed: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 8, *size, generator=generator)
    timestep = torch.rand(batch, generator=generator)
    condition = torch.randn(batch, condition_length, 12, generator=generator)
    return latents, timestep, condition


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


# ---- shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("editing", [False, True], ids=["text-to-image", "editing"])
def test_output_has_the_shape_and_dtype_of_the_latents(patch_size: int, editing: bool) -> None:
    model = _model(_config(patch_size=patch_size))
    latents, timestep, condition = _inputs(size=(4, 8))
    inputs = [_randn(2, 8, 6, 4, seed=2), _randn(2, 8, 2, 2, seed=3)] if editing else []
    with torch.no_grad():
        out = model(latents.double(), timestep, condition, input_latents=inputs)
    assert out.shape == (2, 8, 4, 8)
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all()


def test_forward_creates_its_tensors_on_the_model_device() -> None:
    """Run on the meta device: any helper tensor left on the CPU (masks, positions) fails."""
    with torch.device("meta"):
        model = DiffusionTransformer(_config())
    meta = torch.device("meta")
    latents = torch.empty(2, 8, 4, 6, device=meta)
    condition = torch.empty(2, 6, 12, device=meta)
    image = torch.empty(2, 8, 2, 2, device=meta)
    slots = torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.bool)  # on the CPU: only read as a list
    for config in (_config(), _config(block_causal=False, causal_condition=False)):
        model.config = config
        out = model(latents, torch.empty(2, device=meta), condition, input_latents=[image])
        assert out.device == meta
        assert out.shape == (2, 8, 4, 6)
        out = model(
            latents,
            torch.empty(2, device=meta),
            condition,
            input_latents=[image],
            image_slots=slots,
        )
        assert out.shape == (2, 8, 4, 6)


def test_to_tokens_round_trips_and_orders_features_channel_first() -> None:
    latents = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = to_tokens(latents, 2)
    assert tokens.shape == (2, 2 * 3, 3 * 4)
    # Token (row 0, col 1) holds channel 0's 2 x 2 patch first: pixels (0,2), (0,3), (1,2), (1,3).
    assert tokens[0, 1, :4].tolist() == [2.0, 3.0, 8.0, 9.0]
    assert torch.equal(from_tokens(tokens, 2, 3, 2), latents)
    assert torch.equal(from_tokens(to_tokens(latents, 1), 4, 6, 1), latents)


def test_recipes_are_valid_and_sized_as_named() -> None:
    for recipe in (transformer_debug, transformer_small, transformer_1b):
        recipe().validate()
    with torch.device("meta"):
        big = DiffusionTransformer(transformer_1b())
    parameters = sum(p.numel() for p in big.parameters())
    assert 0.9e9 < parameters < 1.1e9


def test_invalid_inputs_are_refused_with_a_reason() -> None:
    model = _model()
    latents, timestep, condition = _inputs()
    with pytest.raises(ValueError, match="condition_dim=12"):
        model(latents, timestep, _randn(2, 6, 5, seed=2))
    with pytest.raises(ValueError, match="condition_mask"):
        model(latents, timestep, condition, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="slot tokens"):  # 1 slot = 4 tokens < 8 image tokens
        model(
            latents,
            timestep,
            condition,
            input_latents=[_randn(2, 8, 2, 4, seed=2)],
            image_slots=torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="sum to"):
        DiffusionTransformer(_config(rope_axes_dims=(4, 4, 4)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            {"timestep": torch.rand(3)}, r"timestep must be \(B=2,\)", id="timestep-batch"
        ),
        pytest.param({"timestep": torch.rand(2, 1)}, r"timestep must be", id="timestep-2d"),
        pytest.param({"latents": torch.zeros(2, 5, 4, 6)}, r"latents must be", id="channels"),
        pytest.param({"latents": torch.zeros(8, 4, 6)}, r"latents must be", id="latents-3d"),
        pytest.param({"condition": torch.zeros(3, 6, 12)}, r"condition must be", id="cond-batch"),
        pytest.param({"mask": torch.ones(3, 6, dtype=torch.bool)}, "condition_mask", id="mask"),
        pytest.param({"mask": torch.ones(2, 6)}, "must be bool", id="float-mask"),
    ],
)
def test_inconsistent_input_shapes_raise_value_errors(
    change: dict[str, Tensor], message: str
) -> None:
    model = _model()
    latents, timestep, condition = _inputs()
    kwargs = {"latents": latents, "timestep": timestep, "condition": condition, "mask": None}
    kwargs.update(change)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(kwargs["latents"], kwargs["timestep"], kwargs["condition"], kwargs["mask"])


def test_scalar_timestep_is_shared_by_the_batch() -> None:
    model = _model()
    latents, _, condition = _inputs()
    with torch.no_grad():
        shared = model(latents, torch.tensor(0.3), condition)
        assert torch.equal(shared, model(latents, torch.full((2,), 0.3), condition))


def _relative_error(got: Tensor, expected: Tensor) -> Tensor:
    """Per-sample relative L2 error: (B,)."""
    error: Tensor = (got.float() - expected).flatten(1).norm(dim=1)
    scale: Tensor = expected.flatten(1).norm(dim=1)
    return error / scale


def test_bfloat16_model_keeps_the_timestep_embedding_accurate() -> None:
    """The sinusoids stay fp32 in a bf16 model (bf16 angles near 1000 rad are off by radians)."""
    model = _model()
    half = copy.deepcopy(model).to(torch.bfloat16)
    timestep = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    latents, _, condition = _inputs(batch=5)
    with torch.no_grad():
        embedding_error = _relative_error(half.time_embed(timestep), model.time_embed(timestep))
        expected = model(latents, timestep, condition)
        got = half(latents.bfloat16(), timestep, condition.bfloat16())
    assert got.dtype == torch.bfloat16
    assert embedding_error.max() < 0.02, embedding_error.tolist()
    assert _relative_error(got, expected).max() < 0.03


# ---- masks ------------------------------------------------------------------------------


def test_padded_condition_tokens_change_nothing() -> None:
    """Content of padded tokens is never seen, and a padded sample equals the sample alone."""
    model = _model()
    latents, timestep, condition = _inputs(batch=3, condition_length=8)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False  # right padding
    mask[2, :3] = False  # left padding: the first query row has no valid key but itself
    with torch.no_grad():
        out = model(latents, timestep, condition, mask)
        scrambled = condition.clone()
        scrambled[~mask] = 100 * _randn(int((~mask).sum()), 12, seed=2)
        assert _max_diff(model(latents, timestep, scrambled, mask), out) < 1e-6
        for i in range(3):
            alone = model(latents[i : i + 1], timestep[i : i + 1], condition[i : i + 1, mask[i]])
            assert _max_diff(out[i : i + 1], alone) < 1e-5
    assert torch.isfinite(out).all()
    # The mask matters: unmasked, the padded tokens change the prediction.
    with torch.no_grad():
        assert _max_diff(model(latents, timestep, condition), out) > 1e-3


def test_padded_editing_batch_equals_each_sample_alone() -> None:
    model = _model()
    latents, timestep, condition = _inputs(batch=2, condition_length=9)
    image = _randn(2, 8, 2, 4, seed=2)  # 8 tokens = 2 slots
    slots = torch.tensor([0, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        out = model(latents, timestep, condition, mask, input_latents=[image], image_slots=slots)
        alone = model(
            latents[1:],
            timestep[1:],
            condition[1:, :5],
            input_latents=[image[1:]],
            image_slots=slots[:5],
        )
    assert _max_diff(out[1:], alone) < 1e-5


def _allowed(masks: AttentionMasks, length: int) -> Tensor:
    """The dense (L, L) may-attend matrix of sample 0 that the query groups describe."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for group in masks.groups:
        rows = slice(group.start, group.end)
        allowed[rows, : group.end] = True if group.mask is None else group.mask[0, 0]
    target = slice(masks.prefix_length, length)
    allowed[target] = True if masks.keys is None else masks.keys[0, 0]
    return allowed


def test_block_causal_mask_structure() -> None:
    # text(2) | image 0: 2x1 | text(2) | target 1x2
    layout = build_layout(5, [(2, 1), (1, 2)], torch.tensor([0, 0, 1, 0, 0], dtype=torch.bool), 2)
    assert layout.prefix_length == 6
    assert layout.block_id.tolist() == [-1, -1, 0, 0, -1, -1, 1, 1]
    key_valid = torch.ones(1, 8, dtype=torch.bool)
    key_valid[0, 5] = False  # the last text token is padding
    masks = attention_masks(layout, key_valid, block_causal=True)
    assert [(g.start, g.end) for g in masks.groups] == [(0, 2), (2, 4), (4, 6)]
    assert _allowed(masks, 8).int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],  # text: causal
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # image: everything before it and all of itself
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],  # the padded token sees itself (no empty row)
        [1, 1, 1, 1, 1, 0, 1, 1],  # target: every valid key
        [1, 1, 1, 1, 1, 0, 1, 1],
    ]
    # Without padding, images and the target need no mask at all.
    unpadded = attention_masks(layout, None, block_causal=True)
    assert [g.mask is None for g in unpadded.groups] == [False, True, False]
    assert unpadded.keys is None

    full = attention_masks(layout, key_valid, block_causal=False)
    assert not full.block_causal
    assert full.groups == ()


def test_attention_follows_the_block_causal_mask() -> None:
    """Perturbing one token changes the hidden states exactly where the mask lets it reach."""
    model = _model(_config(num_layers=1))
    latents, timestep, condition = _inputs(batch=1, condition_length=7)
    image = _randn(1, 8, 2, 2, seed=2)  # 4 tokens = one slot
    slots = torch.tensor([0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)  # text 2 | image 4 | text 4
    captured: list[Tensor] = []

    def keep(module: nn.Module, args: object, output: Tensor) -> None:
        captured.append(output[0].abs().sum(-1))  # (L,)

    handle = model.blocks[0].register_forward_hook(keep)
    with torch.no_grad():
        model(latents, timestep, condition, input_latents=[image], image_slots=slots)
        changed_text = condition.clone()
        changed_text[0, 4] += 1  # joint position 2 + 4 + 1 = 7
        model(latents, timestep, changed_text, input_latents=[image], image_slots=slots)
        changed_image = image.clone()
        changed_image[0, :, 1, 1] += 1  # the image's last token, joint position 5
        model(latents, timestep, condition, input_latents=[changed_image], image_slots=slots)
    handle.remove()
    text_moved = (captured[1] - captured[0]).abs() > 1e-6
    image_moved = (captured[2] - captured[0]).abs() > 1e-6
    length = 10 + 4 * 6  # prefix + target tokens
    # Later text and the target see the changed text token; earlier tokens do not.
    assert text_moved.nonzero().flatten().tolist() == list(range(7, length))
    # The whole image sees its own last token; the text before it does not.
    assert image_moved.nonzero().flatten().tolist() == list(range(2, length))


def test_bidirectional_option_lets_the_condition_see_the_target() -> None:
    causal = _model(_config(block_causal=True))
    bidirectional = _model(_config(block_causal=False))
    latents, timestep, condition = _inputs()
    with torch.no_grad():
        a = causal(latents, timestep, condition)
        b = bidirectional(latents, timestep, condition)
    # Same weights; only the mask differs (fp32 noise is ~1e-7).
    assert _max_diff(a, b) > 1e-4


def test_prefix_does_not_depend_on_timestep_or_target() -> None:
    """causal_condition + block-causal: the prefix's activations are the same at every step."""
    model = _model()
    latents, timestep, condition = _inputs()
    image = _randn(2, 8, 2, 2, seed=2)
    captured: list[Tensor] = []

    def keep(module: nn.Module, args: object, output: Tensor) -> None:
        captured.append(output)

    handle = model.blocks[-1].register_forward_hook(keep)
    with torch.no_grad():
        first = model(latents, timestep, condition, input_latents=[image])
        second = model(
            _randn(*latents.shape, seed=3), 1 - timestep, condition, input_latents=[image]
        )
    handle.remove()
    prefix = 6 + 4
    assert _max_diff(captured[0][:, :prefix], captured[1][:, :prefix]) == 0.0
    assert _max_diff(first, second) > 1e-3

    shared = _model(_config(causal_condition=False))
    captured.clear()
    handle = shared.blocks[-1].register_forward_hook(keep)
    with torch.no_grad():
        shared(latents, timestep, condition, input_latents=[image])
        shared(latents, 1 - timestep, condition, input_latents=[image])
    handle.remove()
    assert _max_diff(captured[0][:, :prefix], captured[1][:, :prefix]) > 1e-4


# ---- positions --------------------------------------------------------------------------


def test_text_to_image_positions_text_on_the_diagonal() -> None:
    layout = build_layout(5, [(2, 3)])
    positions = position_ids(layout, None)[0]  # (L, 3)
    assert positions.shape == (11, 3)
    for i in range(5):
        assert positions[i].tolist() == [i, i, i]
    target = positions[5:]
    assert (target[:, 0] == 5).all()  # one frame after the text
    assert target[:, 1].tolist() == [-1, -1, -1, 0, 0, 0]  # rows centred on zero
    assert target[:, 2].tolist() == [-2, -1, 0, -2, -1, 0]  # columns centred on zero


def test_editing_positions_one_frame_per_image() -> None:
    # text(4) | input 2x2 | input 3x1 | target 2x2: images follow the condition
    layout = build_layout(4, [(2, 2), (3, 1), (2, 2)])
    assert [type(s) for s in layout.segments] == [TextRun, ImageBlock, ImageBlock, ImageBlock]
    positions = position_ids(layout, None)[0]
    frames = positions[:, 0].tolist()
    # text 0..3, image 1 at frame 4 (advances 2), image 2 at frame 6 (advances 3), target at 9
    assert frames == [0, 1, 2, 3] + [4] * 4 + [6] * 3 + [9] * 4

    # text(2) | input 2x2 in one slot of 4 tokens | text(1) | target 2x2
    slots = torch.tensor([0, 0, 1, 0], dtype=torch.bool)
    layout = build_layout(4, [(2, 2), (2, 2)], slots)
    assert layout.prefix_length == 2 + 4 + 1
    positions = position_ids(layout, None)[0]
    assert positions[:, 0].tolist() == [0, 1] + [2] * 4 + [4] + [5] * 4
    assert positions[6].tolist() == [4, 4, 4]  # text after the image continues the diagonal


def test_padding_advances_no_position() -> None:
    layout = build_layout(5, [(1, 1)])
    mask = torch.tensor([[True, True, True, True, True], [True, True, False, False, False]])
    positions = position_ids(layout, mask)
    assert positions.shape == (2, 6, 3)
    assert positions[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert positions[1, :2, 0].tolist() == [0, 1]
    assert positions[1, 5].tolist() == [2, -1, -1]  # the target follows the valid text


# ---- training -----------------------------------------------------------------------------


def test_gradients_reach_every_parameter() -> None:
    model = _model().train()
    latents, timestep, condition = _inputs()
    condition.requires_grad_(True)
    image = _randn(2, 8, 2, 2, seed=2).requires_grad_(True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    out = model(latents, timestep, condition, mask, input_latents=[image])
    out.square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, name
    assert condition.grad is not None
    assert image.grad is not None
    assert condition.grad[0].abs().max() > 0
    assert condition.grad[1, 4:].abs().max() == 0  # padded tokens get no gradient
    assert image.grad.abs().max() > 0


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    latents, timestep, condition = _inputs()
    grads = []
    for checkpointing in (False, True):
        model = _model().train()
        model.gradient_checkpointing = checkpointing
        model(latents, timestep, condition).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_seeded_construction_and_forward_are_deterministic() -> None:
    latents, timestep, condition = _inputs()
    a, b, c = _model(seed=5), _model(seed=5), _model(seed=6)
    with torch.no_grad():
        out_a = a(latents, timestep, condition)
        assert torch.equal(out_a, b(latents, timestep, condition))
        assert torch.equal(out_a, a(latents, timestep, condition))
        assert not torch.equal(out_a, c(latents, timestep, condition))


def test_safetensors_round_trip(tmp_path: Path) -> None:
    model = _model(seed=7)
    path = tmp_path / "transformer.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = DiffusionTransformer(_config())
    loaded.load_state_dict(load_file(str(path)), strict=True)
    latents, timestep, condition = _inputs()
    with torch.no_grad():
        assert torch.equal(
            model(latents, timestep, condition), loaded.eval()(latents, timestep, condition)
        )

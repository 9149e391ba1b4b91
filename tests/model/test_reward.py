"""Reward models: open_clip alignment, quality head, text-rendering rules, weighted sum."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from model.reward import (
    DEFAULT_CATEGORY,
    AlignmentReward,
    AlignmentRewardConfig,
    ClipTowersConfig,
    MultiReward,
    MultiRewardConfig,
    QualityHead,
    QualityReward,
    RewardFn,
    RewardWeightsError,
    TextRenderingConfig,
    TextRenderingReward,
    alignment_reward_debug,
    alignment_reward_default,
    build_alignment_reward,
    combine_rewards,
    extract_quoted_text,
    levenshtein,
    multi_reward_default,
    normalize_text,
    normalized_edit_distance,
    quality_head_debug,
    rank_batches,
    ranks_from_scores,
    score_text_rendering,
    substring_edit_distance,
    validate_weights,
)
from model.torchvision_compat import import_open_clip

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
COLOURS["yellow"] = (1.0, 1.0, 0.0)


def _solid_images(height: int = 40, width: int = 48) -> Tensor:
    """One solid-colour image per entry of COLOURS, (4, 3, H, W) in [0, 1]."""
    rgb = torch.tensor(list(COLOURS.values()))  # (4, 3)
    return rgb.view(4, 3, 1, 1).expand(4, 3, height, width).contiguous()


def _debug_reward(seed: int = 0, scale: float = 1.0) -> AlignmentReward:
    torch.manual_seed(seed)
    config = alignment_reward_debug()
    config.scale = scale
    return build_alignment_reward(config)


def _debug_towers() -> ClipTowersConfig:
    architecture = alignment_reward_debug().architecture
    assert isinstance(architecture, ClipTowersConfig)
    return architecture


# --------------------------------------------------------------------------------------
# open_clip import and the custom model
# --------------------------------------------------------------------------------------


def test_open_clip_imports_through_the_compat_function_twice() -> None:
    first = import_open_clip()
    second = import_open_clip()
    assert first is second
    assert callable(first.create_model)
    torchvision = importlib.import_module("torchvision")  # importable once the function ran
    assert hasattr(torch.ops.torchvision, "nms")
    assert torchvision.transforms is not None


def test_simple_tokenizer_ships_its_vocabulary() -> None:
    open_clip = import_open_clip()
    vocab = Path(str(open_clip.__file__)).parent / "bpe_simple_vocab_16e6.txt.gz"
    assert vocab.is_file()
    reward = _debug_reward()
    tokens = reward.tokenize(["red", "a sign that reads OPEN, and much more text than fits"])
    assert tokens.shape == (2, _debug_towers().context_length)
    assert tokens.dtype == torch.int64
    start, end = 49406, 49407
    assert tokens[0].tolist()[:3] == [start, 736, end]  # "red" is one BPE token
    assert tokens[1, 0] == start
    assert tokens[1, -1] == end  # truncated, end token kept


def test_custom_model_is_created_offline_with_its_config() -> None:
    open_clip = import_open_clip()
    reward = _debug_reward()
    towers = _debug_towers()
    assert isinstance(reward.clip, open_clip.CLIP)
    assert reward.image_size == (towers.image_size, towers.image_size)
    assert not reward.training
    embeddings = reward.encode_image(_solid_images())
    assert embeddings.shape == (4, towers.embed_dim)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(4))
    # The embedded default builds too (random init, nothing downloaded) and scores.
    default_config = alignment_reward_default()
    assert isinstance(default_config.architecture, ClipTowersConfig)
    assert default_config.checkpoint is None
    default = build_alignment_reward(default_config)
    with torch.no_grad():
        assert default.score(torch.rand(2, 3, 96, 80), ["a cat", "a dog"]).shape == (2,)


def test_alignment_shapes_and_range() -> None:
    scale = 2.5
    reward = _debug_reward(scale=scale)
    images = _solid_images(height=50, width=30)  # resized and centre-cropped to 32 x 32
    tokens = reward.tokenize(["red", "green", "a blue sky"])
    matrix = reward.similarity(images, tokens)
    assert matrix.shape == (4, 3)
    assert bool(((matrix >= -scale) & (matrix <= scale)).all())
    pairs = reward(images[:3], tokens)
    assert pairs.shape == (3,)
    torch.testing.assert_close(pairs, matrix[:3].diagonal())
    torch.testing.assert_close(reward.score(images[:3], ["red", "green", "a blue sky"]), pairs)
    with pytest.raises(ValueError, match="4 images but 3 texts"):
        reward(images, tokens)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        reward.encode_image(images[:, :1])


def test_contrastive_training_separates_matching_pairs() -> None:
    open_clip = import_open_clip()
    reward = _debug_reward(seed=0).train()
    images = _solid_images()
    tokens = reward.tokenize(list(COLOURS))
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.Adam(reward.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = loss_fn(
            reward.encode_image(images), reward.encode_text(tokens), reward.logit_scale.exp()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    reward.eval()
    with torch.no_grad():
        matrix = reward.similarity(images, tokens)  # (4 images, 4 words)
    matched = matrix.diagonal()
    mismatched = matrix.masked_fill(torch.eye(4, dtype=torch.bool), -math.inf)
    assert bool((matched > mismatched.max(dim=1).values).all())  # each image: its word
    assert bool((matched > mismatched.max(dim=0).values).all())  # each word: its image


# --------------------------------------------------------------------------------------
# Local checkpoints
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    trained = _debug_reward(seed=1)
    state = {k: v.contiguous() for k, v in trained.clip.state_dict().items()}
    path = tmp_path / f"reward{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)

    torch.manual_seed(2)  # a different random init, overwritten by the checkpoint
    config = dataclasses.replace(alignment_reward_debug(), checkpoint=path)
    loaded = build_alignment_reward(config)
    images, prompts = _solid_images(), list(COLOURS)
    with torch.no_grad():
        expected = trained.similarity(images, trained.tokenize(prompts))
        fresh = _debug_reward(seed=2).similarity(images, trained.tokenize(prompts))
        assert torch.equal(loaded.similarity(images, loaded.tokenize(prompts)), expected)
    assert not torch.equal(fresh, expected)


def test_open_clip_local_dir_round_trip(tmp_path: Path) -> None:
    trained = _debug_reward(seed=3)
    towers = _debug_towers()
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": towers.open_clip_model_cfg(), "preprocess_cfg": {}})
    )
    save_file(
        {k: v.contiguous() for k, v in trained.clip.state_dict().items()},
        tmp_path / "open_clip_model.safetensors",
    )
    torch.manual_seed(4)
    loaded = build_alignment_reward(
        AlignmentRewardConfig(architecture=f"local-dir:{tmp_path}", tokenizer="open_clip")
    )
    assert loaded.image_size == (towers.image_size, towers.image_size)
    images, prompts = _solid_images(), ["red", "a green field"]
    with torch.no_grad():
        assert torch.equal(loaded.tokenize(prompts), trained.tokenize(prompts))
        assert torch.equal(
            loaded.similarity(images, loaded.tokenize(prompts)),
            trained.similarity(images, trained.tokenize(prompts)),
        )


def test_non_local_or_inconsistent_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a file"):
        build_alignment_reward(
            dataclasses.replace(alignment_reward_debug(), checkpoint=tmp_path / "missing.pt")
        )
    with pytest.raises(ValueError, match="hub models are not loaded"):
        build_alignment_reward(AlignmentRewardConfig(architecture="hf-hub:org/model"))
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="brings its own weights"):
        build_alignment_reward(
            AlignmentRewardConfig(architecture=f"local-dir:{tmp_path}", checkpoint=weights)
        )
    with pytest.raises(ValueError, match="not a multiple"):
        ClipTowersConfig(image_size=30, patch_size=8).open_clip_model_cfg()


# --------------------------------------------------------------------------------------
# Quality head
# --------------------------------------------------------------------------------------


def test_quality_head_shape_and_gradients() -> None:
    head_config = quality_head_debug()
    head = QualityHead(head_config)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == 2
    assert head(torch.randn(5, head_config.embed_dim)).shape == (5,)

    quality = QualityReward(_debug_reward(), head)
    images = _solid_images().requires_grad_(True)
    scores = quality.score(images, list(COLOURS))
    assert scores.shape == (4,)
    torch.autograd.backward(scores.sum())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(not p.requires_grad for p in quality.encoder.parameters())  # frozen
    assert images.grad is not None
    assert images.grad.abs().sum() > 0  # reward backprop


# --------------------------------------------------------------------------------------
# Text-rendering constraints
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a sign that reads 'OPEN'", ["OPEN"]),
        ("a sign that reads 'OPEN' next to the cat's bowl", ["OPEN"]),
        ("the cat's toy and the dog's bone", []),
        ("a neon sign 'Joe's Diner' at night", ["Joe's Diner"]),
        ('a poster saying "SALE 50%" and a banner "Welcome home"', ["SALE 50%", "Welcome home"]),
        ("a mug with “Good morning” and ‘hi’", ["Good morning", "hi"]),  # noqa: RUF001
        ("招牌上写着「开业大吉」和『欢迎』", ["开业大吉", "欢迎"]),
        ("a book titled «Les Misérables»", ["Les Misérables"]),
        ('an empty quote "  " and no text', []),
        ("no quotes at all", []),
    ],
)
def test_extract_quoted_text(prompt: str, expected: list[str]) -> None:
    assert extract_quoted_text(prompt) == expected


def _edit_distance(a: str, b: str) -> int:
    """The textbook dynamic programme: what ``levenshtein`` must agree with."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            substitute = previous[j - 1] + (char_a != char_b)
            current.append(min(previous[j] + 1, current[j - 1] + 1, substitute))
        previous = current
    return previous[-1]


def test_levenshtein_counts_characters_not_bytes_and_agrees_with_the_definition() -> None:
    # Han text and characters outside the BMP are one edit each, as the evaluator reads them.
    assert levenshtein("营业中", "营业") == 1
    assert levenshtein("a\U0001f600b", "ab") == 1
    assert levenshtein("GRAND OPEN", "grand open") == 9  # case counts; the space matches
    rng = random.Random(0)
    alphabet = "ab营业\u00e9"
    for _ in range(300):
        a = "".join(rng.choices(alphabet, k=rng.randrange(9)))
        b = "".join(rng.choices(alphabet, k=rng.randrange(9)))
        assert levenshtein(a, b) == _edit_distance(a, b), (a, b)
        longest = max(len(a), len(b))
        expected = _edit_distance(a, b) / longest if longest else 0.0
        assert normalized_edit_distance(a, b) == pytest.approx(expected)


def test_edit_distances_on_known_strings() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("sitting", "kitten") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0
    assert normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert normalized_edit_distance("", "") == 0.0
    assert substring_edit_distance("OPEN", "WE ARE OPEN NOW") == 0
    assert substring_edit_distance("OPEN", "WE ARE 0PEN NOW") == 1
    assert substring_edit_distance("OPEN", "OPN") == 1
    assert substring_edit_distance("OPEN", "") == 4
    assert normalize_text("  Grand\n  OPENING ", case_sensitive=False) == "grand opening"
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in "OPEN")  # U+FF2F ...
    assert normalize_text(full_width, case_sensitive=True) == "OPEN"  # NFKC folds it


def test_text_rendering_scores_on_known_strings() -> None:
    config = TextRenderingConfig(exact_weight=0.5)
    # OCR splits the phrase into words and misreads nothing.
    found = score_text_rendering(["Grand Opening"], ["GRAND", "OPENING", "10am"], config)
    assert (found.exact, found.similarity, found.reward) == (1.0, 1.0, 1.0)
    # One wrong character out of four in one of two requested strings.
    partly = score_text_rendering(["OPEN", "SALE"], ["0PEN", "SALE"], config)
    assert [m.exact for m in partly.matches] == [False, True]
    assert partly.matches[0].edit_distance == pytest.approx(0.25)
    assert partly.exact == pytest.approx(0.5)
    assert partly.similarity == pytest.approx((0.75 + 1.0) / 2)
    assert partly.reward == pytest.approx(0.5 * 0.5 + 0.5 * 0.875)
    missing = score_text_rendering(["OPEN"], [], config)
    assert (missing.exact, missing.similarity, missing.reward) == (0.0, 0.0, 0.0)
    strict = score_text_rendering(["Open"], ["OPEN"], TextRenderingConfig(case_sensitive=True))
    assert not strict.matches[0].exact
    free = score_text_rendering([], ["anything"], TextRenderingConfig(unconstrained_score=0.7))
    assert free.reward == 0.7
    assert free.matches == ()


def test_text_rendering_reward_reads_images_through_the_callable() -> None:
    calls: list[tuple[int, ...]] = []

    def read_text(image: Tensor) -> list[str]:
        """A deterministic reader: bright images show 'OPEN', dark ones a misprint."""
        calls.append(tuple(image.shape))
        return ["OPEN"] if image.mean() > 0.5 else ["0PEN"]

    reward = TextRenderingReward(TextRenderingConfig(exact_weight=1.0), read_text)
    images = torch.stack([torch.ones(3, 8, 8), torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)])
    prompts = ["a sign that reads 'OPEN'", "a sign that reads 'OPEN'", "a red apple"]
    scores = reward(images, prompts)
    assert scores.dtype == torch.float32
    assert scores.shape == (3,)
    assert scores.tolist() == [1.0, 0.0, 1.0]
    assert calls == [(3, 8, 8), (3, 8, 8)]  # no OCR for the prompt without quoted text
    with pytest.raises(ValueError, match="exact_weight"):
        TextRenderingReward(TextRenderingConfig(exact_weight=1.5), read_text)


# --------------------------------------------------------------------------------------
# Weighted multi-reward
# --------------------------------------------------------------------------------------


def _constant_reward(values: list[float]) -> tuple[list[int], RewardFn]:
    """A reward returning fixed values, and the batch sizes it was called with."""
    calls: list[int] = []

    def reward(images: Tensor, prompts: Sequence[str]) -> Tensor:
        calls.append(images.shape[0])
        return torch.tensor(values)

    return calls, reward


def test_combine_rewards_math_and_category_selection() -> None:
    components = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, math.nan, 30.0])}
    weights = {DEFAULT_CATEGORY: {"a": 1.0, "b": 0.5}, "text": {"a": 2.0}}
    total = combine_rewards(components, ["count", "text", DEFAULT_CATEGORY], weights)
    # "count" has no row: default. "text" weighs b 0, so its NaN adds exactly 0.
    assert total.tolist() == [1.0 + 5.0, 4.0, 3.0 + 15.0]
    with pytest.raises(ValueError, match="'b' is weighted but was not computed"):
        combine_rewards({"a": components["a"]}, ["x", "y", "z"], weights)


def test_multi_reward_normalises_and_computes_only_weighted_rewards() -> None:
    align_calls, align = _constant_reward([0.2, 0.4])
    text_calls, text = _constant_reward([1.0, 0.0])
    config = MultiRewardConfig(
        weights={DEFAULT_CATEGORY: {"alignment": 2.0}, "text": {"alignment": 1.0, "text": 3.0}}
    )
    multi = MultiReward(config, {"alignment": align, "text": text})
    assert multi.weights == {
        DEFAULT_CATEGORY: {"alignment": 1.0},
        "text": {"alignment": 0.25, "text": 0.75},
    }
    images = torch.zeros(2, 3, 4, 4)
    out = multi(images, ["a cat", "a sign 'OPEN'"], ["relation", "text"])
    assert set(out.components) == {"alignment", "text"}
    torch.testing.assert_close(out.total, torch.tensor([0.2, 0.25 * 0.4 + 0.75 * 0.0]))
    only_default = multi(images, ["a cat", "a dog"], ["count", DEFAULT_CATEGORY])
    assert set(only_default.components) == {"alignment"}
    assert text_calls == [2]
    assert align_calls == [2, 2]

    raw_config = dataclasses.replace(config, normalize=False)
    raw = MultiReward(raw_config, {"alignment": align, "text": text})
    torch.testing.assert_close(
        raw(images, ["x", "y"], ["text", "text"]).total, torch.tensor([0.2 + 3.0, 0.4])
    )


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"text": {"a": 1.0}}, "need a 'default' category"),
        ({DEFAULT_CATEGORY: {"a": math.nan}}, "finite and >= 0"),
        ({DEFAULT_CATEGORY: {"a": math.inf}}, "finite and >= 0"),
        ({DEFAULT_CATEGORY: {"a": -0.1, "b": 1.0}}, "finite and >= 0"),
        ({DEFAULT_CATEGORY: {"a": True}}, "must be a number"),
        ({DEFAULT_CATEGORY: {"a": "1"}}, "must be a number"),
        ({DEFAULT_CATEGORY: {"a": 0.0, "b": 0.0}}, "sum to 0"),
        ({DEFAULT_CATEGORY: {}}, "non-empty mapping"),
        ({DEFAULT_CATEGORY: {"c": 1.0}}, "unknown reward 'c'"),
        ({DEFAULT_CATEGORY: {"a": 1.0}, "": {"a": 1.0}}, "non-empty strings"),
        ([("default", {"a": 1.0})], "must map category"),
    ],
)
def test_weight_validation_errors(weights: object, message: str) -> None:
    with pytest.raises(RewardWeightsError, match=message):
        validate_weights(weights, ["a", "b"])


def test_recalibration_replaces_rows_and_is_atomic() -> None:
    _, a = _constant_reward([1.0])
    _, b = _constant_reward([0.0])
    multi = MultiReward(
        MultiRewardConfig(weights={DEFAULT_CATEGORY: {"a": 1.0}, "text": {"a": 1.0, "b": 1.0}}),
        {"a": a, "b": b},
    )
    multi.recalibrate({"text": {"a": 1.0, "b": 3.0}, "count": {"b": 5.0}})
    assert multi.weights == {
        DEFAULT_CATEGORY: {"a": 1.0},
        "text": {"a": 0.25, "b": 0.75},
        "count": {"b": 1.0},
    }
    before = multi.weights
    for bad in ({"text": {"a": math.nan}}, {"text": {"a": -1.0}}, {"count": {"z": 1.0}}):
        with pytest.raises(RewardWeightsError):
            multi.recalibrate(bad)
        assert multi.weights == before


@pytest.mark.parametrize("normalize", [True, False])
def test_weights_json_round_trip(normalize: bool) -> None:
    config = dataclasses.replace(multi_reward_default(), normalize=normalize)
    text = config.to_json()
    loaded = MultiRewardConfig.from_json(text)
    assert loaded == config
    _, constant = _constant_reward([0.0])
    multi = MultiReward(loaded, dict.fromkeys(["alignment", "quality", "text_rendering"], constant))
    again = MultiRewardConfig.from_json(multi.config.to_json())
    assert again.weights == multi.weights
    assert again.normalize == normalize
    for row in again.weights.values():
        if normalize:
            assert sum(row.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ('{"weights": {"default": {"a": 1}}}', "must be"),
        ('{"normalize": "yes", "weights": {"default": {"a": 1}}}', "true or false"),
        ('{"normalize": true, "weights": {"default": {"a": -1}}}', "finite and >= 0"),
        ('{"normalize": true, "weights": {"default": {"a": NaN}}}', "finite and >= 0"),
    ],
)
def test_weights_json_errors(text: str, message: str) -> None:
    with pytest.raises(RewardWeightsError, match=message):
        MultiRewardConfig.from_json(text)


def test_multi_reward_over_the_real_rewards() -> None:
    alignment = _debug_reward(seed=5)
    quality = QualityReward(_debug_reward(seed=5), QualityHead(quality_head_debug()))
    text = TextRenderingReward(TextRenderingConfig(), lambda image: ["OPEN"])
    multi = MultiReward(
        multi_reward_default(),
        {"alignment": alignment.score, "quality": quality.score, "text_rendering": text},
    )
    images = _solid_images()[:2]
    prompts = ["a red square", "a green sign that reads 'OPEN'"]
    with torch.no_grad():
        out = multi(images, prompts, ["relation", "text"])
        assert set(out.components) == {"alignment", "quality", "text_rendering"}
        assert out.components["text_rendering"].tolist() == [1.0, 1.0]
        w = multi.weights
        expected = [
            sum(w[c].get(n, 0.0) * float(out.components[n][b]) for n in out.components)
            for b, c in enumerate(["relation", "text"])
        ]
        torch.testing.assert_close(out.total, torch.tensor(expected))
        torch.testing.assert_close(out.components["alignment"], alignment.score(images, prompts))


def test_ranks_count_ties_half_and_batches_keep_no_lone_tail() -> None:
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])
    ranks = ranks_from_scores(scores)
    # Image 0: prompts 0 and 1 tie above prompt 2 -> 0.75 each; prompt 2 beats nothing.
    assert ranks[0].tolist() == [0.75, 0.75, 0.0]
    assert ranks.diagonal().tolist() == [0.75, 0.5, 0.0]
    # The same prompt twice neither helps nor hurts an image that fits it best.
    repeated = ranks_from_scores(torch.tensor([[2.0, 2.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 1.0]]))
    assert repeated.diagonal().tolist() == [0.75, 0.75, 1.0]
    assert ranks_from_scores(torch.tensor([[4.0]])).tolist() == [[0.5]]
    assert rank_batches(65, 32) == [range(0, 32), range(32, 65)]
    assert rank_batches(64, 32) == [range(0, 32), range(32, 64)]
    assert rank_batches(1, 32) == [range(0, 1)]
    assert rank_batches(0, 32) == []
    with pytest.raises(ValueError, match="size >= 2"):
        rank_batches(4, 1)

"""Reward models for the RL track, and their per-category weighted sum.

- :class:`AlignmentReward`: image-text alignment, the scaled cosine similarity of
  open_clip image and text embeddings. The embedded default is a small custom CLIP
  (:func:`alignment_reward_default`) that a training round trains; production loads
  pretrained open_clip weights from a local file or a local open_clip directory, never
  from a hub.
- :class:`QualityHead` / :class:`QualityReward`: a small MLP on the frozen open_clip
  image embedding that scores quality / aesthetics.
- :class:`TextRenderingReward`: a rule-based score for text rendering: the strings the
  prompt quotes against the text an OCR callable reads in the image (exact match and
  normalised edit distance).
- :class:`MultiReward`: named rewards combined with per-category weights (the prompt's
  skill: ``"text"``, ``"count"``, ``"relation"``, ... and ``"default"``), with
  recalibration and JSON (de)serialisation of the weights.

Conventions shared by every reward here: images are float RGB tensors ``(B, 3, H, W)``
with values in ``[0, 1]`` (map a VAE's ``[-1, 1]`` output with ``(x + 1) / 2``); a
reward called as ``reward(images, prompts)`` returns one float per image, ``(B,)``.

open_clip (and torchvision under it) is imported on first use through
:func:`model.torchvision_compat.import_open_clip`, never at import of this module.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import torch
import torch.nn.functional as F
from rapidfuzz.distance import Levenshtein
from torch import Tensor, nn

from model.torchvision_compat import import_open_clip

# A reward: (images (B, 3, H, W) in [0, 1], prompts of length B) -> scores (B,).
RewardFn = Callable[[Tensor, Sequence[str]], Tensor]

# open_clip's normalisation constants (OPENAI_DATASET_MEAN / _STD), per RGB channel.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------
# Image-text alignment (open_clip)
# --------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class ClipTowersConfig:
    """A custom open_clip CLIP: a ViT image tower and a causal text transformer."""

    embed_dim: int = 256  # width of the shared embedding both towers project to
    image_size: int = 64  # side of the square image the image tower reads, pixels
    patch_size: int = 8  # side of a ViT patch, pixels; image_size must be a multiple
    vision_width: int = 256  # ViT hidden width
    vision_layers: int = 4  # ViT blocks
    vision_head_width: int = 64  # width per attention head (heads = width // head_width)
    context_length: int = 64  # text tokens per prompt, start and end tokens included
    vocab_size: int = 49408  # token vocabulary; 49408 is open_clip's SimpleTokenizer
    text_width: int = 256  # text transformer hidden width
    text_heads: int = 4  # text attention heads
    text_layers: int = 4  # text transformer blocks
    mlp_ratio: float = 4.0  # MLP hidden width / model width, both towers

    def open_clip_model_cfg(self) -> dict[str, Any]:
        """The architecture as open_clip's ``model_cfg`` dict (``open_clip_config.json``)."""
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {self.patch_size}")
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.vision_head_width,
                "mlp_ratio": self.mlp_ratio,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": self.vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
                "mlp_ratio": self.mlp_ratio,
            },
        }


@dataclass(kw_only=True, slots=True)
class AlignmentRewardConfig:
    """Which open_clip model scores alignment, where its weights are, how it tokenizes."""

    # The architecture: custom towers, or an open_clip name: a built-in architecture
    # ("ViT-B-32") or "local-dir:<dir>" (open_clip's local layout: open_clip_config.json
    # plus a weights file such as open_clip_model.safetensors). "hf-hub:" names are refused.
    architecture: ClipTowersConfig | str = field(default_factory=ClipTowersConfig)
    # A local open_clip weights file (.safetensors, .pt, .bin, as open_clip.load_checkpoint
    # reads); None: random initialisation (a "local-dir:" architecture brings its own).
    checkpoint: Path | None = None
    # "simple": open_clip's SimpleTokenizer (BPE vocabulary shipped inside the package);
    # "open_clip": what open_clip.get_tokenizer pairs with a named architecture (for a
    # "local-dir:" one, tokenizer files in that directory; same as "simple" for custom towers).
    tokenizer: Literal["simple", "open_clip"] = "simple"
    # Multiplies the cosine similarity: rewards lie in [-scale, scale].
    scale: float = 1.0


def alignment_reward_default() -> AlignmentRewardConfig:
    """The embedded default: a small custom CLIP, randomly initialised until trained."""
    return AlignmentRewardConfig(architecture=ClipTowersConfig())


def debug_towers() -> ClipTowersConfig:
    """Tiny custom CLIP towers: 32 px images, one block per tower 32 wide, 8 text tokens."""
    return ClipTowersConfig(
        embed_dim=32,
        image_size=32,
        patch_size=8,
        vision_width=32,
        vision_layers=1,
        vision_head_width=16,
        context_length=8,
        text_width=32,
        text_heads=2,
        text_layers=1,
        mlp_ratio=2.0,
    )


def alignment_reward_debug() -> AlignmentRewardConfig:
    """A tiny custom CLIP for tests (:func:`debug_towers`)."""
    return AlignmentRewardConfig(architecture=debug_towers())


def alignment_reward_pretrained(
    architecture: str, checkpoint: Path | None
) -> AlignmentRewardConfig:
    """Production: a pretrained open_clip model from local files.

    ``architecture`` is a built-in open_clip name with ``checkpoint`` its weights file, or
    ``"local-dir:<dir>"`` with ``checkpoint=None``.
    """
    return AlignmentRewardConfig(
        architecture=architecture, checkpoint=checkpoint, tokenizer="open_clip"
    )


class _ClipTowers(Protocol):
    """The part of an open_clip CLIP / CustomTextCLIP this module calls."""

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor: ...

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor: ...


class AlignmentReward(nn.Module):
    """Scaled cosine similarity between open_clip image and prompt embeddings.

    Build it with :func:`build_alignment_reward`. Gradients flow to the images (reward
    backpropagation) and to the CLIP weights (training the reward).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        *,
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        scale: float,
    ) -> None:
        super().__init__()
        self.clip = clip  # an open_clip CLIP or CustomTextCLIP
        self.tokenizer = tokenizer  # list of B prompts -> (B, context_length) int64
        self.image_size = image_size  # (height, width) the image tower reads, pixels
        self.scale = scale
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.mean: Tensor
        self.std: Tensor

    def _towers(self) -> _ClipTowers:
        return cast(_ClipTowers, self.clip)

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's learned log temperature (scalar): ``exp()`` scales its contrastive logits."""
        return cast(Tensor, self.clip.logit_scale)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> token ids ``(B, context_length)`` on this module's device."""
        return self.tokenizer(list(prompts)).to(self.mean.device)

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, h, w)`` normalised at the tower's size.

        Resizes (bilinear, antialiased) so the image covers the tower's size, then crops
        the centre, as open_clip's own preprocessing does; differentiable.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        target_h, target_w = self.image_size
        if (height, width) != (target_h, target_w):
            factor = max(target_h / height, target_w / width)
            size = (max(target_h, round(height * factor)), max(target_w, round(width * factor)))
            images = F.interpolate(
                images, size=size, mode="bilinear", antialias=True, align_corners=False
            )
            top = (size[0] - target_h) // 2
            left = (size[1] - target_w) // 2
            images = images[..., top : top + target_h, left : left + target_w]  # (B, 3, h, w)
        return (images.to(self.mean.dtype) - self.mean) / self.std

    def encode_image(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> unit-norm embeddings ``(B, D)``."""
        return self.encode_preprocessed(self.preprocess(images))

    def encode_preprocessed(self, pixels: Tensor) -> Tensor:
        """Images already through :meth:`preprocess` ``(B, 3, h, w)`` -> unit-norm embeddings
        ``(B, D)`` (images of different sizes are preprocessed one by one, then batched)."""
        return self._towers().encode_image(pixels, normalize=True)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Token ids ``(B, L)`` -> unit-norm embeddings ``(B, D)``."""
        return self._towers().encode_text(tokens, normalize=True)

    def similarity(self, images: Tensor, tokens: Tensor) -> Tensor:
        """Every image against every text: scaled cosines ``(B_images, B_texts)``."""
        image_emb = self.encode_image(images)  # (Bi, D)
        text_emb = self.encode_text(tokens)  # (Bt, D)
        return self.scale * image_emb @ text_emb.T  # (Bi, Bt)

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        """Image ``i`` against text ``i``: scaled cosines ``(B,)``."""
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {tokens.shape[0]} texts")
        image_emb = self.encode_image(images)  # (B, D)
        text_emb = self.encode_text(tokens)  # (B, D)
        return self.scale * (image_emb * text_emb).sum(dim=-1)  # (B,)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The reward: image ``i`` against prompt ``i``, ``(B,)``."""
        scores: Tensor = self(images, self.tokenize(prompts))
        return scores


def ranks_from_scores(scores: Tensor) -> Tensor:
    """``scores[i, j]`` of image ``i`` against prompt ``j`` ``(B, B)`` -> ``ranks[i, j]``: the
    share of the other prompts ``k != j`` that image ``i`` scores below prompt ``j``, a tie
    counting half (so repeated prompts neither help nor hurt; 1: ``j`` fits it best). With one
    prompt there is nothing to compare: 0.5."""
    n = scores.shape[-1]
    if n < 2:
        return torch.full_like(scores, 0.5, dtype=torch.float32)
    own = scores.unsqueeze(-1)  # (B, B, 1): image i against prompt j
    others = scores.unsqueeze(-2)  # (B, 1, B): image i against prompt k
    below = (own > others).sum(dim=-1).float()  # (B, B)
    ties = (own == others).sum(dim=-1).float() - 1  # (B, B), k = j left out
    return (below + 0.5 * ties) / (n - 1)


def rank_batches(count: int, size: int) -> list[range]:
    """``range(count)`` in batches of at most ``size``, none of one item unless ``count`` is
    1: a rank within a batch of one says nothing, so a lone tail joins the batch before it."""
    if size < 2:
        raise ValueError(f"a ranking batch needs size >= 2, got {size}")
    if count < 1:
        return []
    starts = list(range(0, count, size))
    if len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()
    ends = [*starts[1:], count]
    return [range(a, b) for a, b in zip(starts, ends, strict=True)]


def rank_matrix(reward: AlignmentReward, images: Tensor, prompts: Sequence[str]) -> Tensor:
    """:func:`ranks_from_scores` of ``reward``'s scores of ``images`` against ``prompts``;
    its diagonal ranks each image's own prompt."""
    with torch.no_grad():
        return ranks_from_scores(reward.similarity(images, reward.tokenize(prompts)))


def build_alignment_reward(config: AlignmentRewardConfig) -> AlignmentReward:
    """Create the open_clip model the config names, load local weights, wrap it (eval mode).

    Nothing is downloaded: a checkpoint must be an existing local file, and "hf-hub:"
    architectures are refused. (A built-in architecture whose text tower is a Hugging
    Face model still reads that model's config through transformers, which then needs
    it in the local cache.)
    """
    open_clip = import_open_clip()
    checkpoint = _local_checkpoint(config.checkpoint)
    architecture = config.architecture
    if isinstance(architecture, ClipTowersConfig):
        model_cfg = architecture.open_clip_model_cfg()
        clip = open_clip.CLIP(
            embed_dim=model_cfg["embed_dim"],
            vision_cfg=open_clip.CLIPVisionCfg(**model_cfg["vision_cfg"]),
            text_cfg=open_clip.CLIPTextCfg(**model_cfg["text_cfg"]),
        )
        if checkpoint is not None:
            open_clip.load_checkpoint(clip, checkpoint, strict=True)
        tokenizer = open_clip.SimpleTokenizer(context_length=architecture.context_length)
    else:
        if architecture.startswith("hf-hub:"):
            raise ValueError(f"{architecture!r}: hub models are not loaded; use local files")
        if architecture.startswith("local-dir:") and checkpoint is not None:
            raise ValueError(f"{architecture!r} brings its own weights; leave checkpoint unset")
        clip = open_clip.create_model(
            architecture,
            pretrained=checkpoint,
            load_weights=True,
            pretrained_image=False,
            pretrained_text=False,
            require_pretrained=checkpoint is not None,
        )
        if config.tokenizer == "open_clip":
            tokenizer = open_clip.get_tokenizer(architecture, context_length=clip.context_length)
        else:
            tokenizer = open_clip.SimpleTokenizer(context_length=clip.context_length)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(clip)
    size = clip.visual.image_size
    image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    reward = AlignmentReward(
        clip,
        tokenizer,
        image_size=image_size,
        mean=tuple(preprocess_cfg.get("mean", _CLIP_MEAN)),
        std=tuple(preprocess_cfg.get("std", _CLIP_STD)),
        scale=config.scale,
    )
    return reward.eval()


def _local_checkpoint(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"reward checkpoint {path} is not a file")
    # Absolute, so open_clip never mistakes it for a pretrained tag (which it would download).
    return str(path.resolve())


# --------------------------------------------------------------------------------------
# Quality / aesthetic head
# --------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class QualityHeadConfig:
    """An MLP from a unit-norm open_clip image embedding to a scalar quality score."""

    embed_dim: int = 256  # width of the image embedding it reads (the CLIP embed_dim)
    hidden_dims: tuple[int, ...] = (256, 64)  # widths of the hidden layers, in order
    dropout: float = 0.1  # dropout after each hidden activation (training only)


def quality_head_debug() -> QualityHeadConfig:
    """A tiny head over the debug CLIP's 32-wide embeddings."""
    return QualityHeadConfig(embed_dim=32, hidden_dims=(16,), dropout=0.0)


class QualityHead(nn.Module):
    """Embeddings ``(B, D)`` -> scores ``(B,)``.

    Linear, GELU, Dropout per hidden layer, then a Linear to one output.
    """

    def __init__(self, config: QualityHeadConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.embed_dim
        for hidden in config.hidden_dims:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(config.dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, embeddings: Tensor) -> Tensor:
        scores: Tensor = self.mlp(embeddings)  # (B, D) -> (B, 1)
        return scores.squeeze(-1)  # (B,)


class QualityReward(nn.Module):
    """A quality head on a frozen alignment model's image embedding.

    The constructor freezes ``encoder`` (``requires_grad_(False)``): only the head
    trains, while gradients still reach the images.
    """

    def __init__(self, encoder: AlignmentReward, head: QualityHead) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        embeddings = self.encoder.encode_image(images)  # (B, 3, H, W) -> (B, D)
        scores: Tensor = self.head(embeddings)  # (B,)
        return scores

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The reward signature; quality does not read the prompts."""
        del prompts
        scores: Tensor = self(images)
        return scores


# --------------------------------------------------------------------------------------
# Rule-based text-rendering constraints
# --------------------------------------------------------------------------------------

# Quoted spans, in order of appearance. A straight or curly single quote opens only after a
# non-word character and closes only before one, so apostrophes ("the cat's toy",
# "'Joe's Diner'") neither open nor close a span.
_QUOTED = re.compile(
    r'"(?P<double>[^"]+)"'
    r"|(?<![\w'])'(?P<single>.+?)'(?!\w)"
    r"|“(?P<curly_double>[^”]+)”"
    r"|(?<![\w‘’])‘(?P<curly_single>.+?)’(?!\w)"  # noqa: RUF001
    r"|«(?P<guillemets>[^»]+)»"
    r"|「(?P<corner>[^」]+)」"
    r"|『(?P<white_corner>[^』]+)』"
)


def extract_quoted_text(prompt: str) -> list[str]:
    """The strings a prompt asks to render: its quoted spans, stripped, in order.

    >>> extract_quoted_text("a sign that reads 'OPEN' next to the cat's bowl")
    ['OPEN']
    """
    spans = []
    for match in _QUOTED.finditer(prompt):
        text = next(group for group in match.groups() if group is not None).strip()
        if text:
            spans.append(text)
    return spans


def normalize_text(text: str, *, case_sensitive: bool) -> str:
    """NFKC, runs of whitespace to one space, stripped; case-folded unless case_sensitive."""
    text = " ".join(unicodedata.normalize("NFKC", text).split())
    return text if case_sensitive else text.casefold()


def levenshtein(a: str, b: str) -> int:
    """Edit distance: fewest single-character insertions, deletions, substitutions
    (``rapidfuzz``'s Levenshtein distance, unit weights)."""
    return Levenshtein.distance(a, b)


def normalized_edit_distance(a: str, b: str) -> float:
    """``levenshtein(a, b) / max(len(a), len(b))`` in [0, 1]; 0 for two empty strings."""
    longest = max(len(a), len(b))
    return levenshtein(a, b) / longest if longest else 0.0


def substring_edit_distance(pattern: str, text: str) -> int:
    """Fewest edits turning ``pattern`` into some substring of ``text`` (Sellers' algorithm).

    0 exactly when ``pattern`` occurs in ``text``; at most ``len(pattern)``.
    """
    # Row j holds, for each prefix of pattern, the best alignment ending at text[:j];
    # starting anywhere in text is free (the first row is all zeros per column).
    column = list(range(len(pattern) + 1))  # text consumed: nothing
    best = column[-1]
    for char_t in text:
        next_column = [0]
        for i, char_p in enumerate(pattern, start=1):
            next_column.append(
                min(column[i] + 1, next_column[i - 1] + 1, column[i - 1] + (char_p != char_t))
            )
        column = next_column
        best = min(best, column[-1])
    return best


@dataclass(kw_only=True, slots=True)
class TextRenderingConfig:
    """How requested strings are compared with the text read in an image."""

    case_sensitive: bool = False  # compare case-sensitively (else both sides case-folded)
    exact_weight: float = 0.5  # reward = w * exact fraction + (1 - w) * mean similarity
    unconstrained_score: float = 1.0  # the reward of a prompt that quotes no text


@dataclass(frozen=True, slots=True)
class TextMatch:
    """One requested string against the recognised text."""

    requested: str  # the quoted string, normalised
    exact: bool  # it occurs verbatim (after normalisation) in the recognised text
    edit_distance: float  # edits to the closest recognised substring / len(requested), [0, 1]


@dataclass(frozen=True, slots=True)
class TextRenderingScore:
    """All requested strings of one prompt against one image's recognised text."""

    matches: tuple[TextMatch, ...]  # one per requested string, in prompt order
    exact: float  # fraction of requested strings found exactly, [0, 1]
    similarity: float  # mean of 1 - edit_distance, [0, 1]
    reward: float  # exact_weight * exact + (1 - exact_weight) * similarity


def score_text_rendering(
    requested: Sequence[str], recognised: Sequence[str], config: TextRenderingConfig
) -> TextRenderingScore:
    """Score requested strings against recognised text segments.

    The segments are joined with spaces, so a requested phrase that OCR returns as
    several words still matches. Each requested string is compared with its closest
    substring of that text; text the image shows beyond what was asked is not penalised.
    No requested string: ``config.unconstrained_score`` for all three numbers.
    """
    wanted = [
        w for w in (normalize_text(r, case_sensitive=config.case_sensitive) for r in requested) if w
    ]
    if not wanted:
        empty = config.unconstrained_score
        return TextRenderingScore(matches=(), exact=empty, similarity=empty, reward=empty)
    read = normalize_text(" ".join(recognised), case_sensitive=config.case_sensitive)
    matches = tuple(
        TextMatch(
            requested=w,
            exact=w in read,
            edit_distance=substring_edit_distance(w, read) / len(w),
        )
        for w in wanted
    )
    exact = sum(m.exact for m in matches) / len(matches)
    similarity = sum(1.0 - m.edit_distance for m in matches) / len(matches)
    reward = config.exact_weight * exact + (1.0 - config.exact_weight) * similarity
    return TextRenderingScore(matches=matches, exact=exact, similarity=similarity, reward=reward)


class TextRenderingReward:
    """The text-rendering reward: quoted prompt strings vs OCR of the image.

    ``read_text`` reads one image ``(3, H, W)`` in [0, 1] and returns the text segments
    it recognises. Not differentiable.
    """

    def __init__(
        self, config: TextRenderingConfig, read_text: Callable[[Tensor], list[str]]
    ) -> None:
        if not 0.0 <= config.exact_weight <= 1.0:
            raise ValueError(f"exact_weight must lie in [0, 1], got {config.exact_weight}")
        self.config = config
        self.read_text = read_text

    def scores(self, images: Tensor, prompts: Sequence[str]) -> list[TextRenderingScore]:
        """The full breakdown per image."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        results = []
        for image, prompt in zip(images, prompts, strict=True):
            requested = extract_quoted_text(prompt)
            # OCR only when the prompt asks for text.
            recognised = self.read_text(image) if requested else []
            results.append(score_text_rendering(requested, recognised, self.config))
        return results

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        rewards = [s.reward for s in self.scores(images, prompts)]
        return torch.tensor(rewards, dtype=torch.float32, device=images.device)  # (B,)


# --------------------------------------------------------------------------------------
# Weighted multi-reward
# --------------------------------------------------------------------------------------

DEFAULT_CATEGORY = "default"  # the weights row used for a category without its own

# category -> reward name -> weight
WeightTable = dict[str, dict[str, float]]


class RewardWeightsError(ValueError):
    """A weights table that cannot be used (see :func:`validate_weights`)."""


@dataclass(kw_only=True, slots=True)
class MultiRewardConfig:
    """Per-category reward weights."""

    # category -> reward name -> weight >= 0. Needs a "default" row (used for categories
    # without their own); a reward absent from a row weighs 0 there; each row sums > 0.
    weights: WeightTable
    # True: a MultiReward scales each row to sum to 1 (when built and on recalibration), so
    # totals of every category share one range; False: weights are used as given.
    normalize: bool = True

    def to_json(self) -> str:
        """``{"normalize": bool, "weights": {category: {reward: weight}}}``."""
        return json.dumps(
            {"normalize": self.normalize, "weights": self.weights},
            indent=2,
            sort_keys=True,
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> MultiRewardConfig:
        """Parse :meth:`to_json` output; raises :class:`RewardWeightsError` when malformed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise RewardWeightsError(f"reward weights are not JSON: {error}") from None
        if not isinstance(data, dict) or set(data) != {"normalize", "weights"}:
            raise RewardWeightsError(
                'reward weights JSON must be {"normalize": ..., "weights": ...}'
            )
        normalize = data["normalize"]
        if not isinstance(normalize, bool):
            raise RewardWeightsError(f"normalize must be true or false, got {normalize!r}")
        weights = data["weights"]
        validate_weights(weights)
        return cls(weights=_copy_table(weights), normalize=normalize)


def multi_reward_default() -> MultiRewardConfig:
    """Starting weights: alignment everywhere, text rendering dominating "text" prompts."""
    return MultiRewardConfig(
        weights={
            DEFAULT_CATEGORY: {"alignment": 0.7, "quality": 0.3},
            "text": {"alignment": 0.3, "quality": 0.1, "text_rendering": 0.6},
            "count": {"alignment": 0.8, "quality": 0.2},
            "relation": {"alignment": 0.8, "quality": 0.2},
        }
    )


def validate_weights(weights: object, reward_names: Sequence[str] | None = None) -> None:
    """Raise :class:`RewardWeightsError` unless ``weights`` is a usable weights table.

    Usable: a mapping category -> (mapping reward name -> weight) with a ``"default"``
    row; names are non-empty strings; weights are finite real numbers >= 0 (not bools);
    every row sums to more than 0; with ``reward_names``, every named reward is one of them.
    """
    if not isinstance(weights, Mapping):
        raise RewardWeightsError(
            f"weights must map category -> reward -> weight, got {type(weights).__name__}"
        )
    if DEFAULT_CATEGORY not in weights:
        raise RewardWeightsError(f"weights need a {DEFAULT_CATEGORY!r} category")
    known = None if reward_names is None else set(reward_names)
    for category, row in weights.items():
        if not isinstance(category, str) or not category:
            raise RewardWeightsError(f"category names must be non-empty strings, got {category!r}")
        if not isinstance(row, Mapping) or not row:
            raise RewardWeightsError(
                f"{category!r}: weights must be a non-empty mapping reward -> weight"
            )
        for name, weight in row.items():
            if not isinstance(name, str) or not name:
                raise RewardWeightsError(
                    f"{category!r}: reward names must be non-empty strings, got {name!r}"
                )
            if known is not None and name not in known:
                raise RewardWeightsError(
                    f"{category!r}: unknown reward {name!r} (known: {sorted(known)})"
                )
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise RewardWeightsError(
                    f"{category!r}/{name!r}: weight must be a number, got {weight!r}"
                )
            if not math.isfinite(weight) or weight < 0:
                raise RewardWeightsError(
                    f"{category!r}/{name!r}: weight must be finite and >= 0, got {weight}"
                )
        if not sum(row.values()) > 0:
            raise RewardWeightsError(
                f"{category!r}: weights sum to 0; the category would get no reward"
            )


def _copy_table(weights: Mapping[str, Mapping[str, float]]) -> WeightTable:
    return {
        category: {name: float(w) for name, w in row.items()} for category, row in weights.items()
    }


def _normalized(weights: WeightTable) -> WeightTable:
    return {
        category: {n: w / sum(row.values()) for n, w in row.items()}
        for category, row in weights.items()
    }


def category_weights(
    weights: Mapping[str, Mapping[str, float]], category: str
) -> Mapping[str, float]:
    """The row for ``category``, or the default row when it has none."""
    return weights.get(category, weights[DEFAULT_CATEGORY])


def combine_rewards(
    components: Mapping[str, Tensor],
    categories: Sequence[str],
    weights: Mapping[str, Mapping[str, float]],
) -> Tensor:
    """``total[b] = sum_r weight[category[b]][r] * components[r][b]``, ``(B,)``.

    A reward a sample's row weighs 0 (or leaves out) adds exactly 0, even if its value is
    not finite; every reward with a non-zero weight for some sample must be in components.
    """
    if not components:
        raise ValueError("no reward components to combine")
    reference = next(iter(components.values()))
    total = torch.zeros(len(categories), dtype=reference.dtype, device=reference.device)  # (B,)
    rows = [category_weights(weights, c) for c in categories]
    for name in sorted({n for row in rows for n, w in row.items() if w > 0}):
        if name not in components:
            raise ValueError(f"reward {name!r} is weighted but was not computed")
        value = components[name]  # (B,)
        if value.shape != total.shape:
            raise ValueError(
                f"reward {name!r}: expected shape {tuple(total.shape)}, got {tuple(value.shape)}"
            )
        w = torch.tensor(
            [row.get(name, 0.0) for row in rows], dtype=total.dtype, device=value.device
        )
        total = total + torch.where(w > 0, w * value.to(total.dtype), torch.zeros_like(total))
    return total


@dataclass(frozen=True, slots=True)
class MultiRewardOutput:
    """Per-reward scores and their weighted total for one batch."""

    components: dict[str, Tensor]  # reward name -> (B,), only rewards weighted in this batch
    total: Tensor  # (B,)


class MultiReward:
    """Named rewards combined with per-category weights.

    A reward is computed for a batch only when some sample's category weighs it above 0.
    """

    def __init__(self, config: MultiRewardConfig, rewards: Mapping[str, RewardFn]) -> None:
        if not rewards:
            raise ValueError("MultiReward needs at least one reward")
        self.rewards = dict(rewards)
        self.normalize = config.normalize
        validate_weights(config.weights, list(self.rewards))
        table = _copy_table(config.weights)
        self._weights = _normalized(table) if config.normalize else table

    @property
    def weights(self) -> WeightTable:
        """A copy of the weights in use (normalised rows when ``normalize``)."""
        return _copy_table(self._weights)

    @property
    def config(self) -> MultiRewardConfig:
        """The weights in use as a config (what :meth:`MultiRewardConfig.to_json` saves)."""
        return MultiRewardConfig(weights=self.weights, normalize=self.normalize)

    def recalibrate(self, weights: Mapping[str, Mapping[str, float]]) -> None:
        """Replace the rows of the given categories; the other categories keep theirs.

        The resulting table is validated as a whole before it is used (on error nothing
        changes). With ``normalize`` the new rows are scaled to sum to 1, so only their
        proportions matter; without it they are used as given.
        """
        merged: dict[str, Mapping[str, float]] = {**self._weights, **weights}
        validate_weights(merged, list(self.rewards))
        table = _copy_table(merged)
        self._weights = _normalized(table) if self.normalize else table

    def __call__(
        self, images: Tensor, prompts: Sequence[str], categories: Sequence[str]
    ) -> MultiRewardOutput:
        """Score a batch: ``categories[b]`` picks sample ``b``'s weights row."""
        if not images.shape[0] == len(prompts) == len(categories):
            raise ValueError(
                f"{images.shape[0]} images, {len(prompts)} prompts, {len(categories)} categories"
            )
        rows = [category_weights(self._weights, c) for c in categories]
        needed = sorted({name for row in rows for name, w in row.items() if w > 0})
        components = {name: self.rewards[name](images, prompts) for name in needed}
        return MultiRewardOutput(
            components=components, total=combine_rewards(components, categories, self._weights)
        )

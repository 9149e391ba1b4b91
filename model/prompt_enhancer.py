"""Prompt enhancer: a causal LM that rewrites user prompts before they are encoded.

Any Hugging Face causal LM with a chat template, loaded from a local directory through
:mod:`model.hf_loading` (``from_pretrained(path, local_files_only=True)``, never a hub id). A
tokenizer passed to :class:`PromptEnhancer` is never changed: one without a pad token is copied
(:func:`model.hf_loading.with_pad_token`). Each prompt becomes a
two-turn chat — the task's system instruction, then the user prompt — rendered by the
tokenizer's chat template with the assistant's header appended; a batch is left-padded (a
decoder generates after its last input token) and continued with ``generate``. Length limits:
an input longer than ``max_input_tokens`` has its *prompt* cut (the template stays whole) until
it fits, and at most ``max_new_tokens`` are generated. Greedy decoding (``do_sample=False``) is
deterministic; sampling draws from the global RNG inside ``torch.random.fork_rng`` after
seeding it, so a seed fixes the output and the caller's RNG state is left as it was.

:func:`pe_debug` describes a tiny Qwen3-style model that a training round can start from;
:func:`build_pe_debug` writes it (config, random weights, a byte-level tokenizer with a ChatML
template, generation config) to a directory, so that it loads through the same local path as a
production model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from model.hf_loading import (
    TorchDtype,
    freeze,
    load_frozen,
    load_tokenizer,
    require_local_dir,
    with_pad_token,
)
from model.torchvision_compat import import_torchvision

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PromptTask = Literal["text_to_image", "image_editing"]

DEFAULT_T2I_SYSTEM = (
    "Rewrite the user's image prompt as one detailed English paragraph describing the finished "
    "image: the subjects with their attributes and counts, where they are, the background, "
    "lighting and style. Quote any text to be rendered exactly as the user gave it. Keep every "
    "detail the user asked for and add nothing that contradicts it. Reply with the rewritten "
    "prompt only."
)
DEFAULT_EDIT_SYSTEM = (
    "Rewrite the user's image editing instruction as one precise English instruction: what to "
    "change, where and how, and what must stay as it is. Quote any text to be rendered exactly "
    "as the user gave it. Reply with the rewritten instruction only."
)

# The debug tokenizer's special tokens, ChatML as in Qwen.
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class PromptEnhancerError(ValueError):
    """A prompt enhancer that cannot be built or run as configured."""


@dataclass(kw_only=True, slots=True)
class PromptEnhancerConfig:
    """A causal LM from a local directory and how it rewrites prompts."""

    # Local directory of the model and its tokenizer (which must have a chat template).
    path: Path
    # System instruction for text-to-image prompts.
    system_prompt_t2i: str = DEFAULT_T2I_SYSTEM
    # System instruction for editing instructions.
    system_prompt_edit: str = DEFAULT_EDIT_SYSTEM
    # Most tokens of one rendered input (template + prompt); longer prompts are cut to fit.
    max_input_tokens: int = 1024
    # Most tokens generated per prompt (the end-of-turn token not counted).
    max_new_tokens: int = 512
    # Prompts per generate call.
    batch_size: int = 8
    # Sample (True) or decode greedily (False).
    do_sample: bool = False
    # Sampling temperature; used when do_sample.
    temperature: float = 0.7
    # Nucleus sampling mass in (0, 1]; used when do_sample.
    top_p: float = 0.8
    # Sample among the k most likely tokens, 0 for all; used when do_sample.
    top_k: int = 20
    # Penalty on repeating tokens, 1.0 for none.
    repetition_penalty: float = 1.0
    # Seed of the sampling RNG when a call gives none.
    seed: int = 0
    # Passed to the chat template as enable_thinking when set (Qwen3: False for no <think>).
    enable_thinking: bool | None = None
    # Weights dtype.
    dtype: TorchDtype = "float32"


@dataclass(kw_only=True, slots=True)
class PromptEnhancerModelConfig:
    """A Qwen3-style causal LM built from scratch (random init), with a byte-level vocabulary."""

    # Width of the residual stream.
    hidden_size: int = 64
    # Decoder layers.
    num_layers: int = 2
    # Query heads.
    num_heads: int = 4
    # Key/value heads (grouped-query attention), dividing num_heads.
    num_kv_heads: int = 2
    # Width of one attention head.
    head_dim: int = 16
    # Hidden width of the SwiGLU MLP.
    intermediate_size: int = 128
    # Longest sequence (input + generated tokens), in tokens.
    max_position_embeddings: int = 2048
    # RoPE base frequency.
    rope_theta: float = 10000.0
    # Std of the normal weight init.
    initializer_range: float = 0.02
    # Seed of the weight init.
    seed: int = 0


@dataclass(kw_only=True, slots=True, frozen=True)
class Rewrite:
    """One rewritten prompt and what it cost."""

    # The rewritten prompt, special tokens removed, whitespace stripped.
    text: str
    # Tokens of the rendered input the model read.
    input_tokens: int
    # Tokens generated before the end of the turn.
    new_tokens: int
    # Whether the prompt was cut to fit max_input_tokens.
    truncated: bool


def pe_debug() -> PromptEnhancerModelConfig:
    """The tiny prompt enhancer: 2 layers, width 64, byte-level vocabulary (259 tokens)."""
    return PromptEnhancerModelConfig()


def pe_debug_enhancer(path: Path) -> PromptEnhancerConfig:
    """How the debug model (written by :func:`build_pe_debug` to ``path``) rewrites: greedy."""
    return PromptEnhancerConfig(path=path, max_input_tokens=768, max_new_tokens=256)


def qwen3_pe(path: Path) -> PromptEnhancerConfig:
    """A Qwen3 instruct model as the enhancer: bf16, no thinking turn, Qwen's sampling."""
    return PromptEnhancerConfig(
        path=path,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        enable_thinking=False,
        dtype="bfloat16",
    )


def byte_level_tokenizer() -> Any:
    """A tokenizer that needs no download: the 256 bytes as tokens, plus ChatML specials.

    Every string round-trips; ids 0-255 are the bytes (in ByteLevel's alphabet order), then
    ``<|endoftext|>`` (padding), ``<|im_start|>``, ``<|im_end|>`` (end of turn).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD_TOKEN, IM_START, IM_END])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHATML_TEMPLATE,
    )


def build_pe_debug(out_dir: Path, config: PromptEnhancerModelConfig | None = None) -> Path:
    """Write a randomly initialised model, its tokenizer and generation config to ``out_dir``.

    The init is seeded (``config.seed``) without touching the caller's RNG state. Returns
    ``out_dir``, ready for ``PromptEnhancer.load``.
    """
    config = config or pe_debug()
    import_torchvision()  # transformers' modeling imports torchvision: see model.hf_loading
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = byte_level_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids([IM_END, PAD_TOKEN])
    model_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        initializer_range=config.initializer_range,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Qwen3ForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


class PromptEnhancer:
    """Batched prompt rewriting with a frozen causal LM.

    The model passed in is frozen in place (:func:`model.hf_loading.freeze`); the tokenizer is
    left as it is, and copied if it needs a pad token.
    """

    def __init__(
        self,
        config: PromptEnhancerConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        self.config = config
        self.model = freeze(model)
        # Left padding is masked out: any token will do.
        self.tokenizer = with_pad_token(tokenizer)
        if config.batch_size < 1 or config.max_new_tokens < 1:
            raise PromptEnhancerError("batch_size and max_new_tokens must be at least 1")
        if getattr(tokenizer, "chat_template", None) is None:
            raise PromptEnhancerError(f"{config.path}: the tokenizer has no chat template")
        self.eos_ids = self._eos_ids()
        if not self.eos_ids:
            raise PromptEnhancerError(f"{config.path}: no end-of-sequence token")
        for task in ("text_to_image", "image_editing"):
            overhead = len(self._input_ids(self._render("", task)))
            if overhead >= config.max_input_tokens:
                raise PromptEnhancerError(
                    f"{task}: the template alone takes {overhead} tokens, "
                    f"max_input_tokens is {config.max_input_tokens}"
                )
        positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if positions is not None and config.max_input_tokens + config.max_new_tokens > positions:
            raise PromptEnhancerError(
                f"max_input_tokens + max_new_tokens = "
                f"{config.max_input_tokens + config.max_new_tokens} exceeds the model's "
                f"{positions} positions"
            )

    @classmethod
    def load(
        cls, config: PromptEnhancerConfig, *, device: torch.device | str = "cpu"
    ) -> PromptEnhancer:
        """Load tokenizer and model from ``config.path`` (a local directory) onto ``device``."""
        path = require_local_dir(config.path, "model", PromptEnhancerError)
        tokenizer = load_tokenizer(path)
        model = load_frozen("AutoModelForCausalLM", path, dtype=config.dtype, device=device)
        return cls(config, model, tokenizer)

    @property
    def device(self) -> torch.device:
        first: Tensor = next(self.model.parameters())
        return first.device

    def enhance(
        self, prompts: Sequence[str], *, task: PromptTask = "text_to_image", seed: int | None = None
    ) -> list[str]:
        """The rewritten prompts, in order."""
        return [r.text for r in self.rewrite(prompts, task=task, seed=seed)]

    def rewrite(
        self, prompts: Sequence[str], *, task: PromptTask = "text_to_image", seed: int | None = None
    ) -> list[Rewrite]:
        """Rewrite ``prompts`` in batches of ``batch_size``; ``seed`` overrides the config's."""
        inputs = [self._fit(p, task) for p in prompts]
        if not self.config.do_sample:
            return self._generate_in_batches(inputs)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed if seed is None else seed)
            return self._generate_in_batches(inputs)

    def _generate_in_batches(self, inputs: list[tuple[list[int], bool]]) -> list[Rewrite]:
        size = self.config.batch_size
        return [
            r for i in range(0, len(inputs), size) for r in self._generate(inputs[i : i + size])
        ]

    def _generate(self, inputs: list[tuple[list[int], bool]]) -> list[Rewrite]:
        from transformers import GenerationConfig

        batch = self.tokenizer.pad(
            {"input_ids": [ids for ids, _ in inputs]},
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)  # (B, T)
        sampling: dict[str, Any] = (
            {
                "temperature": self.config.temperature,
                "top_p": self.config.top_p,
                "top_k": self.config.top_k,
            }
            if self.config.do_sample
            else {}
        )
        generation = GenerationConfig(
            max_new_tokens=self.config.max_new_tokens,
            do_sample=self.config.do_sample,
            repetition_penalty=self.config.repetition_penalty,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling,
        )
        with torch.no_grad():
            out: Tensor = self.model.generate(  # (B, T + N)
                input_ids=ids,
                attention_mask=batch["attention_mask"].to(self.device),
                generation_config=generation,
            )
        rewrites = []
        for (input_ids, truncated), row in zip(
            inputs, out[:, ids.shape[1] :].tolist(), strict=True
        ):
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
            rewrites.append(
                Rewrite(
                    text=self.tokenizer.decode(row[:end], skip_special_tokens=True).strip(),
                    input_tokens=len(input_ids),
                    new_tokens=end,
                    truncated=truncated,
                )
            )
        return rewrites

    def _fit(self, prompt: str, task: PromptTask) -> tuple[list[int], bool]:
        """The input ids of ``prompt`` under ``task``'s template, the prompt cut to fit."""
        limit = self.config.max_input_tokens
        ids = self._input_ids(self._render(prompt, task))
        if len(ids) <= limit:
            return ids, False
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        keep = len(prompt_ids) - (len(ids) - limit)
        while keep > 0:
            cut = self.tokenizer.decode(prompt_ids[:keep], skip_special_tokens=True)
            ids = self._input_ids(self._render(cut, task))
            if len(ids) <= limit:
                return ids, True
            keep -= len(ids) - limit  # re-tokenizing the cut prompt can merge differently
        return self._input_ids(self._render("", task)), True

    def _render(self, prompt: str, task: PromptTask) -> str:
        if task == "text_to_image":
            system = self.config.system_prompt_t2i
        elif task == "image_editing":
            system = self.config.system_prompt_edit
        else:
            raise PromptEnhancerError(f"unknown task {task!r}")
        kwargs: dict[str, Any] = (
            {}
            if self.config.enable_thinking is None
            else {"enable_thinking": self.config.enable_thinking}
        )
        text = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            **kwargs,
        )
        return str(text)

    def _input_ids(self, text: str) -> list[int]:
        # The chat template writes its own special tokens.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (configured, self.tokenizer.eos_token_id):
            for token in value if isinstance(value, list) else [value]:
                if isinstance(token, int) and token not in ids:
                    ids.append(token)
        return ids

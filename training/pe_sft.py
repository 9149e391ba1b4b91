"""Prompt-enhancer SFT: teach a causal LM to rewrite terse prompts into rich captions.

Pairs ``(terse, rich)`` come from :mod:`training.degradation` (rich captions degraded the way
users under-specify). Each pair becomes the chat the :class:`model.prompt_enhancer.PromptEnhancer`
renders at inference — the system instruction, the terse prompt as the user turn, the
assistant header (:func:`render_prompt`, checked against the enhancer's own rendering in the
tests) — followed by the rich caption and the end-of-turn token the enhancer stops on::

    x = [prompt tokens p_1..p_P] [target tokens y_1..y_N, <eos>]
    labels = [-100] * P + [y_1..y_N, <eos>]         (padding: -100 as well)
    loss = -1/|T| sum_{k in T} log p_theta(x_k | x_<k)     T = labelled positions of the batch

so the prompt costs nothing and the model is trained exactly where it generates. A pair whose
tokens exceed ``max_length`` has its target cut (and loses its end token); a prompt that alone
does not fit is refused.

The trained module is the Hugging Face causal LM itself (its state dict is checkpointed). It is
built from a local model directory (``model`` a path), or from
:func:`model.prompt_enhancer.build_pe_debug` written into ``<out>/enhancer_base`` (``model`` a
:class:`PromptEnhancerModelConfig`, seeded); ``<out>/enhancer.json`` records which, so that
:func:`export_enhancer` can write a trained run as a local directory the enhancer loads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.hf_loading import load_frozen, load_tokenizer, require_local_dir
from model.prompt_enhancer import (
    DEFAULT_T2I_SYSTEM,
    PromptEnhancerModelConfig,
    build_pe_debug,
    pe_debug,
)
from training.checkpoint import load_model_weights
from training.degradation import (
    CorpusConfig,
    DegradationConfig,
    build_pairs,
    rich_caption_corpus,
)
from training.io import atomic_write_text
from training.loop import LoopConfig, Objective, StepOutput

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of a position that gets no loss (prompt, padding)."""
BASE_DIR = "enhancer_base"
"""Where a run writes the seeded random model it starts from (``model`` a config)."""
MANIFEST_FILE = "enhancer.json"
"""A run's record of the local model directory its weights belong to."""
DEBUG_SYSTEM_PROMPT = "Rewrite the image prompt as a rich, detailed caption."
"""The short system instruction of the debug recipes (a tenth of the default's tokens, so a
CPU step is cheap); an enhancer serving their runs sets it as ``system_prompt_t2i``."""


# ---- data -------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class PromptPairsConfig:
    """Where the pairs come from: a file of explicit pairs, or rich captions degraded into
    terse prompts."""

    pairs: Path | None = None
    """A JSONL file of explicit pairs, one ``{"prompt": ..., "target": ...}`` object a line
    (both non-empty strings); when set, ``captions``, ``corpus`` and ``degradation`` are
    not used."""
    captions: Path | None = None
    """A UTF-8 text file with one rich caption per line; None: the generated corpus."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The generated corpus of rich captions (used when ``captions`` is None)."""
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    """Which degradations make the terse prompts."""
    seed: int = 0
    """Seed of the degradation choices."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.corpus.validate()
        self.degradation.validate()
        if self.captions is not None and not self.captions.is_file():
            raise ValueError(f"PromptPairsConfig.captions {self.captions} is not a file")
        if self.pairs is not None and not self.pairs.is_file():
            raise ValueError(f"PromptPairsConfig.pairs {self.pairs} is not a file")


def write_pairs(path: Path, pairs: Sequence[tuple[str, str]]) -> Path:
    """Write ``(prompt, target)`` pairs as the JSONL file ``PromptPairsConfig.pairs`` reads
    (atomically); returns ``path``."""
    lines = [json.dumps({"prompt": p, "target": t}, ensure_ascii=False) for p, t in pairs]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """The ``(prompt, target)`` pairs of a JSONL pairs file; a malformed line is refused with
    its line number."""
    pairs = []
    # "\n" only: a prompt may hold U+2028 and the like, which splitlines() would break at.
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        target = record.get("target") if isinstance(record, dict) else None
        if not (isinstance(prompt, str) and prompt and isinstance(target, str) and target):
            raise ValueError(f'{path}:{number}: want {{"prompt": "...", "target": "..."}}')
        pairs.append((prompt, target))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def load_pairs(config: PromptPairsConfig) -> list[tuple[str, str]]:
    """The ``(prompt, target)`` pairs of ``config`` (the same on every call): the pairs file,
    or ``(terse, rich)`` pairs made by degrading the rich captions."""
    if config.pairs is not None:
        return read_pairs(config.pairs)
    if config.captions is not None:
        lines = config.captions.read_text(encoding="utf-8").splitlines()
        captions = [line.strip() for line in lines if line.strip()]
    else:
        captions = rich_caption_corpus(config.corpus)
    generator = torch.Generator().manual_seed(config.seed)
    pairs = build_pairs(captions, config=config.degradation, generator=generator)
    if not pairs:
        raise ValueError("no (terse, rich) pairs: no caption was changed by the degradations")
    return pairs


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    system_prompt: str,
    enable_thinking: bool | None = None,
) -> str:
    """The input the enhancer reads for ``prompt`` (text-to-image): system turn, user turn,
    assistant header — as :class:`model.prompt_enhancer.PromptEnhancer` renders it."""
    kwargs: dict[str, Any] = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        **kwargs,
    )
    return str(text)


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    system_prompt: str,
    enable_thinking: bool | None = None,
) -> list[int]:
    """Token ids of :func:`render_prompt` (the template writes its own special tokens)."""
    text = render_prompt(
        tokenizer, prompt, system_prompt=system_prompt, enable_thinking=enable_thinking
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    terse: str,
    rich: str,
    *,
    system_prompt: str,
    max_length: int,
    enable_thinking: bool | None = None,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one pair: labels are -100 on the prompt (see module doc)."""
    prompt = prompt_ids(
        tokenizer, terse, system_prompt=system_prompt, enable_thinking=enable_thinking
    )
    if len(prompt) >= max_length:
        raise ValueError(
            f"the rendered prompt of {terse!r} takes {len(prompt)} tokens, max_length is "
            f"{max_length}"
        )
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise ValueError("the tokenizer has no end-of-sequence token to end the turn with")
    target = [*tokenizer(rich, add_special_tokens=False)["input_ids"], eos]
    target = target[: max_length - len(prompt)]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad ``(input_ids, labels)`` examples into ``input_ids``, ``attention_mask``,
    ``labels``, each (B, T)."""
    length = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(examples), length, dtype=torch.long)  # (B, T)
    for row, (example_ids, example_labels) in enumerate(examples):
        ids[row, : len(example_ids)] = torch.tensor(example_ids)
        labels[row, : len(example_labels)] = torch.tensor(example_labels)
        mask[row, : len(example_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- the model --------------------------------------------------------------------------


def prepare_base(model: PromptEnhancerModelConfig | Path, out: Path) -> Path:
    """The local model directory a run's weights belong to, recorded in ``<out>/enhancer.json``.

    ``model`` a path: that directory. A config: :func:`build_pe_debug` writes the seeded model
    to ``<out>/enhancer_base`` (once; the same on every call).
    """
    if isinstance(model, Path):
        base = require_local_dir(model, "prompt enhancer model")
    else:
        base = out / BASE_DIR
        if not (base / "config.json").is_file():
            build_pe_debug(base, model)
    atomic_write_text(out / MANIFEST_FILE, json.dumps({"base": str(base.resolve())}) + "\n")
    return base


def load_causal_lm(
    base: Path, *, init_from: Path | None, device: str, trainable: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM in ``base`` (with the weights of the run ``init_from`` if given) and its
    tokenizer; trainable (train mode, gradients on) or frozen."""
    tokenizer = load_tokenizer(base)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{base}: the tokenizer has no chat template")
    model = load_frozen("AutoModelForCausalLM", base, dtype="float32", device=device)
    if init_from is not None:
        model.load_state_dict(load_model_weights(init_from))
    if trainable:
        model.train().requires_grad_(True)
    return model, tokenizer


def export_enhancer(run_dir: Path, out_dir: Path) -> Path:
    """Write the latest weights of the PE run ``run_dir`` (SFT or GRPO) as a local model
    directory (weights, config, generation config, tokenizer) that
    :meth:`model.prompt_enhancer.PromptEnhancer.load` reads. Returns ``out_dir``."""
    manifest = run_dir / MANIFEST_FILE
    if not manifest.is_file():
        raise FileNotFoundError(f"{run_dir}: not a prompt-enhancer run (no {MANIFEST_FILE})")
    base = Path(json.loads(manifest.read_text())["base"])
    model, tokenizer = load_causal_lm(base, init_from=run_dir, device="cpu", trainable=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---- the objective ----------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class PESFTConfig:
    """Supervised fine-tuning of the prompt enhancer on (terse -> rich) pairs."""

    model: PromptEnhancerModelConfig | Path = field(default_factory=pe_debug)
    """A local model directory (weights, tokenizer with a chat template), or the architecture
    of a seeded random model (:func:`model.prompt_enhancer.build_pe_debug`)."""
    init_from: Path | None = None
    """Start from these weights (a PE run directory, its checkpoints/ or one checkpoint);
    None: the weights of ``model``."""
    data: PromptPairsConfig = field(default_factory=PromptPairsConfig)
    """The (terse, rich) pairs."""
    system_prompt: str = DEFAULT_T2I_SYSTEM
    """The system instruction, as the enhancer's ``system_prompt_t2i`` at inference."""
    enable_thinking: bool | None = None
    """Passed to the chat template, as the enhancer's ``enable_thinking`` at inference."""
    batch_size: int = 8
    """Pairs per optimizer step (drawn with replacement)."""
    max_length: int = 1024
    """Most tokens of one example (prompt + target); longer targets are cut."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Steps, optimizer, checkpoints, seed and device."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.data.validate()
        self.loop.validate()
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError("PESFTConfig: batch_size >= 1 and max_length >= 2")
        if isinstance(self.model, Path) and not self.model.is_dir():
            raise ValueError(f"PESFTConfig.model {self.model} is not a local directory")


def pe_sft_step(model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
    """The SFT loss of one batch: mean cross-entropy over the labelled (target) tokens.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels``, each (B, T), labels
    -100 where there is no loss (see :func:`encode_pair`). Metrics: ``loss``;
    ``token_accuracy``, the fraction of labelled tokens that are the model's argmax;
    ``tokens``, the number of labelled tokens.
    """
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)  # (B, T)
    labels = batch["labels"].to(device)  # (B, T)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
    logits = logits[:, :-1].float()  # (B, T - 1, V): the prediction of the next token
    targets = labels[:, 1:]  # (B, T - 1)
    labelled = targets != IGNORE_INDEX  # (B, T - 1)
    tokens = int(labelled.sum())
    if tokens == 0:
        raise ValueError("a batch without labelled tokens")
    loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == targets) & labelled  # (B, T - 1)
        metrics = {
            "loss": float(loss.detach()),
            "token_accuracy": float(correct.sum()) / tokens,
            "tokens": float(tokens),
        }
    return StepOutput(loss=loss, metrics=metrics)


def build_pe_sft(config: PESFTConfig, out: Path) -> Objective:
    """The SFT objective of ``config``: the causal LM and a step on pairs drawn at random."""
    base = prepare_base(config.model, out)
    model, tokenizer = load_causal_lm(
        base, init_from=config.init_from, device=config.loop.device, trainable=True
    )
    examples = [
        encode_pair(
            tokenizer,
            terse,
            rich,
            system_prompt=config.system_prompt,
            max_length=config.max_length,
            enable_thinking=config.enable_thinking,
        )
        for terse, rich in load_pairs(config.data)
    ]
    pad_id = int(tokenizer.pad_token_id)

    def step(generator: torch.Generator) -> StepOutput:
        index = torch.randint(len(examples), (config.batch_size,), generator=generator)  # (B,)
        batch = collate([examples[i] for i in index.tolist()], pad_id)
        return pe_sft_step(model, batch)

    return Objective(model=model, step=step)

"""The model stack's own formats as parts: a generator directory of ``model/`` (what the
in-process trainer trains), an open_clip reward directory, a causal-LM prompt enhancer
directory (any Hugging Face causal LM with a chat template)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from flywheel.adapters.base import Adapter, AdapterContext, AdapterSettings
from flywheel.ports import PortError
from model.hf_loading import TorchDtype
from model.pipeline import CONFIG_FILE, Generator, GeneratorError
from model.prompt_enhancer import (
    DEFAULT_T2I_SYSTEM,
    PromptEnhancer,
    PromptEnhancerConfig,
    PromptEnhancerError,
)
from model.reward import AlignmentReward, AlignmentRewardConfig, build_alignment_reward

OPEN_CLIP_CONFIG = "open_clip_config.json"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- generator -------------------------------------------------------------------------------


class GeneratorSettings(AdapterSettings):
    path: Path
    """A generator directory of ``model/`` (``config.json``, transformer and VAE weights)."""


class LocalGenerator:
    """A generator directory of ``model/`` (:class:`model.pipeline.Generator`)."""

    def __init__(self, directory: Path, *, device: str = "cpu") -> None:
        if not (directory / CONFIG_FILE).is_file():
            raise PortError("generator", f"{directory}: not a generator directory")
        try:
            self._generator = Generator.load(directory, device=device)
        except (GeneratorError, OSError, RuntimeError) as exc:
            raise PortError("generator", _reason(exc)) from exc
        self._directory = directory

    @property
    def checkpoint(self) -> Path:
        return self._directory

    @property
    def model(self) -> Generator:
        """The loaded generator (the in-process trainer reads its config)."""
        return self._generator

    def generate(
        self, prompts: Sequence[str], *, seed: int, input_images: Tensor | None = None
    ) -> Tensor:
        return self._generator.generate(list(prompts), seed=seed, input_images=input_images).cpu()


GENERATOR = Adapter(
    settings=GeneratorSettings,
    build=lambda s, c: LocalGenerator(c.path(s.path), device=c.device),
    summary="a generator directory of flywheel's model stack (trainable in-process)",
)


# ---- reward ----------------------------------------------------------------------------------


class RewardSettings(AdapterSettings):
    path: Path
    """An open_clip local directory (``open_clip_config.json`` and its weights)."""


class LocalReward:
    """An open_clip alignment reward: the cosine of image and prompt embeddings."""

    def __init__(self, directory: Path) -> None:
        if not (directory / OPEN_CLIP_CONFIG).is_file():
            raise PortError("reward", f"{directory}: not an open_clip directory")
        try:
            self._reward = build_alignment_reward(
                AlignmentRewardConfig(architecture=f"local-dir:{directory}")
            )
        except (ValueError, OSError, RuntimeError) as exc:
            raise PortError("reward", f"{directory}: {_reason(exc)}") from exc
        self._directory = directory

    @property
    def checkpoint(self) -> Path:
        return self._directory

    @property
    def model(self) -> AlignmentReward:
        return self._reward

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            return self._reward.score(images, list(prompts))


REWARD = Adapter(
    settings=RewardSettings,
    build=lambda s, c: LocalReward(c.path(s.path)),
    summary="an open_clip reward directory",
)


# ---- prompt enhancer -------------------------------------------------------------------------


class EnhancerSettings(AdapterSettings):
    path: Path
    """A Hugging Face causal-LM directory whose tokenizer has a chat template."""
    system_prompt: str = DEFAULT_T2I_SYSTEM
    """The system instruction the enhancer was (or will be) trained with."""
    max_input_tokens: int = Field(default=1024, ge=16)
    """Most tokens of one rendered input; longer prompts are cut to fit."""
    max_new_tokens: int = Field(default=512, ge=1)
    """Most tokens generated per prompt."""
    batch_size: int = Field(default=8, ge=1)
    """Prompts per generate call."""
    dtype: TorchDtype = "float32"
    """Weights dtype (``float32``, ``bfloat16``, ``float16``)."""
    enable_thinking: bool | None = None
    """Passed to the chat template (Qwen3: ``false`` for no thinking turn)."""


class LocalEnhancer:
    """A causal-LM prompt enhancer, decoding greedily (the same prompt, the same rewrite)."""

    def __init__(self, config: PromptEnhancerConfig) -> None:
        if not (config.path / "config.json").is_file():
            raise PortError("enhancer", f"{config.path}: not a model directory (no config.json)")
        try:
            self._enhancer = PromptEnhancer.load(config)
        except (PromptEnhancerError, ValueError, OSError) as exc:
            raise PortError("enhancer", f"{config.path}: {_reason(exc)}") from exc
        self._directory = config.path

    @property
    def checkpoint(self) -> Path:
        return self._directory

    @property
    def model(self) -> PromptEnhancer:
        return self._enhancer

    def enhance(self, prompts: Sequence[str]) -> list[str]:
        return self._enhancer.enhance(list(prompts))


def _enhancer(settings: EnhancerSettings, context: AdapterContext) -> LocalEnhancer:
    return LocalEnhancer(
        PromptEnhancerConfig(
            path=context.path(settings.path),
            system_prompt_t2i=settings.system_prompt,
            max_input_tokens=settings.max_input_tokens,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            dtype=settings.dtype,
            enable_thinking=settings.enable_thinking,
        )
    )


ENHANCER = Adapter(
    settings=EnhancerSettings,
    build=_enhancer,
    summary="a Hugging Face causal-LM prompt enhancer directory",
)

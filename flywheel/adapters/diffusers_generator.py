"""A team's diffusers pipeline directory as the generator port, run through diffusers itself.

The directory is what ``DiffusionPipeline.save_pretrained`` writes: ``model_index.json`` and
one folder per component. Any pipeline whose ``__call__`` takes ``prompt``, ``generator`` and
``output_type`` serves text-to-image: the Qwen-Image family (``QwenImagePipeline``,
``QwenImage21Pipeline``, ``QwenImageEditPipeline``, ``QwenImageEditPlusPipeline``) and the
other text-to-image pipelines alike. A pipeline whose ``__call__`` also takes ``image`` (an
edit pipeline, or ``QwenImage21Pipeline``, which does both) serves editing too.

It is loaded once, with ``DiffusionPipeline.from_pretrained(path, local_files_only=True,
dtype=...)`` (never a hub), and moved to the project's device. Settings are passed to the
pipeline's call only where its signature takes them; a setting given explicitly that the
call does not take is refused when the part is built, as is a ``call_kwargs`` key it does
not take.

Seeding: the prompts are cut into batches of ``batch_size``; batch ``b`` (0-based) is drawn
with its own ``torch.Generator(device).manual_seed(seed + b)``, so the same prompts, seed and
batch size give the same images, and an image depends on its batch alone. Editing calls the
pipeline once per prompt with its own input image (the pipelines take one set of condition
images per call), each call a batch of its own: edit ``i`` is drawn with ``seed + i``.

Images come back ``(N, 3, H, W)`` float32 in [0, 1] on the CPU whatever the pipeline returns
(tensors, arrays or PIL images); of a four-channel (RGBA) output the colour channels are kept.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field, JsonValue, field_validator
from torch import Tensor

from flywheel.adapters.base import Adapter, AdapterContext, AdapterSettings
from flywheel.ports import PortError
from model.hf_loading import TorchDtype
from model.torchvision_compat import import_torchvision

MODEL_INDEX = "model_index.json"

# Call arguments the adapter sets itself on every call.
_ADAPTER_ARGUMENTS = frozenset(
    {"prompt", "image", "generator", "output_type", "return_dict", "num_images_per_prompt"}
)
# Call arguments with a setting of their own.
_SETTING_ARGUMENTS = (
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "true_cfg_scale",
    "negative_prompt",
)
# What every pipeline this adapter drives must take.
_REQUIRED_ARGUMENTS = ("prompt", "generator", "output_type")
_REASON_LIMIT = 300


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), kept short."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 3] + "..."


class DiffusersGeneratorSettings(AdapterSettings):
    """The ``[generator]`` section of ``adapter = "diffusers"``."""

    path: Path
    """The pipeline directory (``model_index.json`` plus a folder per component, as
    ``save_pretrained`` writes it); relative to the project file."""
    height: int | None = Field(default=None, ge=1)
    """Image height in pixels; None: the pipeline's default (1024 for the Qwen-Image family;
    when editing, QwenImage21Pipeline derives it from the input image)."""
    width: int | None = Field(default=None, ge=1)
    """Image width in pixels; None: the pipeline's default."""
    num_inference_steps: int | None = Field(default=None, ge=1)
    """Denoising steps; None: the pipeline's default (50 for QwenImagePipeline, 40 for
    QwenImage21Pipeline)."""
    guidance_scale: float | None = Field(default=None, ge=0)
    """The call's ``guidance_scale`` (classifier-free guidance in most pipelines; embedded
    guidance in guidance-distilled ones); None: not passed."""
    true_cfg_scale: float | None = Field(default=None, ge=0)
    """The Qwen-Image pipelines' true classifier-free guidance scale (guidance runs only with
    a ``negative_prompt`` and a scale above 1); None: the pipeline's default when a
    ``negative_prompt`` is set, else 1 (no guidance, which is what those pipelines do
    without a negative prompt anyway)."""
    negative_prompt: str | None = None
    """The negative prompt of every call (Qwen-Image's examples use ``" "``); None: none."""
    dtype: TorchDtype = "bfloat16"
    """Weights dtype: ``float32``, ``bfloat16`` (what the Qwen-Image checkpoints ship) or
    ``float16``."""
    batch_size: int = Field(default=1, ge=1)
    """Prompts per pipeline call (text-to-image; editing is one prompt per call)."""
    call_kwargs: dict[str, JsonValue] = Field(default_factory=dict)
    """Further keyword arguments of every call, passed as they are (e.g.
    ``{ max_sequence_length = 512 }``, or ``{ output_resolution = 1024 }`` for
    QwenImage21Pipeline); each must be one the pipeline's ``__call__`` takes, and none that
    the adapter sets (prompts, images, generator, output type) or that has its own setting
    above."""

    @field_validator("call_kwargs")
    @classmethod
    def _not_managed(cls, value: dict[str, JsonValue]) -> dict[str, JsonValue]:
        managed = sorted(set(value) & _ADAPTER_ARGUMENTS)
        if managed:
            raise ValueError(f"{', '.join(managed)}: set by the adapter on every call")
        own = sorted(set(value) & set(_SETTING_ARGUMENTS))
        if own:
            raise ValueError(f"{', '.join(own)}: use the setting of that name instead")
        return value


class DiffusersGenerator:
    """A loaded diffusers pipeline, called with the settings' arguments and seeded batches."""

    def __init__(self, directory: Path, settings: DiffusersGeneratorSettings, *, device: str):
        self._directory = directory
        self._settings = settings
        self._device = device
        self._pipeline = _load_pipeline(directory, settings.dtype, device)
        self._name = type(self._pipeline).__name__
        parameters = inspect.signature(type(self._pipeline).__call__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

        def takes(name: str) -> bool:
            return takes_any or name in parameters

        missing = [name for name in _REQUIRED_ARGUMENTS if not takes(name)]
        if missing:
            raise PortError(
                "generator",
                f"{directory}: {self._name} is not a text-to-image pipeline (its call takes no "
                f"{', '.join(missing)})",
            )
        self._edits = takes("image")
        self._kwargs = self._call_kwargs(takes)

    def _call_kwargs(self, takes: Callable[[str], bool]) -> dict[str, Any]:
        """The arguments every call gets from the settings; refuses what the call does not
        take."""
        settings = self._settings
        given: dict[str, Any] = {
            name: getattr(settings, name)
            for name in _SETTING_ARGUMENTS
            if name != "negative_prompt" and getattr(settings, name) is not None
        }
        named = [*given, *settings.call_kwargs]
        if settings.negative_prompt is not None:
            named.append("negative_prompt")
        refused = sorted(name for name in named if not takes(name))
        if refused:
            raise PortError(
                "generator",
                f"{self._directory}: {self._name}'s call takes no {', '.join(refused)} "
                "(remove it from the [generator] section)",
            )
        if (
            settings.true_cfg_scale is None
            and settings.negative_prompt is None
            and takes("true_cfg_scale")
        ):
            given["true_cfg_scale"] = 1.0  # no negative prompt: no guidance, and no warning
        return {**given, **settings.call_kwargs}

    @property
    def checkpoint(self) -> Path:
        """The pipeline directory."""
        return self._directory

    @property
    def pipeline(self) -> Any:
        """The loaded diffusers pipeline."""
        return self._pipeline

    @property
    def edits(self) -> bool:
        """Whether the pipeline takes input images (an edit pipeline)."""
        return self._edits

    def generate(
        self, prompts: Sequence[str], *, seed: int, input_images: Tensor | None = None
    ) -> Tensor:
        """Images ``(N, 3, H, W)`` in [0, 1] for ``prompts`` (with ``input_images``
        ``(N, 3, H, W)`` in [0, 1]: edits of them); seeded per batch (see the module doc)."""
        prompts = list(prompts)
        if not prompts:
            raise PortError("generator", "no prompts to generate images for")
        calls: list[tuple[list[str], dict[str, Any]]]
        if input_images is None:
            size = self._settings.batch_size
            calls = [(prompts[i : i + size], {}) for i in range(0, len(prompts), size)]
        else:
            if not self._edits:
                raise PortError(
                    "generator", f"{self._directory}: {self._name} does not edit images"
                )
            if input_images.ndim != 4 or input_images.shape[1] != 3:
                raise PortError(
                    "generator",
                    f"input images must be (N, 3, H, W), got {tuple(input_images.shape)}",
                )
            if input_images.shape[0] != len(prompts):
                raise PortError(
                    "generator", f"{input_images.shape[0]} input images for {len(prompts)} prompts"
                )
            calls = [
                ([prompt], {"image": _to_pil(image)})
                for prompt, image in zip(prompts, input_images, strict=True)
            ]
        images = [
            self._call(batch, extra, seed + index) for index, (batch, extra) in enumerate(calls)
        ]
        shapes = {tuple(batch.shape[1:]) for batch in images}
        if len(shapes) > 1:
            raise PortError("generator", f"{self._name} returned images of sizes {sorted(shapes)}")
        return torch.cat(images)

    def _call(self, prompts: list[str], extra: dict[str, Any], seed: int) -> Tensor:
        """One pipeline call: ``(len(prompts), 3, H, W)`` in [0, 1] on the CPU."""
        kwargs = {**self._kwargs, **extra, "prompt": prompts, "output_type": "pt"}
        if self._settings.negative_prompt is not None:
            kwargs["negative_prompt"] = [self._settings.negative_prompt] * len(prompts)
        try:
            kwargs["generator"] = torch.Generator(self._device).manual_seed(seed)
            output = self._pipeline(**kwargs)
            images = output.images if hasattr(output, "images") else output[0]
            return _as_tensor(images, len(prompts))
        except PortError:
            raise
        except Exception as exc:  # third-party code: anything it raises is this part failing
            raise PortError("generator", f"{self._name} failed: {_reason(exc)}") from exc


def _load_pipeline(directory: Path, dtype: TorchDtype, device: str) -> Any:
    """The pipeline in ``directory`` on ``device``; :class:`PortError` (one line) when there is
    none or it does not load."""
    if not directory.is_dir():
        raise PortError("generator", f"{directory}: no such directory")
    if not (directory / MODEL_INDEX).is_file():
        raise PortError(
            "generator", f"{directory}: not a diffusers pipeline directory (no {MODEL_INDEX})"
        )
    try:
        import_torchvision()  # diffusers -> transformers -> torchvision: see that module
        from diffusers import DiffusionPipeline
    except ImportError as exc:
        raise PortError("generator", f"diffusers is not installed ({_reason(exc)})") from exc
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            str(directory), local_files_only=True, dtype=getattr(torch, dtype)
        )
        pipeline = pipeline.to(device)
    except Exception as exc:  # third-party loading: anything it raises means "does not load"
        raise PortError(
            "generator", f"{directory}: does not load ({type(exc).__name__}: {_reason(exc)})"
        ) from exc
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _to_pil(image: Tensor) -> Image.Image:
    """A ``(3, H, W)`` image in [0, 1] as an RGB PIL image."""
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())  # (H, W, 3) uint8: RGB


def _as_tensor(images: Any, count: int) -> Tensor:
    """A pipeline's images (a tensor, an array or PIL images) as ``(N, 3, H, W)`` in [0, 1]."""
    if isinstance(images, Tensor):
        batch = images.detach().float().cpu()
        if batch.ndim == 4 and batch.shape[1] not in (1, 3, 4) and batch.shape[-1] in (1, 3, 4):
            batch = batch.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    elif isinstance(images, np.ndarray):  # diffusers' "np": (N, H, W, C) floats in [0, 1]
        array = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
        batch = torch.from_numpy(array).permute(0, 3, 1, 2)
    elif isinstance(images, list) and all(isinstance(i, Image.Image) for i in images):
        arrays = [np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    else:
        raise PortError("generator", f"the pipeline returned {type(images).__name__}, not images")
    if batch.ndim != 4 or batch.shape[1] not in (1, 3, 4) or batch.shape[0] != count:
        raise PortError(
            "generator", f"the pipeline returned images {tuple(batch.shape)} for {count} prompts"
        )
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    return batch[:, :3].clamp(0, 1).contiguous()


def _build(settings: DiffusersGeneratorSettings, context: AdapterContext) -> DiffusersGenerator:
    return DiffusersGenerator(context.path(settings.path), settings, device=context.device)


GENERATOR = Adapter(
    settings=DiffusersGeneratorSettings,
    build=_build,
    summary="a diffusers pipeline directory (model_index.json), e.g. the Qwen-Image family",
)

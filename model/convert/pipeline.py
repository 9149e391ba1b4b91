"""A diffusers ``QwenImage21Pipeline`` directory into a generator directory of ours.

:func:`convert_pipeline` reads the pipeline's ``model_index.json`` and writes what
:meth:`model.pipeline.Generator.load` reads:

- ``transformer.safetensors`` and ``vae.safetensors``: its ``QwenImage21Transformer2DModel``
  and ``AutoencoderKLQwenImage21`` converted with :mod:`model.convert.transformer` and
  :mod:`model.convert.vae` (tensors keep their dtype);
- ``condition/``: the condition encoder, the pipeline's own Qwen3-VL text encoder. Its
  ``text_encoder/`` files (config and weights) and its processor's tokenizer files are linked
  (hard links; copies across file systems) into one directory, because
  :class:`model.condition.ConditionEncoder` reads model and tokenizer from one place. The
  generator config names it ``condition = "qwen3-vl"`` (:func:`model.condition.qwen3_vl_condition`:
  the same system turn dropped, the final norm's input, left padding, as the pipeline encodes
  prompts) with ``condition_path`` its absolute path: ``Generator.load`` resolves a relative
  one against the working directory, not the generator directory, so a converted directory
  that moves keeps pointing at the ``condition/`` where it was written;
- ``generator.json``: those configs, the image size, and the sampler from the pipeline's
  ``FlowMatchEulerDiscreteScheduler`` config (steps, static or dynamic shift, shift terminal)
  with QwenImage21Pipeline's defaults: 40 steps, true CFG off (scale 1) and, when guiding,
  plain CFG without renorm (``cfg_renorm = "none"``), as that pipeline combines.

Text-to-image then samples what the pipeline samples: the same condition, noise drawn in the
same order from the same seed (a CPU ``torch.Generator``), the same sigma grid and Euler
steps, the same decode. Editing does not: the pipeline shows the input images to its
vision-language encoder as well as to the transformer, while our condition encoder reads text
only (the input images reach the transformer as latents alone).

:func:`export_pipeline` goes back: a trained transformer of ours, written as a copy of the
pipeline it was converted from (every other file hard-linked) whose ``transformer/`` holds it
converted with :func:`~model.convert.transformer.transformer_to_diffusers`, each tensor in
the dtype the pipeline stored it in. Converting a pipeline and exporting its untrained
transformer gives back the pipeline's transformer weights exactly.

What does not convert raises :class:`~model.convert.checkpoint.ConversionError`: another
pipeline class or component, a scheduler option our sampler lacks (Karras / exponential /
beta sigmas, linear time shift, inverted sigmas, stochastic sampling), a ``sample_sigmas``
grid other than the default one, or a text encoder whose width is not the transformer's
condition width.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from model.convert.checkpoint import (
    DIFFUSERS_WEIGHTS_NAME,
    CheckpointError,
    ConversionError,
    StateDict,
    _weight_files,
    read_config,
    read_state_dict,
    write_checkpoint,
)
from model.convert.transformer import transformer_from_diffusers, transformer_to_diffusers
from model.convert.vae import vae_from_diffusers
from model.pipeline import CONFIG_FILE, TRANSFORMER_FILE, VAE_FILE, GeneratorConfig
from model.sampling import SamplerConfig
from model.transformer import TransformerConfig

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "QwenImage21Pipeline"
CONDITION_DIR = "condition"
SCHEDULER_CONFIG = "scheduler_config.json"

# Component folder -> the class it must hold.
_COMPONENTS = {
    "transformer": "QwenImage21Transformer2DModel",
    "vae": "AutoencoderKLQwenImage21",
    "text_encoder": "Qwen3VLForConditionalGeneration",
    "scheduler": "FlowMatchEulerDiscreteScheduler",
}
# Processor files that are not the tokenizer's (left out of the condition directory).
_NOT_TOKENIZER = frozenset(
    {"processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"}
)
# QwenImage21Pipeline.__call__'s num_inference_steps default.
_DEFAULT_STEPS = 40
# Scheduler options our sampler cannot express: config key -> the only value it takes.
_SCHEDULER_FIXED: dict[str, Any] = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
}


def convert_pipeline(
    pipeline_dir: Path,
    out_dir: Path,
    *,
    height: int = 1024,
    width: int = 1024,
    steps: int | None = None,
) -> Path:
    """Convert the ``QwenImage21Pipeline`` directory ``pipeline_dir`` into a generator directory
    at ``out_dir`` (absent or empty) that :meth:`model.pipeline.Generator.load` reads; returns
    ``out_dir``.

    ``height`` / ``width`` are the images' size (QwenImage21Pipeline's default is 1024);
    ``steps`` the sampler's steps (None: the length of the pipeline's ``sample_sigmas``, else
    its call's default, 40). Nothing heavy is loaded: weights are read as tensors and the
    condition encoder's files are linked. ``generator.json`` is written last: a directory with
    one holds complete weights.
    """
    pipeline_dir = Path(pipeline_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: not an empty directory")
    index = _read_index(pipeline_dir)
    sampler = _sampler(pipeline_dir, index, steps)
    transformer_config, transformer_state = transformer_from_diffusers(
        read_state_dict(pipeline_dir / "transformer"), read_config(pipeline_dir / "transformer")
    )
    vae_config, vae_state = vae_from_diffusers(
        read_state_dict(pipeline_dir / "vae"), read_config(pipeline_dir / "vae")
    )
    text_config = read_config(pipeline_dir / "text_encoder")
    text_width = _text_width(text_config)
    if text_width != transformer_config.condition_dim:
        raise ConversionError(
            f"{pipeline_dir}: the text encoder is {text_width}-d, the transformer reads "
            f"context_in_dim={transformer_config.condition_dim}"
        )
    condition = out_dir.resolve() / CONDITION_DIR
    config = GeneratorConfig(
        transformer=transformer_config,
        vae=vae_config,
        condition="qwen3-vl",
        condition_path=str(condition),
        height=height,
        width=width,
        sampler=sampler,
    )
    try:
        config.validate()
    except ValueError as error:
        raise ConversionError(f"{pipeline_dir}: {error}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    _link_condition(pipeline_dir, index, condition)
    _save(transformer_state, out_dir / TRANSFORMER_FILE)
    _save(vae_state, out_dir / VAE_FILE)
    partial = out_dir / f".{CONFIG_FILE}.partial"
    partial.write_text(json.dumps(asdict(config), indent=1) + "\n")
    os.replace(partial, out_dir / CONFIG_FILE)
    return out_dir


def check_pipeline(pipeline_dir: Path) -> None:
    """Raise :class:`CheckpointError` (no ``model_index.json``) or :class:`ConversionError`
    (another pipeline class or component) unless ``pipeline_dir`` is a pipeline that
    :func:`convert_pipeline` converts (its scheduler is checked when converting)."""
    _read_index(Path(pipeline_dir))


def export_pipeline(
    pipeline_dir: Path,
    transformer: Mapping[str, Tensor],
    config: TransformerConfig,
    out_dir: Path,
    *,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write ``out_dir`` (absent) as the ``QwenImage21Pipeline`` directory ``pipeline_dir``
    with its transformer replaced by ``transformer`` (our state dict, for ``config``); returns
    ``out_dir``.

    Every file but ``transformer/`` is hard-linked from ``pipeline_dir`` (copied across file
    systems); ``transformer/`` gets the weights converted to diffusers' names, each tensor in
    the dtype ``pipeline_dir`` stores it in (sharded above ``max_shard_size``), and its
    ``config.json`` is the pipeline's with ``config`` converted over it. The directory is
    written as a hidden sibling and renamed into place: ``out_dir`` is complete or absent.
    """
    pipeline_dir = Path(pipeline_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        raise CheckpointError(f"{out_dir}: already exists")
    _read_index(pipeline_dir)
    diffusers_config, state = transformer_to_diffusers(transformer, config)
    source = pipeline_dir / "transformer"
    dtypes = stored_dtypes(_weight_files(source))
    tensors = {
        name: tensor.detach().to(device="cpu", dtype=dtypes.get(name, tensor.dtype))
        for name, tensor in state.items()
    }
    document = {**read_config(source), **diffusers_config}
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    link_tree(pipeline_dir, partial, skip=[source])
    write_checkpoint(
        partial / "transformer",
        config=document,
        state_dict=tensors,
        weights_name=DIFFUSERS_WEIGHTS_NAME,
        max_shard_size=max_shard_size,
    )
    os.rename(partial, out_dir)
    return out_dir


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def stored_dtypes(files: Iterable[Path]) -> dict[str, torch.dtype]:
    """Tensor name -> the dtype it is stored in, read from the headers of safetensors
    ``files`` (nothing else is read); tensors of non-float dtypes are left out."""
    dtypes: dict[str, torch.dtype] = {}
    for path in files:
        with Path(path).open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if name != "__metadata__" else None
            if dtype is not None:
                dtypes[name] = dtype
    return dtypes


def link_tree(source: Path, target: Path, *, skip: Iterable[Path] = ()) -> None:
    """Recreate the directory ``source`` at ``target`` (absent): folders made, files
    hard-linked (symbolic links followed; copied where links fail), nothing under ``skip``."""
    skipped = {Path(p).absolute() for p in skip}
    target.mkdir(parents=True)
    for folder, names, files in os.walk(source, followlinks=True):
        here = Path(folder)
        names[:] = [n for n in sorted(names) if (here / n).absolute() not in skipped]
        destination = target / here.relative_to(source)
        destination.mkdir(exist_ok=True)
        for name in sorted(files):
            if (here / name).absolute() in skipped:
                continue
            try:
                os.link(here / name, destination / name)
            except OSError:  # another file system, or links refused: copy
                shutil.copy2(here / name, destination / name)


def _read_index(pipeline_dir: Path) -> dict[str, Any]:
    """``model_index.json``, checked to be a QwenImage21Pipeline's of the converted classes."""
    if not (pipeline_dir / MODEL_INDEX).is_file():
        raise CheckpointError(
            f"{pipeline_dir}: not a diffusers pipeline directory (no {MODEL_INDEX})"
        )
    index = _read_json(pipeline_dir / MODEL_INDEX)
    name = index.get("_class_name")
    if name != PIPELINE_CLASS:
        raise ConversionError(
            f"{pipeline_dir}: a {name} converts to nothing here; only a {PIPELINE_CLASS} "
            "(QwenImage21Transformer2DModel + AutoencoderKLQwenImage21 + Qwen3-VL) does"
        )
    for component, expected in _COMPONENTS.items():
        entry = index.get(component)
        found = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if found != expected:
            raise ConversionError(
                f"{pipeline_dir}: component {component!r} is {found}, expected {expected}"
            )
    return index


def _sampler(pipeline_dir: Path, index: dict[str, Any], steps: int | None) -> SamplerConfig:
    """Our sampler for the pipeline's scheduler config and default call."""
    scheduler = _read_json(pipeline_dir / "scheduler" / SCHEDULER_CONFIG)
    for key, only in _SCHEDULER_FIXED.items():
        value = scheduler.get(key, only)
        if value != only:
            raise ConversionError(
                f"{pipeline_dir}/scheduler: {key}={value!r} has no counterpart in our sampler "
                f"(only {only!r})"
            )
    sample_sigmas = index.get("sample_sigmas")
    if sample_sigmas is not None:
        count = len(sample_sigmas)
        default = [1.0 - i * (1.0 - 1.0 / count) / max(count - 1, 1) for i in range(count)]
        if count == 0 or any(
            not math.isclose(float(s), d, abs_tol=1e-6)
            for s, d in zip(sample_sigmas, default, strict=True)
        ):
            raise ConversionError(
                f"{pipeline_dir}: sample_sigmas is a custom sigma grid; our sampler builds "
                "linspace(1, 1/steps, steps) only"
            )
        if steps is not None and steps != count:
            raise ConversionError(
                f"{pipeline_dir}: sample_sigmas fixes {count} steps, {steps} were asked for"
            )
        steps = count
    terminal = scheduler.get("shift_terminal")
    config = SamplerConfig(
        steps=_DEFAULT_STEPS if steps is None else steps,
        dynamic_shift=bool(scheduler.get("use_dynamic_shifting", False)),
        shift=float(scheduler.get("shift", 1.0)),
        base_shift=float(scheduler.get("base_shift", 0.5)),
        max_shift=float(scheduler.get("max_shift", 1.15)),
        base_seq_len=int(scheduler.get("base_image_seq_len", 256)),
        max_seq_len=int(scheduler.get("max_image_seq_len", 4096)),
        # diffusers stretches only for a truthy shift_terminal: 0 means none.
        shift_terminal=float(terminal) if terminal else None,
        guidance_scale=1.0,
        cfg_renorm="none",
    )
    try:
        config.validate()
    except ValueError as error:
        raise ConversionError(f"{pipeline_dir}/scheduler: {error}") from None
    return config


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not JSON ({error})") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return document


def _text_width(text_config: dict[str, Any]) -> int:
    """The hidden size of the text encoder's language model."""
    inner = text_config.get("text_config")
    source = inner if isinstance(inner, dict) else text_config
    width = source.get("hidden_size")
    if not isinstance(width, int):
        raise ConversionError("text_encoder/config.json: no hidden_size")
    return width


def _tokenizer_dir(pipeline_dir: Path, index: dict[str, Any]) -> Path:
    """Where the pipeline keeps its tokenizer: ``tokenizer/`` if it has one, else its
    processor's folder."""
    for name in ("tokenizer", "processor"):
        if name in index and (pipeline_dir / name).is_dir():
            return pipeline_dir / name
    raise ConversionError(f"{pipeline_dir}: no tokenizer or processor folder")


def _link_condition(pipeline_dir: Path, index: dict[str, Any], condition: Path) -> None:
    """The text encoder's files and the tokenizer's, linked into ``condition``."""
    condition.mkdir()
    sources = [
        *sorted(p for p in (pipeline_dir / "text_encoder").iterdir() if p.is_file()),
        *sorted(
            p
            for p in _tokenizer_dir(pipeline_dir, index).iterdir()
            if p.is_file() and p.name not in _NOT_TOKENIZER
        ),
    ]
    for source in sources:
        target = condition / source.name
        if target.exists():  # the text encoder's file wins (config.json)
            continue
        try:
            os.link(source, target)
        except OSError:  # another file system, or links refused: copy
            shutil.copy2(source, target)


def _save(state: StateDict, path: Path) -> None:
    """``state`` as safetensors at ``path`` (written aside, then renamed into place)."""
    partial = path.with_name(f".{path.name}.partial")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(partial))
    os.replace(partial, path)

"""Checkpoint directories: ``config.json`` plus safetensors weights, whole or sharded.

diffusers writes ``diffusion_pytorch_model.safetensors`` (or shards named in
``diffusion_pytorch_model.safetensors.index.json``); ours writes ``model.safetensors`` (or
shards with ``model.safetensors.index.json``) next to a ``config.json`` that names the
component and holds its config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as asked."""


class ConversionError(ValueError):
    """A checkpoint or config that the other side cannot represent."""


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def _weight_files(directory: Path) -> list[Path]:
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{directory}: several weight indexes: {[p.name for p in indexes]}")
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{indexes[0]}: no weight_map")
        files = sorted({directory / str(name) for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{directory}: shards named in {indexes[0].name} missing: {missing}"
            )
        return files
    files = sorted(directory.glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(
            f"{directory}: expected one .safetensors file or an index, found {len(files)}"
        )
    return files


def read_state_dict(directory: Path) -> StateDict:
    """All weights of a checkpoint directory, merged from its shards."""
    state: StateDict = {}
    for path in _weight_files(directory):
        try:
            tensors = load_file(path)
        except SafetensorError as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
        for name, tensor in tensors.items():
            if name in state:
                raise CheckpointError(f"{directory}: tensor {name!r} appears in two shards")
            state[name] = tensor
    return state


def write_checkpoint(
    directory: Path,
    *,
    config: dict[str, Any],
    state_dict: StateDict,
    weights_name: str = WEIGHTS_NAME,
    max_shard_size: int | str = "5GB",
) -> list[Path]:
    """Write the weights (sharded above ``max_shard_size``) and then ``config.json``.

    Every file is written under a temporary name, flushed to disk and renamed into place,
    and ``config.json`` comes last: a directory with a config holds complete weights.
    Returns the files written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = weights_name.removesuffix(".safetensors")
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern=stem + "{suffix}.safetensors", max_shard_size=max_shard_size
    )
    written: list[Path] = []
    for filename, names in split.filename_to_tensors.items():
        # Contiguous copies: safetensors refuses views and tensors that share storage.
        shard = {name: state_dict[name].detach().contiguous().clone() for name in names}
        written.append(_durably(directory / filename, _safetensors_writer(shard)))
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        written.append(_durably(directory / f"{weights_name}.index.json", _json_writer(index)))
    written.append(_durably(directory / CONFIG_NAME, _json_writer(config)))
    return written


def _safetensors_writer(tensors: StateDict) -> Callable[[Path], None]:
    return lambda path: save_file(tensors, path, metadata={"format": "pt"})


def _json_writer(document: dict[str, Any]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(document, indent=2, sort_keys=True))

    return write


def _durably(path: Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write`` under a temporary name, fsync, then rename it."""
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    with partial.open("rb") as file:
        os.fsync(file.fileno())
    os.replace(partial, path)
    return path


def check_shapes(
    state_dict: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """Raise :class:`ConversionError` naming missing, unexpected and wrongly shaped tensors."""
    missing = sorted(set(shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(shapes))
    problems = []
    if missing:
        problems.append(f"missing {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {listing(unexpected)}")
    wrong = [
        f"{name}: {tuple(state_dict[name].shape)} != {shape}"
        for name, shape in shapes.items()
        if name in state_dict and tuple(state_dict[name].shape) != shape
    ]
    if wrong:
        problems.append(f"wrong shapes {listing(wrong)}")
    if problems:
        raise ConversionError(f"{what} does not match the config: " + "; ".join(problems))


def listing(items: list[str], *, limit: int = 10) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")

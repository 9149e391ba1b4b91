"""Whole checkpoint directories: a diffusers Qwen-Image-2.1 component into ours, and back.

Ours is ``config.json`` = ``{"format": "flywheel-checkpoint/1", "component": ...,
"config": <the component's config dataclass as JSON>}`` plus ``model.safetensors``
(sharded with an index above ``max_shard_size``). Tensors keep their dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from torch import Tensor

from model.convert.checkpoint import (
    DIFFUSERS_WEIGHTS_NAME,
    CheckpointError,
    StateDict,
    read_config,
    read_state_dict,
    write_checkpoint,
)
from model.convert.transformer import transformer_from_diffusers, transformer_to_diffusers
from model.convert.vae import vae_from_diffusers, vae_to_diffusers
from model.transformer import TransformerConfig
from model.vae import VAEConfig

FORMAT = "flywheel-checkpoint/1"


@dataclass(frozen=True, slots=True)
class Component:
    """A model component that converts between diffusers' layout and ours."""

    name: str
    diffusers_class: str
    config_type: type[Any]
    from_diffusers: Callable[[Mapping[str, Tensor], Mapping[str, Any]], tuple[Any, StateDict]]
    to_diffusers: Callable[[Mapping[str, Tensor], Any], tuple[dict[str, Any], StateDict]]


COMPONENTS: tuple[Component, ...] = (
    Component(
        name="transformer",
        diffusers_class="QwenImage21Transformer2DModel",
        config_type=TransformerConfig,
        from_diffusers=transformer_from_diffusers,
        to_diffusers=transformer_to_diffusers,
    ),
    Component(
        name="vae",
        diffusers_class="AutoencoderKLQwenImage21",
        config_type=VAEConfig,
        from_diffusers=vae_from_diffusers,
        to_diffusers=vae_to_diffusers,
    ),
)


@dataclass(frozen=True, slots=True)
class Converted:
    """What a conversion wrote."""

    component: str
    files: list[Path]
    tensors: int


def _component(*, name: str | None = None, diffusers_class: str | None = None) -> Component:
    for component in COMPONENTS:
        if name is not None and component.name == name:
            return component
        if diffusers_class is not None and component.diffusers_class == diffusers_class:
            return component
    known = ", ".join(c.diffusers_class if diffusers_class else c.name for c in COMPONENTS)
    raise CheckpointError(f"unsupported component {name or diffusers_class!r} (supported: {known})")


def convert_from_diffusers(
    source: Path, out: Path, *, max_shard_size: int | str = "5GB"
) -> Converted:
    """Convert a diffusers checkpoint directory (``config.json`` + safetensors) into ours."""
    diffusers_config = read_config(source)
    class_name = diffusers_config.get("_class_name")
    if not isinstance(class_name, str):
        raise CheckpointError(f"{source}/config.json: no _class_name: not a diffusers checkpoint")
    component = _component(diffusers_class=class_name)
    config, state = component.from_diffusers(read_state_dict(source), diffusers_config)
    document = {
        "format": FORMAT,
        "component": component.name,
        "config": TypeAdapter(component.config_type).dump_python(config, mode="json"),
    }
    files = write_checkpoint(out, config=document, state_dict=state, max_shard_size=max_shard_size)
    return Converted(component=component.name, files=files, tensors=len(state))


def read_component(directory: Path) -> tuple[str, Any, StateDict]:
    """(component name, config dataclass, state dict) of one of our checkpoint directories."""
    document = read_config(directory)
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: not a {FORMAT} checkpoint")
    component = _component(name=str(document.get("component")))
    raw = document.get("config")
    expected = {f.name for f in fields(component.config_type)}
    if not isinstance(raw, dict) or set(raw) != expected:
        given = set(raw) if isinstance(raw, dict) else set()
        raise CheckpointError(
            f"{directory}/config.json: invalid config: unknown {sorted(given - expected)}, "
            f"missing {sorted(expected - given)}"
        )
    try:
        config = TypeAdapter(component.config_type).validate_python(raw)
    except ValidationError as error:
        raise CheckpointError(f"{directory}/config.json: invalid config: {error}") from None
    return component.name, config, read_state_dict(directory)


def convert_to_diffusers(
    source: Path, out: Path, *, max_shard_size: int | str = "5GB"
) -> Converted:
    """Convert one of our checkpoint directories into a diffusers one."""
    name, config, state = read_component(source)
    component = _component(name=name)
    diffusers_config, converted = component.to_diffusers(state, config)
    files = write_checkpoint(
        out,
        config={"_class_name": component.diffusers_class, **diffusers_config},
        state_dict=converted,
        weights_name=DIFFUSERS_WEIGHTS_NAME,
        max_shard_size=max_shard_size,
    )
    return Converted(component=name, files=files, tensors=len(converted))

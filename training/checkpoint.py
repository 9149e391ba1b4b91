"""Resumable training checkpoints: weights, optimizer, step, RNG states and data position.

Layout of a checkpoint directory::

    <dir>/step-<NNNNNNNN>/model.safetensors       the model's state dict
    <dir>/step-<NNNNNNNN>/optimizer.safetensors   every tensor of the optimizer's state dict
    <dir>/step-<NNNNNNNN>/rng.safetensors         RNG states (uint8 tensors), by name
    <dir>/step-<NNNNNNNN>/data.safetensors        the tensors of the data state (e.g. a
                                                  rollout buffer), named by key
    <dir>/step-<NNNNNNNN>/state.json              step, the optimizer state's and the data
                                                  state's structure (their tensors named by
                                                  key), extra
    <dir>/latest                                  name of the newest complete checkpoint

A checkpoint is written into a temporary directory that is renamed into place with
``os.replace`` after its files are fsynced; ``latest`` is rewritten (also through a temporary
file, :mod:`training.io`) last, so a run killed at any moment leaves ``latest`` naming a
complete checkpoint (or no ``latest`` at all).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim import Optimizer

from training.io import atomic_write_text, fsync_directory, fsync_tree

LATEST_FILE = "latest"
CHECKPOINT_VERSION = 2
_STEP_RE = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be written or read as asked."""


@dataclass(kw_only=True, slots=True)
class Checkpoint:
    """A loaded checkpoint (tensors on the CPU)."""

    path: Path
    """The ``step-NNNNNNNN`` directory it was read from."""
    step: int
    """Optimizer steps taken when it was written."""
    model: dict[str, Tensor]
    """The model's state dict."""
    optimizer: dict[str, Any]
    """The optimizer's state dict, as ``Optimizer.load_state_dict`` takes it."""
    rng: dict[str, Tensor]
    """RNG states by name (e.g. a ``torch.Generator``'s ``get_state()``)."""
    data: dict[str, Any]
    """Position of the data stream and any objective state that goes with it (nested dicts,
    lists, tuples, scalars, strings and tensors)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else the trainer stored (JSON-able)."""


def step_name(step: int) -> str:
    """Directory name of the checkpoint at ``step``."""
    return f"step-{step:08d}"


# ---- the optimizer state as flat tensors plus a JSON structure --------------------------


def _flatten(value: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """JSON for ``value`` where every tensor is moved to ``tensors`` and named by its key."""
    if isinstance(value, Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        items = [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in value.items()]
        if not all(isinstance(k, (str, int)) for k, _ in items):
            raise CheckpointError(f"{key}: only str and int keys can be stored")
        return {"__dict__": items}
    if isinstance(value, (list, tuple)):
        kind = "__list__" if isinstance(value, list) else "__tuple__"
        return {kind: [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"{key}: cannot store a {type(value).__name__}")


def _unflatten(value: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of :func:`_flatten`."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {k: _unflatten(v, tensors) for k, v in value["__dict__"]}
        if "__list__" in value:
            return [_unflatten(v, tensors) for v in value["__list__"]]
        if "__tuple__" in value:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
        raise CheckpointError(f"unknown structure entry {sorted(value)}")
    return value


# ---- writing and reading ----------------------------------------------------------------


def _separate_storages(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU copies of ``state`` in which no two tensors share memory, as safetensors requires.

    Tied weights (an LM's embeddings and head) come out as two equal tensors; loading them
    back writes the same values into the one parameter twice.
    """
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``directory`` (what ``latest`` names), or None."""
    root = Path(directory)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not _STEP_RE.match(name) or not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint")
    return path


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    step: int,
    model: nn.Module,
    optimizer: Optimizer,
    rng: dict[str, Tensor],
    data: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write the checkpoint of ``step`` under ``directory`` and point ``latest`` at it.

    ``keep``: how many checkpoints to keep (the oldest are removed after ``latest`` is
    written); None keeps all. Returns the checkpoint's directory.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    current = latest_checkpoint(root)
    if current is not None and current.name == final.name:
        raise CheckpointError(f"{final} is already the latest checkpoint")
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():  # left by a run killed while writing
        shutil.rmtree(tmp)
    tmp.mkdir()

    model_state = _separate_storages(model.state_dict())
    save_file(model_state, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    optimizer_tensors: dict[str, Tensor] = {}
    structure = _flatten(optimizer.state_dict(), "optimizer", optimizer_tensors)
    save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors")
    )
    data_tensors: dict[str, Tensor] = {}
    data_structure = _flatten(data, "data", data_tensors)
    save_file(data_tensors, str(tmp / "data.safetensors"))
    state = {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "optimizer": structure,
        "data": data_structure,
        "extra": extra or {},
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))

    if final.exists():  # written by a run killed before it moved `latest` to it
        shutil.rmtree(final)
    fsync_tree(tmp)  # the files are on disk before the rename makes them the checkpoint
    os.replace(tmp, final)
    fsync_directory(root)
    atomic_write_text(root / LATEST_FILE, final.name)

    if keep is not None:
        steps = sorted(p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name))
        for old in steps[: max(0, len(steps) - keep)]:
            if old.name != final.name:
                shutil.rmtree(old)
    return final


def load_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint | None:
    """The latest checkpoint under ``directory`` (see :func:`latest_checkpoint`), or None."""
    path = latest_checkpoint(directory)
    if path is None:
        return None
    try:
        state = json.loads((path / "state.json").read_text())
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is unknown")
        optimizer_tensors = load_file(str(path / "optimizer.safetensors"))
        return Checkpoint(
            path=path,
            step=int(state["step"]),
            model=load_file(str(path / "model.safetensors")),
            optimizer=_unflatten(state["optimizer"], optimizer_tensors),
            rng=load_file(str(path / "rng.safetensors")),
            data=_unflatten(state["data"], load_file(str(path / "data.safetensors"))),
            extra=state["extra"],
        )
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from exc


def load_model_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The model state dict a later run starts from (``init_from``), found at ``path``.

    ``path`` is a training run's output directory (its ``checkpoints/`` latest is read), a
    checkpoint directory (its ``latest``), one ``step-NNNNNNNN`` checkpoint, or a
    ``.safetensors`` file of the weights (a generator directory's ``transformer.safetensors``).
    """
    root = Path(path)
    if root.suffix == ".safetensors" and root.is_file():
        try:
            return load_file(str(root))
        except (SafetensorError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{root}: unreadable model weights ({reason})") from exc
    if (root / "model.safetensors").is_file():
        step_dir = root
    else:
        candidates = [root / "checkpoints", root]
        found = next((p for p in candidates if (p / LATEST_FILE).is_file()), None)
        if found is None:
            raise CheckpointError(
                f"{root}: no checkpoint here (expected a run directory, its checkpoints/, or a "
                "step-NNNNNNNN checkpoint)"
            )
        latest = latest_checkpoint(found)
        assert latest is not None  # `latest` exists
        step_dir = latest
    try:
        return load_file(str(step_dir / "model.safetensors"))
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{step_dir}: unreadable model weights ({reason})") from exc

"""Checkpoint directories: whole and sharded safetensors round trips, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.convert.checkpoint import (
    CheckpointError,
    read_config,
    read_state_dict,
    write_checkpoint,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"blocks.{i}.weight": torch.randn(64, 64, generator=g) for i in range(6)}


@pytest.mark.parametrize("max_shard_size", ["5GB", 40_000])
def test_round_trip(tmp_path: Path, max_shard_size: int | str) -> None:
    state = _state()
    config = {"component": "x", "dim": 64}
    written = write_checkpoint(
        tmp_path, config=config, state_dict=state, max_shard_size=max_shard_size
    )

    # Six 16 KiB tensors: two fit under a 40 kB shard.
    sharded = max_shard_size != "5GB"
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    assert len([p for p in written if p.suffix == ".safetensors"]) == (3 if sharded else 1)
    loaded = read_state_dict(tmp_path)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)
    assert read_config(tmp_path) == config


def test_tied_and_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "b": base, "t": base.t()}
    write_checkpoint(tmp_path, config={}, state_dict=state)
    loaded = read_state_dict(tmp_path)
    assert torch.equal(loaded["t"], base.t())
    assert torch.equal(loaded["b"], base)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="JSON object"):
        read_config(tmp_path)
    with pytest.raises(CheckpointError, match="found 0"):
        read_state_dict(tmp_path)

    write_checkpoint(tmp_path, config={}, state_dict=_state(), max_shard_size=40_000)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_state_dict(tmp_path)


def test_a_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    tensor = torch.zeros(2)
    save_file({"x": tensor}, tmp_path / "a.safetensors")
    save_file({"x": tensor}, tmp_path / "b.safetensors")
    index = {"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}
    (tmp_path / "w.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="two shards"):
        read_state_dict(tmp_path)


def test_files_appear_only_when_complete_and_config_comes_last(tmp_path: Path) -> None:
    written = write_checkpoint(
        tmp_path, config={"a": 1}, state_dict=_state(), max_shard_size=40_000
    )
    assert written[-1].name == "config.json"
    assert not list(tmp_path.glob(".*.partial"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)

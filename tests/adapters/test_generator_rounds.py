"""The generator recipes the in-process launcher trains itself (``continued_pretraining``,
``diffusion_dpo``) on a tiny seeded ``QwenImage21Pipeline`` (converted on load, converted back
on save) and on a generator directory of ours, from manifests, through the launcher."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import JsonValue
from safetensors.torch import load_file

from flywheel.adapters.base import AdapterContext
from flywheel.adapters.diffusers_generator import GENERATOR, DiffusersGeneratorSettings
from flywheel.adapters.generator_rounds import BASE_GENERATOR_DIR
from flywheel.adapters.launchers import (
    DONE_MARKER,
    IN_PROCESS,
    RECIPE_RUNNERS,
    InProcessLauncher,
    write_manifest,
)
from flywheel.ports import PortError, RoundManifest
from model.convert.checkpoint import read_config, read_state_dict
from model.convert.pipeline import convert_pipeline, export_pipeline
from model.pipeline import CONFIG_FILE, TRANSFORMER_FILE, Generator
from model.torchvision_compat import import_torchvision
from tests.adapters.test_diffusers_generator import SIZE, _qwen_image_21
from training.checkpoint import save_checkpoint
from training.data import Provenance, Sample, write_dataset

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SETTINGS: dict[str, JsonValue] = {
    "lr": 2e-3,
    "batch_size": 4,
    "resolution": SIZE,
    "seed": 3,
    "checkpoint_every": 4,
}


def _square(colour: str, offset: int) -> Image.Image:
    """A coloured square on grey, at an offset: (SIZE, SIZE) RGB."""
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    image.paste(COLOURS[colour], (offset, offset, offset + SIZE // 2, offset + SIZE // 2))
    return image


@pytest.fixture(scope="module")
def pipeline(offline: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import_torchvision()
    return _qwen_image_21(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training dataset as the pretraining-gap track writes one: samples.jsonl + PNGs."""
    root = tmp_path_factory.mktemp("gap") / "dataset"
    (root / "images").mkdir(parents=True)
    samples = []
    for n, (colour, offset) in enumerate((c, o) for c in COLOURS for o in (2, 14)):
        name = f"images/{n:02d}.png"
        _square(colour, offset).save(root / name)
        samples.append(
            Sample(
                id=f"replay/{n}",
                image=name,
                caption=f"a {colour} square on a grey background",
                provenance=Provenance(dataset="corpus", split="train", origin_uri=f"s3://c/{n}"),
            )
        )
    write_dataset(root, samples)
    return root


@pytest.fixture(scope="module")
def preferences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The RL track's preferences.jsonl: file:// URIs, a relative path, and one pair whose
    image is remote (skipped)."""
    root = tmp_path_factory.mktemp("rl")
    lines = []
    for n, (good, bad) in enumerate([("red", "blue"), ("red", "green")] * 3):
        chosen, rejected = root / f"chosen-{n}.png", root / f"rejected-{n}.png"
        _square(good, 2 + 4 * n).save(chosen)
        _square(bad, 2 + 4 * n).save(rejected)
        lines.append(
            {
                "prompt": f"a {good} square",
                "chosen": chosen.as_uri(),
                "rejected": rejected.name if n % 2 else rejected.as_uri(),
                "source": "pairwise",
                "category": "colour",
                "case_id": n,
            }
        )
    lines.append({**lines[0], "chosen": "https://app.example/image.png"})
    path = root / "preferences.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _manifest(
    root: Path,
    recipe: str,
    base: Path,
    artefacts: dict[str, str],
    steps: int,
    **settings: JsonValue,
) -> Path:
    manifest = RoundManifest(
        round_id=5,
        cycle_id=2,
        track="pretraining_gap" if recipe == "continued_pretraining" else "rl",
        recipe=recipe,
        base_checkpoint=str(base),
        artefacts=artefacts,
        budget={recipe: steps},
        settings=SETTINGS | settings,
        output_dir="out/candidate",
        work_dir="work",
        device="cpu",
    )
    return write_manifest(root / "manifest.json", manifest)


def _transformer(directory: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(directory / "transformer")


def _one_line_launcher_error(launch: Any) -> str:
    with pytest.raises(PortError) as caught:
        launch()
    assert caught.value.port == "launcher"
    message = str(caught.value)
    assert "\n" not in message
    assert len(message) < 700
    return message


@pytest.fixture(scope="module")
def pretrained(
    pipeline: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, JsonValue]]:
    root = tmp_path_factory.mktemp("round")
    manifest = _manifest(root, "continued_pretraining", pipeline, {"dataset": str(dataset)}, 24)
    result = InProcessLauncher().launch(manifest)
    return result.checkpoint, result.metrics


def test_the_in_process_launcher_has_the_generator_recipes_built_in() -> None:
    assert {"continued_pretraining", "diffusion_dpo", "pe_sft"} <= set(RECIPE_RUNNERS)
    assert "continued_pretraining, diffusion_dpo, pe_sft" in IN_PROCESS.summary


def test_a_continued_pretraining_round_on_a_pipeline_writes_a_pipeline_the_diffusers_adapter_loads(
    pipeline: Path, pretrained: tuple[Path, dict[str, JsonValue]]
) -> None:
    out, metrics = pretrained
    assert (out / "model_index.json").is_file()
    assert (out / DONE_MARKER).is_file()
    assert metrics["base"] == "diffusers"
    assert metrics["steps"] == 24
    assert metrics["resumed_from"] is None
    assert metrics["samples"] == 6
    # The loss on a fixed batch with fixed noise falls (and the logged one, on average).
    before, after = metrics["eval_loss_before"], metrics["eval_loss_after"]
    assert isinstance(before, float)
    assert isinstance(after, float)
    assert after < before
    first, last = metrics["loss_first_mean"], metrics["loss_last_mean"]
    assert isinstance(first, float)
    assert isinstance(last, float)
    assert last < first
    # Only the transformer changed: its weights differ, everything else is hard-linked.
    trained, base = _transformer(out), _transformer(pipeline)
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert all(trained[k].dtype == base[k].dtype for k in base)
    assert read_config(out / "transformer") == read_config(pipeline / "transformer")
    for linked in ("model_index.json", "vae/config.json", "text_encoder/config.json"):
        assert os.stat(out / linked).st_ino == os.stat(pipeline / linked).st_ino
    # The candidate is a pipeline the project's diffusers generator adapter serves.
    settings = DiffusersGeneratorSettings(
        path=out,
        num_inference_steps=2,
        dtype="float32",
        call_kwargs={"output_resolution": SIZE},
    )
    generator = GENERATOR.build(settings, AdapterContext(root=out.parent, home=out.parent))
    images = generator.generate(["a red square on a grey background"], seed=0)
    assert images.shape == (1, 3, SIZE, SIZE)
    assert 0 <= float(images.min()) <= float(images.max()) <= 1


def test_a_round_killed_mid_way_resumes_from_its_checkpoint(
    pipeline: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path, "continued_pretraining", pipeline, {"dataset": str(dataset)}, 12)

    def killed_after_step_8(*args: Any, **kwargs: Any) -> Path:
        saved = save_checkpoint(*args, **kwargs)
        if kwargs["step"] == 8:
            raise RuntimeError("the node went away")
        return saved

    monkeypatch.setattr("training.loop.save_checkpoint", killed_after_step_8)
    message = _one_line_launcher_error(lambda: InProcessLauncher().launch(manifest))
    assert "continued_pretraining failed in process: RuntimeError: the node went away" in message
    assert not (tmp_path / "out" / "candidate").exists()
    converted = tmp_path / "work" / BASE_GENERATOR_DIR / TRANSFORMER_FILE
    stamp = converted.stat().st_mtime_ns
    monkeypatch.undo()
    result = InProcessLauncher().launch(manifest)
    assert result.metrics["resumed_from"] == 8
    assert result.metrics["steps"] == 12
    assert converted.stat().st_mtime_ns == stamp  # the conversion was not redone
    assert (result.checkpoint / "transformer" / "config.json").is_file()
    lines = (tmp_path / "work" / "continued_pretraining" / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in lines.splitlines()] == list(range(1, 13))


def test_a_diffusion_dpo_round_lowers_the_dpo_loss_below_log_2(
    pipeline: Path, preferences: Path, tmp_path: Path
) -> None:
    manifest = _manifest(tmp_path, "diffusion_dpo", pipeline, {"preferences": str(preferences)}, 16)
    result = InProcessLauncher().launch(manifest)
    metrics = result.metrics
    assert metrics["pairs"] == 6
    assert metrics["skipped"] == 1  # the remote image is not read
    before, after = metrics["eval_loss_before"], metrics["eval_loss_after"]
    assert isinstance(before, float)
    assert isinstance(after, float)
    assert before == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert after < math.log(2) - 0.2
    last = metrics["loss_last"]
    assert isinstance(last, float)
    assert last < math.log(2)
    assert (result.checkpoint / "model_index.json").is_file()
    trained, base = _transformer(result.checkpoint), _transformer(pipeline)
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_a_generator_directory_base_trains_into_a_generator_directory(
    pipeline: Path, dataset: Path, tmp_path: Path
) -> None:
    base = convert_pipeline(pipeline, tmp_path / "generator", height=SIZE, width=SIZE, steps=2)
    manifest = _manifest(tmp_path, "continued_pretraining", base, {"dataset": str(dataset)}, 4)
    result = InProcessLauncher().launch(manifest)
    assert result.metrics["base"] == "flywheel"
    assert (result.checkpoint / CONFIG_FILE).is_file()
    assert not (tmp_path / "work" / BASE_GENERATOR_DIR).exists()  # nothing to convert
    trained = load_file(str(result.checkpoint / TRANSFORMER_FILE))
    original = load_file(str(base / TRANSFORMER_FILE))
    assert any(not torch.equal(trained[k], original[k]) for k in original)
    generated = Generator.load(result.checkpoint).generate(["a red square"], seed=0)
    assert generated.shape == (1, 3, SIZE, SIZE)


def test_a_base_that_is_neither_a_pipeline_nor_a_generator_directory_is_a_one_line_error(
    dataset: Path, tmp_path: Path
) -> None:
    base = tmp_path / "weights"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"\0" * 16)
    manifest = _manifest(tmp_path, "continued_pretraining", base, {"dataset": str(dataset)}, 2)
    message = _one_line_launcher_error(lambda: InProcessLauncher().launch(manifest))
    assert f"base_checkpoint {base}: neither a generator directory" in message
    assert "nor a diffusers pipeline directory (model_index.json)" in message
    missing = _manifest(
        tmp_path, "continued_pretraining", tmp_path / "nowhere", {"dataset": str(dataset)}, 2
    )
    message = _one_line_launcher_error(lambda: InProcessLauncher().launch(missing))
    assert f"base_checkpoint {tmp_path / 'nowhere'}: no such directory" in message


def test_a_pipeline_of_another_architecture_cannot_be_converted_and_says_so(
    preferences: Path, tmp_path: Path
) -> None:
    base = tmp_path / "sdxl"
    base.mkdir()
    (base / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet"]})
    )
    manifest = _manifest(tmp_path, "diffusion_dpo", base, {"preferences": str(preferences)}, 2)
    message = _one_line_launcher_error(lambda: InProcessLauncher().launch(manifest))
    assert f"base_checkpoint {base}: cannot be converted for the in-process trainer" in message
    assert "a StableDiffusionXLPipeline converts to nothing here" in message
    assert "the command or Prefect launcher and the team's trainer" in message


def test_converting_a_pipeline_to_ours_and_back_gives_its_transformer_weights(
    pipeline: Path, tmp_path: Path
) -> None:
    ours = convert_pipeline(pipeline, tmp_path / "ours")
    config = Generator.load(ours).config.transformer
    back = export_pipeline(
        pipeline, load_file(str(ours / TRANSFORMER_FILE)), config, tmp_path / "back"
    )
    original, returned = _transformer(pipeline), _transformer(back)
    assert returned.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name
    assert read_config(back / "transformer") == read_config(pipeline / "transformer")
    assert not (tmp_path / ".back.partial").exists()

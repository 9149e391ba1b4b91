"""The base-model recipe chain at toy size: corpus -> VAE -> latent statistics -> cache ->
transformer -> generator directory, resumable, through the real training stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flywheel.cli.main import app
from flywheel.world.base_model import (
    ALIGNMENT_RUN_DIR,
    CACHE_DIR,
    CORPUS_DIR,
    ENHANCER_DIR,
    ENHANCER_PAIRS_FILE,
    ENHANCER_RUN_DIR,
    POOL_DIR,
    REWARD_CORPUS_DIR,
    REWARD_DIR,
    REWARD_RUN_DIR,
    TRANSFORMER_DIR,
    VAE_DIR,
    build_world_base,
    load_world_enhancer,
    load_world_reward,
    ship,
    terse_prompts,
    world_base,
    world_base_debug,
)
from flywheel.world.corpus import read_info, read_specs, scene_seeds
from flywheel.world.scenes import captions, sample_scene
from model.pipeline import Generator
from model.vae import ResidualVAE
from training.data import read_dataset
from training.pe_sft import read_pairs
from training.vae_training import export_vae_weights, latent_statistics

pytestmark = pytest.mark.usefixtures("offline")

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world-base")
    build_world_base(world_base_debug(), root)
    return root


def _metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_recipes_validate() -> None:
    world_base().validate()
    world_base_debug().validate()


def test_corpus_has_the_rare_colour_and_empty_captions(built: Path) -> None:
    corpus = built / CORPUS_DIR
    info = read_info(corpus)
    config = world_base_debug()
    assert info.caption_dropout == config.caption_dropout
    assert info.config["colour_weights"]["purple"] == config.rare_colours["purple"]
    assert config.rare_concepts() == ("purple",)
    assert info.config["text_probability"] == 0.0
    samples = read_dataset(corpus)
    empty = [s for s in samples if s.caption == ""]
    assert len(empty) == int(len(samples) * config.caption_dropout)  # floor, evenly spread
    specs = read_specs(corpus)
    assert all(specs[s.id].spec.objects for s in empty)  # the truth is kept


def test_the_pool_has_the_rare_colour_in_plenty(built: Path) -> None:
    def purple_share(directory: Path) -> float:
        objects = [o for r in read_specs(directory).values() for o in r.spec.objects]
        return sum(o.colour == "purple" for o in objects) / len(objects)

    info = read_info(built / POOL_DIR)
    assert info.split == "pool"
    assert info.seed != read_info(built / CORPUS_DIR).seed
    assert info.config["colour_weights"]["purple"] == world_base_debug().pool_colours["purple"]
    assert purple_share(built / POOL_DIR) > 0.2  # weight 3 of 9: ~0.33
    assert purple_share(built / CORPUS_DIR) < 0.05
    pool_ids = set(read_specs(built / POOL_DIR))
    assert not pool_ids & set(read_specs(built / CORPUS_DIR))


def test_latent_statistics_normalize_the_corpus(built: Path) -> None:
    generator = Generator.load(built / "generator")
    vae_config = generator.config.vae
    assert vae_config.latents_mean is not None
    assert vae_config.latents_std is not None
    vae = ResidualVAE(vae_config)
    vae.load_state_dict(export_vae_weights(built / VAE_DIR))
    size = (generator.config.width, generator.config.height)
    mean, std = latent_statistics(vae.eval(), built / CORPUS_DIR, size=size, batch_size=7)
    assert mean == pytest.approx(vae_config.latents_mean, abs=1e-5)  # batching does not matter
    assert std == pytest.approx(vae_config.latents_std, abs=1e-5)
    manifest = json.loads((built / CACHE_DIR / "manifest.json").read_text())
    assert manifest["latent_channels"] == vae_config.latent_channels
    shard = next((built / CACHE_DIR).rglob("*.safetensors"))
    latents = load_file(str(shard))["latents"]  # normalized: about zero mean, unit spread
    assert latents.mean(dim=(0, 2, 3)).abs().max() < 0.5
    assert 0.5 < float(latents.std(dim=(0, 2, 3)).mean()) < 1.5


def test_training_stages_learn(built: Path) -> None:
    vae = _metrics(built / VAE_DIR)
    assert "semantic" not in vae[0]  # no teacher term: the teacher is not run
    assert vae[-1]["psnr"] > vae[0]["psnr"] + 3
    losses = [m["loss"] for m in _metrics(built / TRANSFORMER_DIR)]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_generator_loads_and_generates(built: Path) -> None:
    generator = Generator.load(built / "generator")
    size = world_base_debug().image_size
    images = generator.generate(["A picture with a white background showing a red circle."])
    assert images.shape == (1, 3, size, size)
    assert torch.isfinite(images).all()
    again = generator.generate(["A picture with a white background showing a red circle."])
    assert torch.equal(images, again)


def test_rebuild_resumes_without_training(built: Path) -> None:
    stages = [built / d / "samples.jsonl" for d in (CORPUS_DIR, POOL_DIR)]
    stages.append(built / CACHE_DIR / "DONE")
    stages += sorted((built / VAE_DIR / "checkpoints").rglob("*.safetensors"))
    stages += sorted((built / TRANSFORMER_DIR / "checkpoints").rglob("*.safetensors"))
    stages += sorted((built / ALIGNMENT_RUN_DIR / "checkpoints").rglob("*.safetensors"))
    assert stages[-1].is_relative_to(built / ALIGNMENT_RUN_DIR)  # the last stage ran
    before = {path: path.stat().st_mtime_ns for path in stages}
    generator = build_world_base(world_base_debug(), built)
    assert generator == built / "generator"
    assert {path: path.stat().st_mtime_ns for path in stages} == before  # nothing redone
    assert len(_metrics(built / TRANSFORMER_DIR)) == world_base_debug().transformer_loop.max_steps


def test_reward_model_is_trained_on_terse_captions(built: Path) -> None:
    samples = read_dataset(built / REWARD_CORPUS_DIR)
    specs = read_specs(built / REWARD_CORPUS_DIR)
    assert all(s.caption == captions(specs[s.id].spec).terse for s in samples)
    losses = [m["loss"] for m in _metrics(built / REWARD_RUN_DIR)]
    assert sum(losses[-5:]) < sum(losses[:5])
    reward = load_world_reward(built / REWARD_DIR)
    images = torch.rand(2, 3, 32, 32)
    assert reward.score(images, ["red circle", "blue square"]).shape == (2,)


def test_enhancer_learns_to_give_terse_prompts_back(built: Path) -> None:
    pairs = read_pairs(built / ENHANCER_PAIRS_FILE)
    config = world_base_debug()
    assert len(pairs) == config.enhancer_prompts
    assert len({p for p, _ in pairs}) == len(pairs)  # distinct
    assert all(prompt == target for prompt, target in pairs)
    expected = terse_prompts(config.scene, seed=config.seed + 3, count=config.enhancer_prompts)
    assert [p for p, _ in pairs] == expected
    first = sample_scene(scene_seeds(config.seed + 3, 1)[0], config.scene)
    assert pairs[0][0] == captions(first).terse  # new scenes, every colour as common
    with pytest.raises(ValueError, match="terse captions, not 5000"):
        terse_prompts(config.scene, seed=0, count=5000)  # 42 kinds, at most two a scene
    losses = [m["loss"] for m in _metrics(built / ENHANCER_RUN_DIR)]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    enhancer = load_world_enhancer(built / ENHANCER_DIR)
    assert len(enhancer.enhance(["red circle", "blue square"])) == 2
    with pytest.raises(ValueError, match="not a prompt enhancer directory"):
        load_world_enhancer(built)


def test_ship_copies_generator_reward_enhancer_and_the_pretrained_generator(
    built: Path, tmp_path: Path
) -> None:
    targets = {"generator_to": tmp_path / "base", "reward_to": tmp_path / "reward"}
    targets["enhancer_to"] = tmp_path / "enhancer"
    targets["pretrained_to"] = tmp_path / "pretrained"
    generator, reward, enhancer = ship(built, **targets)
    assert Generator.load(generator).config.height == world_base_debug().image_size
    # The build was aligned: its pretrained generator ships too (the weakness' control).
    assert Generator.load(targets["pretrained_to"]).config == Generator.load(generator).config
    load_world_reward(reward)
    load_world_enhancer(enhancer)
    with pytest.raises(ValueError, match="no finished generator"):
        ship(tmp_path / "nothing", **targets)
    with pytest.raises(ValueError, match="not a reward model directory"):
        load_world_reward(tmp_path)


def test_cli_refuses_an_unknown_recipe(tmp_path: Path) -> None:
    result = runner.invoke(app, ["world", "base", "--out", str(tmp_path), "--recipe", "huge"])
    assert result.exit_code == 2
    assert "unknown recipe 'huge'" in result.stderr


def test_weaknesses_cli_reports_generator_and_reward(built: Path) -> None:
    args = ["world", "weaknesses", "--model", str(built / "generator")]
    args += ["--reward", str(built / REWARD_DIR), "--enhancer", str(built / ENHANCER_DIR)]
    args += ["--per-concept", "1", "--per-skill", "1"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    generator = report["generator"]
    assert set(generator["shapes"]) == {
        "circle",
        "square",
        "triangle",
        "diamond",
        "hexagon",
        "star",
    }
    assert set(generator["colours"]) == {
        "red",
        "green",
        "blue",
        "yellow",
        "purple",
        "orange",
        "black",
    }
    assert generator["rare"] == ["purple"]
    assert generator["rare_score"] == generator["colours"]["purple"]
    assert generator["cases"] == 6 + 7 + 1 + 1 + 2  # shapes, colours, terse, rich, count, relation
    for value in (
        generator["rare_score"],
        generator["terse_prompt_colour"],
        generator["enhancer_unchanged"],
    ):
        assert 0.0 <= value <= 1.0
    assert set(report["reward"]["skills"]) == {"colour", "shape", "count", "relation"}
    assert report["reward"]["pairs"] == 2
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.stderr
    assert "rare: purple" in table.stdout
    assert "terse prompts kept" in table.stdout
    assert "reward prefers the right render" in table.stdout
    unknown = runner.invoke(app, [*args, "--rare", "plaid"])
    assert unknown.exit_code == 2
    assert "--rare 'plaid'" in unknown.stderr
    missing = runner.invoke(
        app, [*args[:2], "--model", str(built / "generator"), "--reward", str(built)]
    )
    assert missing.exit_code == 2
    assert "not a reward model directory" in missing.stderr

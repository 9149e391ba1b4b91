"""The generator recipes the in-process launcher runs itself: ``continued_pretraining`` (the
pretraining-gap track) and ``diffusion_dpo`` (the RL track), on the project's own trainer.

``base_checkpoint`` is a generator directory of ``model/`` (``generator.json``,
:meth:`model.pipeline.Generator.load`) or a diffusers pipeline directory of the architecture
``model/`` implements (``model_index.json`` naming a ``QwenImage21Pipeline``). A round:

1. **loads** the base: a pipeline is converted once
   (:func:`model.convert.pipeline.convert_pipeline`) into ``work_dir/base-generator`` and
   reused by a relaunch; a pipeline of another architecture, or a directory that is neither,
   fails the round in one line;
2. **prepares its data** in ``work_dir``, once: ``continued_pretraining`` reads
   ``artefacts["dataset"]`` (a :mod:`training.data` directory, ``samples.jsonl`` and images,
   as the pretraining-gap track writes it); ``diffusion_dpo`` reads ``artefacts["preferences"]``
   (the RL track's JSONL, ``prompt`` / ``chosen`` / ``rejected`` a line), whose images are read
   from local paths only (``file://`` URIs, absolute paths, paths relative to the file; a pair
   with another URI or an unreadable image is skipped and counted) into a preference dataset
   (:mod:`training.preference`). Either is encoded with the base's VAE and condition encoder
   into a cache (``work_dir/cache``, written aside and renamed when complete);
3. **trains** the transformer with :func:`training.trainer.train` for ``budget[recipe]``
   steps in ``work_dir/<recipe>`` (checkpoints there: a relaunch resumes), seeded by
   ``settings["seed"]``: flow matching (:mod:`training.pretrain`) from the base's weights, or
   Diffusion-DPO (:mod:`training.dpo`) against the frozen base as reference;
4. **saves** ``output_dir`` (written as a hidden sibling and renamed into place): for a
   pipeline base, a diffusers pipeline directory — the base's files hard-linked, its
   ``transformer/`` the trained weights converted back
   (:func:`model.convert.pipeline.export_pipeline`), which the ``diffusers`` generator adapter
   loads; for a generator base, a generator directory (the base's files hard-linked, its
   ``transformer.safetensors`` the trained weights). Weights keep the base's dtypes.

The metrics returned: ``steps``, ``resumed_from``, the first and last logged losses (and the
means of the first and last tenth), ``eval_loss_before`` / ``eval_loss_after`` (the
objective's loss on one fixed batch with fixed noise, under the base's and the trained
weights: comparable across the round; ``log 2`` before, for Diffusion-DPO), the data's size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from flywheel.adapters.base import launched_round_loop
from flywheel.ports import PortError, Recipe, RoundManifest
from training.io import local_path

if TYPE_CHECKING:
    from torch import Tensor

    from model.pipeline import GeneratorConfig
    from training.loop import LoopConfig, TrainResult

log = logging.getLogger(__name__)

BASE_GENERATOR_DIR = "base-generator"
"""Where a pipeline base is converted, inside ``work_dir``."""
BASE_SOURCE_FILE = "flywheel-source.json"
"""Inside the converted base: which pipeline it was converted from."""
CACHE_DIR = "cache"
"""The round's encoded training data, inside ``work_dir``."""
PREFERENCE_DATA_DIR = "preference-data"
"""The preference pairs as a :mod:`training.preference` dataset, inside ``work_dir``."""
EVAL_SEED_OFFSET = 10_000
"""The fixed batch's noise is drawn with ``seed + EVAL_SEED_OFFSET``."""

BaseKind = Literal["diffusers", "flywheel"]


class GeneratorRoundSettings(BaseModel):
    """``settings`` of a ``continued_pretraining`` manifest (every key optional; others are
    an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(default=1e-5, gt=0)
    """Peak learning rate (AdamW), after the warm-up, then cosine-decayed to a tenth."""
    warmup_steps: int | None = Field(default=None, ge=0)
    """Linear warm-up steps; None: a quarter of the steps, at most 20."""
    batch_size: int = Field(default=8, ge=1)
    """Samples (pairs, for Diffusion-DPO) per optimizer step."""
    seed: int = 0
    """Seed of the data order, the noise and the flow times."""
    resolution: int | None = Field(default=None, ge=8)
    """Images are trained at about ``resolution`` squared pixels (aspect-ratio buckets);
    None: the generator's height x width (1024 x 1024 for a converted pipeline)."""
    checkpoint_every: int | None = Field(default=None, ge=1)
    """Checkpoint into ``work_dir`` every this many steps (a relaunch resumes there); None:
    every 500 steps and at the end."""


class DiffusionDPORoundSettings(GeneratorRoundSettings):
    """``settings`` of a ``diffusion_dpo`` manifest: a continued-pretraining round's and
    ``beta``."""

    beta: float = Field(default=5000.0, gt=0)
    """Diffusion-DPO's inverse temperature (:class:`training.dpo.DPOConfig`)."""


@dataclass(frozen=True, slots=True)
class _Base:
    kind: BaseKind
    source: Path
    """``base_checkpoint`` as given."""
    generator: Path
    """The generator directory trained from (the source, or its conversion)."""


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _steps(manifest: RoundManifest, recipe: Recipe) -> int:
    steps = manifest.budget.get(recipe)
    if steps is None or steps < 1:
        raise PortError("launcher", f'a {recipe} round needs budget["{recipe}"] >= 1 steps')
    return steps


def _artefact(manifest: RoundManifest, recipe: Recipe, name: str, what: str) -> Path:
    value = manifest.artefacts.get(name)
    if value is None:
        raise PortError("launcher", f'a {recipe} round needs artefacts["{name}"] ({what})')
    if "://" in value:
        raise PortError("launcher", f'artefacts["{name}"] = {value}: not a local path')
    path = Path(value)
    if not path.exists():
        raise PortError("launcher", f'artefacts["{name}"]: {path} does not exist')
    return path


# ---- the base ---------------------------------------------------------------------------------


def _base(manifest: RoundManifest) -> _Base:
    """The base checkpoint as a generator directory: itself, or its pipeline converted into
    ``work_dir/base-generator`` (once)."""
    from model.convert.checkpoint import CheckpointError, ConversionError
    from model.convert.pipeline import MODEL_INDEX, check_pipeline, convert_pipeline
    from model.pipeline import CONFIG_FILE

    source = Path(manifest.base_checkpoint)
    if "://" in manifest.base_checkpoint or not source.is_dir():
        raise PortError(
            "launcher", f"base_checkpoint {manifest.base_checkpoint}: no such directory"
        )
    if (source / CONFIG_FILE).is_file():
        return _Base(kind="flywheel", source=source, generator=source)
    if not (source / MODEL_INDEX).is_file():
        raise PortError(
            "launcher",
            f"base_checkpoint {source}: neither a generator directory ({CONFIG_FILE}) nor a "
            f"diffusers pipeline directory ({MODEL_INDEX})",
        )
    try:
        check_pipeline(source)
    except (CheckpointError, ConversionError) as exc:
        raise _not_convertible(source, exc) from None
    target = Path(manifest.work_dir) / BASE_GENERATOR_DIR
    record = target / BASE_SOURCE_FILE
    if (target / CONFIG_FILE).is_file() and record.is_file():
        converted_from = json.loads(record.read_text(encoding="utf-8")).get("pipeline")
        if converted_from != str(source.resolve()):
            raise PortError(
                "launcher",
                f"{target} is the conversion of {converted_from}, not of {source}; "
                "give this round another work_dir",
            )
        return _Base(kind="diffusers", source=source, generator=target)
    if target.exists():  # a conversion that did not finish
        shutil.rmtree(target)
    try:
        convert_pipeline(source, target)
    except (CheckpointError, ConversionError) as exc:
        raise _not_convertible(source, exc) from None
    from training.io import atomic_write_text

    atomic_write_text(record, json.dumps({"pipeline": str(source.resolve())}) + "\n")
    log.info("round %s: %s converted into %s", manifest.round_id, source, target)
    return _Base(kind="diffusers", source=source, generator=target)


def _not_convertible(source: Path, error: Exception) -> PortError:
    reason = str(error).removeprefix(f"{source}: ").removeprefix(f"{source}")
    return PortError(
        "launcher",
        _one_line(
            f"base_checkpoint {source}: cannot be converted for the in-process trainer "
            f"({reason}); train it with the command or Prefect launcher and the team's trainer"
        ),
    )


def _generator_config(directory: Path) -> GeneratorConfig:
    from model.pipeline import CONFIG_FILE, config_from_json

    config = config_from_json((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    config.validate()
    return config


# ---- data -------------------------------------------------------------------------------------


def _cache(
    work: Path,
    base: _Base,
    config: GeneratorConfig,
    settings: GeneratorRoundSettings,
    device: str,
    produce: Callable[..., int],
    data: Path,
) -> Path:
    """``work_dir/cache``: ``data`` encoded by ``produce`` with the base's VAE and condition
    encoder (written aside and renamed when complete; reused when there)."""
    from safetensors.torch import load_file

    from model.condition import ConditionEncoder
    from model.pipeline import VAE_FILE
    from model.vae import ResidualVAE
    from training.cache import DONE_FILE, ProducerConfig
    from training.data import BucketConfig

    cache = work / CACHE_DIR
    if (cache / DONE_FILE).is_file():
        return cache
    partial = work / f".{CACHE_DIR}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    if cache.exists():
        shutil.rmtree(cache)
    vae = ResidualVAE(config.vae)
    vae.load_state_dict(load_file(str(base.generator / VAE_FILE)))
    vae = vae.to(device).eval().requires_grad_(False)
    encoder = ConditionEncoder.load(config.condition_config(), device=device)
    area = (
        settings.resolution**2 if settings.resolution is not None else config.height * config.width
    )
    # Sides of whole 2x2 groups of latent tokens: what Qwen-Image's image slots count in.
    multiple = 2 * config.vae.spatial_factor * config.transformer.patch_size
    buckets = BucketConfig(target_area=max(area, multiple * multiple), multiple_of=multiple)
    produce(
        data,
        partial,
        vae=vae,
        encoder=encoder,
        config=ProducerConfig(buckets=buckets, shard_size=256, batch_size=settings.batch_size),
    )
    del vae, encoder
    os.rename(partial, cache)
    return cache


def _image_path(value: object, base: Path) -> Path | None:
    """A preference's image as a local path (None: not a local one)."""
    if not isinstance(value, str) or not value:
        return None
    parsed = urlparse(value)
    if parsed.scheme == "file":
        return local_path(value)
    if parsed.scheme and len(parsed.scheme) > 1:  # a URI (a Windows drive letter is not)
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def preference_dataset(preferences: Path, work: Path) -> tuple[Path, int, int]:
    """``work_dir/preference-data``: the pairs of ``preferences`` as a
    :mod:`training.preference` dataset (images re-encoded as PNG); (it, pairs, skipped)."""
    from PIL import Image, UnidentifiedImageError

    from training.data import Provenance, Sample, write_dataset
    from training.io import atomic_write_text
    from training.preference import PreferencePair, write_pairs

    target = work / PREFERENCE_DATA_DIR
    summary = target / "summary.json"
    if summary.is_file():
        counts = json.loads(summary.read_text(encoding="utf-8"))
        return target, int(counts["pairs"]), int(counts["skipped"])
    partial = work / f".{PREFERENCE_DATA_DIR}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "images").mkdir(parents=True)
    samples: list[Sample] = []
    pairs: list[PreferencePair] = []
    skipped = 0
    lines = preferences.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{preferences}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PortError("launcher", _one_line(f"{where}: not JSON ({exc})")) from None
        if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) and record[k] for k in ("prompt", "chosen", "rejected")
        ):
            raise PortError("launcher", f"{where}: needs prompt, chosen and rejected (strings)")
        ids: list[str] = []
        for side in ("chosen", "rejected"):
            path = _image_path(record[side], preferences.parent)
            name = f"images/{len(pairs):06d}-{side}.png"
            try:
                if path is None:
                    raise OSError(f"{record[side]}: not a local path")
                with Image.open(path) as opened:
                    opened.convert("RGB").save(partial / name)
            except (
                OSError,
                UnidentifiedImageError,
                ValueError,
                Image.DecompressionBombError,
            ) as exc:
                log.warning("%s: pair skipped (%s)", where, _one_line(str(exc)))
                break
            ids.append(f"pair-{len(pairs):06d}-{side}")
            samples.append(
                Sample(
                    id=ids[-1],
                    image=name,
                    caption=record["prompt"],
                    provenance=Provenance(
                        dataset=preferences.stem, split="train", origin_uri=record[side]
                    ),
                )
            )
        if len(ids) < 2:
            skipped += 1
            samples = samples[: len(samples) - len(ids)]
            continue
        source = record.get("source")
        pairs.append(
            PreferencePair(
                id=f"pair-{len(pairs):06d}",
                winner=ids[0],
                loser=ids[1],
                source=source if isinstance(source, str) else None,
            )
        )
    if not pairs:
        raise PortError(
            "launcher",
            f"{preferences}: no preference pair with two readable local images ({skipped} skipped)",
        )
    write_dataset(partial, samples)
    write_pairs(partial, pairs)
    counts = {"pairs": len(pairs), "skipped": skipped}
    atomic_write_text(partial / "summary.json", json.dumps(counts) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.rename(partial, target)
    return target, len(pairs), skipped


# ---- training ---------------------------------------------------------------------------------


def _loop(steps: int, settings: GeneratorRoundSettings, device: str) -> LoopConfig:
    return launched_round_loop(
        steps,
        lr=settings.lr,
        warmup_steps=settings.warmup_steps,
        checkpoint_every=settings.checkpoint_every,
        seed=settings.seed,
        device=device,
    )


def _fixed_batch_losses(
    recipe: str,
    cache: Path,
    config: GeneratorConfig,
    base_weights: dict[str, Tensor],
    trained: dict[str, Tensor],
    settings: GeneratorRoundSettings,
    device: str,
) -> tuple[float, float]:
    """The objective's loss on the cache's first batch with fixed noise, under the base's
    and under the trained weights."""
    import torch

    from model.transformer import DiffusionTransformer
    from training.cache import CachedBatches, ConsumerConfig
    from training.dpo import DPOConfig, dpo_step
    from training.flow_matching import FlowMatchingConfig, flow_matching_step

    consumer = ConsumerConfig(batch_size=settings.batch_size, seed=settings.seed, epochs=1)
    batch = next(iter(CachedBatches(cache, consumer)))
    base = DiffusionTransformer(config.transformer)
    base.load_state_dict(base_weights)
    base = base.to(device).eval().requires_grad_(False)
    model = DiffusionTransformer(config.transformer)
    model.load_state_dict(trained)
    model = model.to(device).eval().requires_grad_(False)
    losses: list[float] = []
    with torch.no_grad():
        for policy in (base, model):
            generator = torch.Generator().manual_seed(settings.seed + EVAL_SEED_OFFSET)
            if recipe == "diffusion_dpo":
                assert isinstance(settings, DiffusionDPORoundSettings)
                dpo = DPOConfig(beta=settings.beta)
                output = dpo_step(policy, base, batch, config=dpo, generator=generator)
            else:
                flow = FlowMatchingConfig()
                output = flow_matching_step(policy, batch, config=flow, generator=generator)
            losses.append(float(output.loss))
    return losses[0], losses[1]


def _logged_losses(result: TrainResult) -> list[float]:
    from training.loop import parse_metrics_line

    records = (parse_metrics_line(line) for line in result.metrics.read_text().splitlines())
    return [float(r["loss"]) for r in records if r is not None]


def _save(base: _Base, config: GeneratorConfig, trained: dict[str, Tensor], out: Path) -> None:
    """``output_dir``: a pipeline directory (pipeline base) or a generator directory."""
    from model.convert.pipeline import export_pipeline, link_tree, stored_dtypes
    from model.pipeline import TRANSFORMER_FILE
    from training.io import fsync_tree

    if base.kind == "diffusers":
        export_pipeline(base.source, trained, config.transformer, out)
        return
    from safetensors.torch import save_file

    source = base.generator / TRANSFORMER_FILE
    dtypes = stored_dtypes([source])
    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    link_tree(base.generator, partial, skip=[source])
    tensors = {
        name: tensor.detach().to(device="cpu", dtype=dtypes.get(name, tensor.dtype)).contiguous()
        for name, tensor in trained.items()
    }
    save_file(tensors, str(partial / TRANSFORMER_FILE))
    fsync_tree(partial)
    os.rename(partial, out)


def _run(manifest: RoundManifest, recipe: Recipe) -> dict[str, JsonValue]:
    """Either recipe (see the module docstring)."""
    from training.checkpoint import load_model_weights

    started = time.monotonic()
    steps = _steps(manifest, recipe)
    dpo = recipe == "diffusion_dpo"
    settings_type = DiffusionDPORoundSettings if dpo else GeneratorRoundSettings
    settings = settings_type.model_validate(manifest.settings)
    if dpo:
        data = _artefact(manifest, recipe, "preferences", "the RL track's preference pairs")
    else:
        data = _artefact(manifest, recipe, "dataset", "a training dataset directory")
    work = Path(manifest.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    base = _base(manifest)
    config = _generator_config(base.generator)
    figures: dict[str, JsonValue] = {}
    if dpo:
        from training.preference import produce_preferences

        data, pairs, skipped = preference_dataset(data, work)
        figures.update(pairs=pairs, skipped=skipped)
        cache = _cache(work, base, config, settings, manifest.device, produce_preferences, data)
    else:
        from training.cache import produce
        from training.data import SAMPLES_FILE

        if not (data / SAMPLES_FILE).is_file():
            raise PortError(
                "launcher",
                f'artefacts["dataset"]: {data} is not a training dataset (no {SAMPLES_FILE})',
            )
        cache = _cache(work, base, config, settings, manifest.device, produce, data)
        manifest_file = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
        figures.update(samples=int(manifest_file.get("samples", 0)))

    from model.pipeline import TRANSFORMER_FILE
    from training.dpo import DPOConfig, DPOTrainConfig, PreferenceDataConfig
    from training.pretrain import DataConfig, PretrainConfig
    from training.trainer import TrainConfig, train

    init = base.generator / TRANSFORMER_FILE
    loop = _loop(steps, settings, manifest.device)
    train_config: TrainConfig
    if isinstance(settings, DiffusionDPORoundSettings):
        train_config = DPOTrainConfig(
            model=config.transformer,
            dpo=DPOConfig(beta=settings.beta),
            data=PreferenceDataConfig(cache_dir=cache, batch_size=settings.batch_size),
            init_from=init,
            loop=loop,
        )
    else:
        train_config = PretrainConfig(
            model=config.transformer,
            data=DataConfig(cache_dir=cache, batch_size=settings.batch_size),
            init_from=init,
            loop=loop,
        )
    run = work / recipe
    result = train(train_config, out=run, name=f"round {manifest.round_id} {recipe}")
    trained = load_model_weights(run)
    before, after = _fixed_batch_losses(
        recipe, cache, config, load_model_weights(init), trained, settings, manifest.device
    )
    _save(base, config, trained, Path(manifest.output_dir))
    losses = _logged_losses(result)
    window = max(1, min(10, len(losses) // 10))
    return {
        "recipe": recipe,
        "base": base.kind,
        "steps": result.step,
        "resumed_from": result.resumed_from,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_first_mean": sum(losses[:window]) / window if losses else None,
        "loss_last_mean": sum(losses[-window:]) / window if losses else None,
        "eval_loss_before": before if math.isfinite(before) else None,
        "eval_loss_after": after if math.isfinite(after) else None,
        **figures,
        "seconds": round(time.monotonic() - started, 2),
    }


def run_continued_pretraining(manifest: RoundManifest) -> dict[str, JsonValue]:
    """Continued flow-matching pretraining of the base generator's transformer for
    ``budget["continued_pretraining"]`` steps on ``artefacts["dataset"]`` (a
    :mod:`training.data` directory); see the module docstring."""
    return _run(manifest, "continued_pretraining")


def run_diffusion_dpo(manifest: RoundManifest) -> dict[str, JsonValue]:
    """Diffusion-DPO of the base generator's transformer against the frozen base for
    ``budget["diffusion_dpo"]`` steps on ``artefacts["preferences"]`` (the RL track's
    preference pairs); see the module docstring."""
    return _run(manifest, "diffusion_dpo")

"""The pretraining curriculum (resolution, text-to-image : editing mix, data filters) and SFT.

The generator is pretrained in stages, after the Qwen-Image report: each stage trains at a
higher resolution, on a larger share of image-editing samples (text-to-image : editing 9:1,
then 8:2, then 7:3) and on cleaner data (its :class:`training.data.SampleFilter` is stricter
than the previous stage's), and starts from the previous stage's weights. A stage is a
:class:`CurriculumStage`; :func:`stage_config` makes it a
:class:`training.pretrain.PretrainConfig` (flow matching; the bucket area, the filter and the
edit fraction go to its :class:`training.pretrain.DataConfig`, which the objective reads; see
:mod:`training.pretrain` for how the mix is drawn).

One cache serves every stage: it holds each sample at every stage's bucket area its image
covers (``flywheel cache produce --target-area A1 --extra-areas A2,A3``), and each
stage reads the shards of its own area. Stage k > 1 starts from stage k - 1 with ``--init``::

    flywheel train pretrain-stage1 --data CACHE --out runs/stage1
    flywheel train pretrain-stage2 --data CACHE --out runs/stage2 --init runs/stage1
    flywheel train pretrain-stage3 --data CACHE --out runs/stage3 --init runs/stage2

(``curriculum-stage<k>-debug``: the same chain on CPU, on a generated dataset; no ``--data``.)

Supervised fine-tuning (SFT) is the same flow-matching objective started from trained weights
(``--init``) on the curated subset, the strictest filter (:data:`DEBUG_CURATED`), with a lower
learning rate: ``sft-debug``.

The functions named after recipes (``pretrain_stage1`` ... ``sft_debug``) are registered in
:data:`training.recipes.RECIPES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from model.transformer import TransformerConfig, transformer_1b, transformer_debug
from training.data import SampleFilter
from training.flow_matching import FlowMatchingConfig
from training.loop import LoopConfig, OptimizerConfig
from training.pretrain import DataConfig, PretrainConfig
from training.synthetic import SyntheticDataConfig


@dataclass(kw_only=True, slots=True)
class CurriculumStage:
    """One pretraining stage: its resolution, task mix, data filter, length and learning rate."""

    target_area: int
    """Bucket target area (pixels) trained on; the cache must hold shards of this area."""
    edit_fraction: float
    """Share of steps on editing batches (0.1 is text-to-image : editing 9:1)."""
    filter: SampleFilter = field(default_factory=SampleFilter)
    """The samples trained on."""
    steps: int
    """Optimizer steps of the stage."""
    lr: float
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warm-up steps (each stage starts a fresh optimizer)."""
    batch_size: int
    """Samples per step."""
    shift: float = 1.0
    """Flow-time shift (larger images need more noise: > 1 at high resolution)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.target_area < 1 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("CurriculumStage: target_area, steps, batch_size >= 1 and lr > 0")
        if not 0 <= self.edit_fraction <= 1:
            raise ValueError(
                f"CurriculumStage.edit_fraction must be in [0, 1]: {self.edit_fraction}"
            )
        self.filter.validate()


def stage_config(
    stage: CurriculumStage, *, model: TransformerConfig, data: DataConfig, loop: LoopConfig
) -> PretrainConfig:
    """The flow-matching configuration of ``stage``: ``data`` and ``loop`` with the stage's
    area, mix, filter, batch size, steps, learning rate and warm-up."""
    stage.validate()
    return PretrainConfig(
        model=model,
        flow=FlowMatchingConfig(shift=stage.shift),
        data=replace(
            data,
            target_area=stage.target_area,
            edit_fraction=stage.edit_fraction,
            filter=stage.filter,
            batch_size=stage.batch_size,
        ),
        loop=replace(
            loop,
            max_steps=stage.steps,
            optimizer=replace(loop.optimizer, lr=stage.lr, warmup_steps=stage.warmup_steps),
        ),
    )


# ---- the real curriculum ----------------------------------------------------------------

PRETRAIN_CURRICULUM = (
    CurriculumStage(
        target_area=256 * 256,
        edit_fraction=0.1,
        filter=SampleFilter(min_side=256),
        steps=100_000,
        lr=1e-4,
        warmup_steps=2_000,
        batch_size=64,
        shift=1.0,
    ),
    CurriculumStage(
        target_area=512 * 512,
        edit_fraction=0.2,
        filter=SampleFilter(min_side=512, allow_abnormal=False),
        steps=50_000,
        lr=1e-4,
        warmup_steps=1_000,
        batch_size=16,
        shift=2.0,
    ),
    CurriculumStage(
        target_area=1328 * 1328,
        edit_fraction=0.3,
        filter=SampleFilter(min_side=1024, allow_abnormal=False, max_watermarks=0),
        steps=20_000,
        lr=5e-5,
        warmup_steps=500,
        batch_size=2,
        shift=3.0,
    ),
)
"""256² → 512² → 1328² buckets, T2I : editing 9:1 → 8:2 → 7:3; the filters drop small
images, then abnormal elements, then watermarks. Batch sizes are per step of one process with
the 1B transformer, estimated for an 80 GB GPU (not measured)."""


def _pretrain_stage(number: int) -> PretrainConfig:
    model = transformer_1b()  # 64 latent channels (f16c64 VAE), 4096-d condition (Qwen3-VL)
    loop = LoopConfig(
        optimizer=OptimizerConfig(weight_decay=0.01),
        checkpoint_every=1_000,
        keep_checkpoints=3,
        device="cuda",
    )
    data = DataConfig()  # cache_dir comes from --data
    return stage_config(PRETRAIN_CURRICULUM[number - 1], model=model, data=data, loop=loop)


def pretrain_stage1() -> PretrainConfig:
    """Pretraining stage 1 of 3, GPU: 256² buckets, T2I : editing 9:1, sides >= 256; --data.

    The 1B transformer from seeded random weights. ``--data``: a cache of f16c64 latents and
    Qwen3-VL conditions with the three stages' areas, e.g. ``flywheel cache produce
    --data DATASET --cache CACHE --vae f16c64 --vae-weights VAE --condition qwen3-vl
    --condition-path QWEN3VL --multiple-of 16 --target-area 65536 --extra-areas
    262144,1763584``. Next: pretrain-stage2 with ``--init`` this run.
    """
    return _pretrain_stage(1)


def pretrain_stage2() -> PretrainConfig:
    """Pretraining stage 2 of 3, GPU: 512² buckets, T2I : editing 8:2, no abnormal elements.

    Start it from stage 1: ``flywheel train pretrain-stage2 --data CACHE --out DIR --init
    STAGE1_RUN`` (without ``--init`` it starts from seeded random weights). Shorter images than
    512 pixels are dropped. Next: pretrain-stage3.
    """
    return _pretrain_stage(2)


def pretrain_stage3() -> PretrainConfig:
    """Pretraining stage 3 of 3, GPU: 1328² buckets, T2I : editing 7:3, no watermarks either.

    Start it from stage 2: ``flywheel train pretrain-stage3 --data CACHE --out DIR --init
    STAGE2_RUN``. Images with a side under 1024 pixels, abnormal elements or watermarks are
    dropped; flow times are shifted towards noise (shift 3).
    """
    return _pretrain_stage(3)


# ---- the debug curriculum and SFT ---------------------------------------------------------


def debug_synthetic() -> SyntheticDataConfig:
    """The debug curriculum's dataset: 32 shapes and 16 recolouring edits at 32 and 48 px,
    annotated (watermarks, abnormal elements, icons) so that the filters bite."""
    return SyntheticDataConfig(
        images=32, editing_images=16, extra_sizes=(48,), annotate=True, shard_size=8
    )


DEBUG_CURRICULUM = (
    CurriculumStage(
        target_area=32 * 32,
        edit_fraction=0.1,
        steps=100,
        lr=1e-3,
        warmup_steps=5,
        batch_size=4,
    ),
    CurriculumStage(
        target_area=48 * 48,
        edit_fraction=0.2,
        filter=SampleFilter(allow_abnormal=False),
        steps=80,
        lr=5e-4,
        warmup_steps=2,
        batch_size=4,
    ),
    CurriculumStage(
        target_area=48 * 48,
        edit_fraction=0.3,
        filter=SampleFilter(allow_abnormal=False, max_watermarks=0),
        steps=80,
        lr=5e-4,
        warmup_steps=2,
        batch_size=4,
    ),
)
"""32² → 48² → 48² buckets, T2I : editing 9:1 → 8:2 → 7:3; the filters drop abnormal
elements, then watermarks too."""

DEBUG_CURATED = SampleFilter(allow_abnormal=False, max_watermarks=0, exclude_image_types=("icon",))
"""The debug SFT subset: the last stage's filter, and illustrations only."""


def _debug_model() -> TransformerConfig:
    model = transformer_debug()
    model.latent_channels = debug_synthetic().vae.latent_channels
    return model


def _debug_stage(number: int) -> PretrainConfig:
    loop = LoopConfig(checkpoint_every=20, keep_checkpoints=2, seed=0)
    data = DataConfig(synthetic=debug_synthetic())
    stage = DEBUG_CURRICULUM[number - 1]
    return stage_config(stage, model=_debug_model(), data=data, loop=loop)


def curriculum_stage1_debug() -> PretrainConfig:
    """Curriculum stage 1 of 3, CPU, ~10 s: 32² buckets, T2I : editing 9:1, every sample.

    The debug transformer from seeded random weights, on :func:`debug_synthetic`. Next:
    ``flywheel train curriculum-stage2-debug --out DIR --init STAGE1_RUN``.
    """
    return _debug_stage(1)


def curriculum_stage2_debug() -> PretrainConfig:
    """Curriculum stage 2 of 3, CPU, ~10 s: 48² buckets, T2I : editing 8:2, no QR codes.

    Start it from stage 1 with ``--init STAGE1_RUN`` (without, from seeded random weights).
    Next: curriculum-stage3-debug with ``--init`` this run.
    """
    return _debug_stage(2)


def curriculum_stage3_debug() -> PretrainConfig:
    """Curriculum stage 3 of 3, CPU, ~10 s: 48² buckets, T2I : editing 7:3, no watermarks.

    Start it from stage 2 with ``--init STAGE2_RUN``. Then sft-debug with ``--init`` this run.
    """
    return _debug_stage(3)


def sft_debug() -> PretrainConfig:
    """SFT, CPU, ~10 s: flow matching from --init weights on the curated debug subset, low lr.

    Start it from a trained run: ``flywheel train sft-debug --out DIR --init RUN`` (a
    pretrain-debug or curriculum-stage3-debug output); without ``--init`` it starts from seeded
    random weights, which is pretraining on the curated subset, not fine-tuning. Curated: 48²
    buckets, no abnormal elements, no watermarks, no icons (:data:`DEBUG_CURATED`); T2I :
    editing 7:3 as in the last stage; lr 3e-4, a third of the stages'.
    """
    loop = LoopConfig(
        optimizer=OptimizerConfig(lr=3e-4, warmup_steps=2),
        max_steps=60,
        checkpoint_every=20,
        keep_checkpoints=2,
        seed=0,
    )
    data = DataConfig(
        synthetic=debug_synthetic(),
        batch_size=4,
        target_area=48 * 48,
        edit_fraction=0.3,
        filter=DEBUG_CURATED,
    )
    return PretrainConfig(model=_debug_model(), data=data, loop=loop)

"""The ports: everything the loop asks of models, data, judges and launchers.

The loop (mining, attribution, the tracks, the rounds, the gate) talks to a team's stack
only through these typed interfaces; a project file (:mod:`flywheel.project`) picks the
adapter that fills each one. Adapters live in :mod:`flywheel.adapters` (a team's formats)
and :mod:`flywheel.world.adapters` (the embedded world); this module imports neither.

Images cross every port as tensors ``(N, 3, H, W)`` (or ``(3, H, W)`` for one) of floats
in ``[0, 1]``, on the CPU. Errors a part reports about itself (a service down, a file
that does not decode, a command that failed) are :class:`PortError`: the cycle pauses or
retries on them and writes no half artefact.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from torch import Tensor

PortName = Literal[
    "generator",
    "judge",
    "suites",
    "reward",
    "enhancer",
    "corpus",
    "degrader",
    "synthesizer",
    "launcher",
]
"""The parts a project file fills, one section each."""

PORTS: tuple[PortName, ...] = (
    "generator",
    "judge",
    "suites",
    "reward",
    "enhancer",
    "corpus",
    "degrader",
    "synthesizer",
    "launcher",
)
OPTIONAL_PORTS: frozenset[PortName] = frozenset({"synthesizer"})
"""Ports a project may leave out (the gap track then only retrieves)."""


class PortError(RuntimeError):
    """A part of the stack failed at what it was asked (the message says what and why, in
    one line); the cycle pauses or retries and keeps what it had."""

    def __init__(self, port: PortName, message: str) -> None:
        super().__init__(f"{port}: {message}")
        self.port: PortName = port
        self.reason = message


# ---- generator -------------------------------------------------------------------------------


@runtime_checkable
class ImageGenerator(Protocol):
    """Text-to-image and editing, seeded: the same call gives the same images."""

    @property
    def checkpoint(self) -> Path:
        """The directory the generator was loaded from (a round starts from it)."""
        ...

    def generate(
        self, prompts: Sequence[str], *, seed: int, input_images: Tensor | None = None
    ) -> Tensor:
        """Images ``(N, 3, H, W)`` in [0, 1] for ``prompts``; with ``input_images``
        ``(N, 3, H, W)`` the prompts are editing instructions applied to them."""
        ...


# ---- judge -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ElementVerdict:
    """The judge's word on one element the prompt asks for ("a red car", "the count: 3")."""

    element: str
    passed: bool
    score: float
    """Confidence that the element is right, in [0, 1]."""
    reason: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    """The judge's word on one image: per element, and overall."""

    elements: tuple[ElementVerdict, ...]

    @property
    def passed(self) -> bool:
        """Every element passes (an image with no element judged does not)."""
        return bool(self.elements) and all(e.passed for e in self.elements)

    @property
    def score(self) -> float:
        """The elements' mean score (0 with none)."""
        return fmean(e.score for e in self.elements) if self.elements else 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class JudgeRequest:
    """One image to judge against its prompt (and the structured spec, when known)."""

    prompt: str
    image: Tensor
    """``(3, H, W)`` in [0, 1]."""
    spec: Mapping[str, JsonValue] | None = None
    """What the prompt asks for, structured (the suite's ``spec``); None: the judge reads the
    prompt alone."""


@runtime_checkable
class Judge(Protocol):
    """Per-element verdicts: a VLM, a detector, the world's ground truth."""

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        """One verdict per request, in order; :class:`PortError` when the judge fails."""
        ...


# ---- prompt suites ---------------------------------------------------------------------------


class SuitePrompt(BaseModel):
    """One prompt of a suite (a line of a suite JSONL)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    spec: dict[str, JsonValue] | None = None
    """Structured elements the judge checks (None: the prompt alone)."""
    tags: list[str] = Field(default_factory=list)
    """Slices the prompt belongs to (``skill:count``, ``colour:purple``, ...)."""
    skill: str | None = None
    input_images: list[str] = Field(default_factory=list)
    """Editing: the input images' URIs (empty: text-to-image)."""


@runtime_checkable
class PromptSuites(Protocol):
    """Standard, regression and per-tag slices of prompts."""

    def names(self) -> list[str]:
        """The suites there are (``standard`` and ``regression`` at least)."""
        ...

    def suite(self, name: str) -> list[SuitePrompt]:
        """The prompts of suite ``name`` (``KeyError`` when there is none)."""
        ...

    def tagged(self, tag: str) -> list[SuitePrompt]:
        """Every prompt of every suite with ``tag`` (a slice)."""
        ...


# ---- reward ----------------------------------------------------------------------------------


class LabeledComparison(BaseModel):
    """Two images of one prompt and which one a person preferred (pairwise feedback, or a
    thumbs-up image against a thumbs-down one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    preferred: str
    """URI of the preferred image."""
    rejected: str
    """URI of the other one."""
    category: str = "default"
    """What the comparison is about (a skill, a flag); recalibration is per category."""


class RewardAgreement(BaseModel):
    """How often a reward prefers what people preferred, per category."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agreement: dict[str, float]
    """category -> share of comparisons the reward gets right."""
    comparisons: dict[str, int]
    """category -> comparisons counted."""


@runtime_checkable
class RewardModel(Protocol):
    """Scores images against prompts (higher: better)."""

    @property
    def checkpoint(self) -> Path:
        """The directory the reward was loaded from."""
        ...

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``(N,)`` scores of ``images`` ``(N, 3, H, W)`` under ``prompts``."""
        ...


# ---- prompt enhancer -------------------------------------------------------------------------


@runtime_checkable
class PromptEnhancer(Protocol):
    """Rewrites terse user prompts into what the generator draws well."""

    @property
    def checkpoint(self) -> Path:
        """The directory the enhancer was loaded from (a round starts from it)."""
        ...

    def enhance(self, prompts: Sequence[str]) -> list[str]:
        """One rewrite per prompt, in order."""
        ...


# ---- corpus ----------------------------------------------------------------------------------

CorpusSplit = Literal["train", "pool"]
"""``train``: what the model was trained on (density, tag counts); ``pool``: candidates
the gap track may retrieve from."""


class CorpusItem(BaseModel):
    """One image with its captions (a line of a dataset's ``records.jsonl``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    image: str = Field(min_length=1)
    """The image's URI (``file://`` for a dataset directory's files)."""
    rich_caption: str
    """The detailed caption the generator is trained on."""
    raw_caption: str = ""
    """The terse caption a user would write (empty: none)."""
    tags: list[str] = Field(default_factory=list)
    """Concepts the item shows (``colour:purple``, ``object:car``); density is counted by
    tag where there are tags."""
    split: CorpusSplit = "train"
    provenance: dict[str, str] = Field(default_factory=dict)
    """Where the item comes from (dataset, source URI, licence, ...)."""


@runtime_checkable
class Corpus(Protocol):
    """The training set and the candidate pool."""

    @property
    def name(self) -> str:
        """The dataset's name (its index is kept under it)."""
        ...

    def items(self, split: CorpusSplit) -> Iterator[CorpusItem]:
        """Every item of ``split``, in a stable order; :class:`PortError` on a broken file."""
        ...

    def image(self, item: CorpusItem) -> Tensor:
        """The item's image ``(3, H, W)`` in [0, 1]; :class:`PortError` when it cannot be
        read or decoded."""
        ...


# ---- degrader and synthesizer ----------------------------------------------------------------


@runtime_checkable
class CaptionDegrader(Protocol):
    """Rich captions to terse user-style prompts (reverse-engineered enhancer pairs)."""

    def degrade(self, captions: Sequence[str], *, seed: int) -> list[str]:
        """One terse prompt per caption, in order."""
        ...


@runtime_checkable
class Synthesizer(Protocol):
    """New samples showing a concept the corpus lacks (optional)."""

    def synthesize(self, concept: str, count: int, *, out: Path, seed: int) -> list[CorpusItem]:
        """``count`` new items showing ``concept``, their images written under ``out``."""
        ...


# ---- launcher --------------------------------------------------------------------------------

Recipe = Literal["continued_pretraining", "flow_grpo", "diffusion_dpo", "pe_sft"]


class RoundManifest(BaseModel):
    """What a training round is, written as JSON before it starts (``manifest.json`` in the
    round's directory): a launcher needs nothing else to run it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["flywheel-round/1"] = "flywheel-round/1"
    round_id: int
    cycle_id: int
    track: str
    recipe: Recipe
    base_checkpoint: str
    """The directory the round starts from (a generator or an enhancer)."""
    artefacts: dict[str, str]
    """Name -> path of each input file (``pairs``, ``dataset``, ``preferences``, ...)."""
    budget: dict[str, int]
    """Steps per stage (``pretrain``, ``vae``, ``flow_grpo``, ``pe_sft``, ...)."""
    settings: dict[str, JsonValue] = Field(default_factory=dict)
    """The track's training settings (learning rate, batch size, seed, ...)."""
    output_dir: str
    """Where the round writes its checkpoint (the candidate component directory)."""
    work_dir: str
    """Where it may keep state between attempts (checkpoints to resume from)."""
    device: str = "cpu"


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchResult:
    """A finished round."""

    checkpoint: Path
    """The candidate component directory (``manifest.output_dir``)."""
    metrics: dict[str, JsonValue] = field(default_factory=dict)
    """What the round reported (``metrics.json`` in the output directory, when written)."""


@runtime_checkable
class TrainingLauncher(Protocol):
    """Runs a round from its manifest and returns its checkpoint."""

    def launch(self, manifest: Path) -> LaunchResult:
        """Run the round at ``manifest`` (a :class:`RoundManifest` JSON) to the end;
        :class:`PortError` when it fails (its output directory is then not a checkpoint)."""
        ...

    def check(self) -> str:
        """A dry run: what would run, or :class:`PortError` when it cannot."""
        ...

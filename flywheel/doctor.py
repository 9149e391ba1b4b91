"""``flywheel doctor``: load every part of a project and run a one-sample smoke of each.

Per part: build it from its section, then ask it for one thing — generate one image, judge
it, score it, rewrite one prompt, read one corpus item and its image, degrade its caption,
synthesize one sample (when a synthesizer is configured), dry-run the launcher. Each part is
checked on its own: when the generator fails, the judge and the reward are asked about a
plain grey image instead, so one broken part does not hide the others' state.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flywheel.adapters.base import AdapterContext
from flywheel.ports import PORTS, JudgeRequest, PortError, PortName, SuitePrompt
from flywheel.project import Project, ProjectError, build_part

SMOKE_PROMPT = "a red circle on a white background"
"""What the smoke asks for when the suites give no prompt."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PartCheck:
    """One part's state."""

    port: PortName
    adapter: str | None
    """None: an optional part the project leaves out."""
    ok: bool
    detail: str
    """What the smoke saw (ok) or why the part fails (one line)."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if isinstance(exc, PortError | ProjectError) else f"{type(exc).__name__}: {line}"


class _Smoke:
    """The smoke of every part, sharing what one part's answer gives the next."""

    def __init__(self, project: Project, context: AdapterContext, scratch: Path) -> None:
        self.project = project
        self.context = context
        self.scratch = scratch
        self.prompt = SuitePrompt(id="smoke", prompt=SMOKE_PROMPT)
        self.image: Tensor = torch.full((3, 64, 64), 0.5)
        self.caption = "A picture with a white background showing a large red circle."

    def run(self, port: PortName) -> PartCheck:
        section = self.project.section(port)
        adapter = section.adapter if section is not None else None
        try:
            built = build_part(self.project, port, self.context)
            if built is None:
                return PartCheck(port=port, adapter=None, ok=True, detail="not configured")
            detail = getattr(self, f"_{port}")(built.part)
        except Exception as exc:  # every failure of a part is reported, not raised
            return PartCheck(port=port, adapter=adapter, ok=False, detail=_one_line(exc))
        return PartCheck(port=port, adapter=adapter, ok=True, detail=detail)

    def _suites(self, part: Any) -> str:
        names = part.names()
        missing = [n for n in ("standard", "regression") if n not in names]
        if missing:
            raise PortError("suites", f"no {' or '.join(missing)} suite")
        standard = part.suite("standard")
        if not standard:
            raise PortError("suites", "the standard suite is empty")
        self.prompt = standard[0]
        sizes = ", ".join(f"{n} {len(part.suite(n))}" for n in names)
        return f"suites: {sizes}"

    def _generator(self, part: Any) -> str:
        images = part.generate([self.prompt.prompt], seed=0)
        if images.ndim != 4 or images.shape[:2] != (1, 3):
            raise PortError("generator", f"returned {tuple(images.shape)}, not (1, 3, H, W)")
        if float(images.min()) < 0.0 or float(images.max()) > 1.0:
            raise PortError("generator", "returned values outside [0, 1]")
        self.image = images[0]
        height, width = images.shape[-2:]
        return f"generated one {width}x{height} image"

    def _judge(self, part: Any) -> str:
        request = JudgeRequest(prompt=self.prompt.prompt, image=self.image, spec=self.prompt.spec)
        verdicts = part.judge([request])
        if len(verdicts) != 1:
            raise PortError("judge", f"{len(verdicts)} verdicts for one image")
        verdict = verdicts[0]
        state = "passes" if verdict.passed else "fails"
        return f"{len(verdict.elements)} element(s) judged, the image {state}"

    def _reward(self, part: Any) -> str:
        scores = part.score(self.image.unsqueeze(0), [self.prompt.prompt])
        if tuple(scores.shape) != (1,) or not torch.isfinite(scores).all():
            raise PortError("reward", f"scored {scores!r}, not one finite number")
        return f"score {float(scores[0]):.3f}"

    def _enhancer(self, part: Any) -> str:
        rewrites = part.enhance([self.prompt.prompt])
        if len(rewrites) != 1 or not isinstance(rewrites[0], str):
            raise PortError("enhancer", "did not return one rewrite for one prompt")
        return f"rewrote one prompt ({len(rewrites[0])} characters)"

    def _corpus(self, part: Any) -> str:
        item = next(iter(part.items("train")), None)
        if item is None:
            raise PortError("corpus", "the train split is empty")
        image = part.image(item)
        self.caption = item.rich_caption or self.caption
        height, width = image.shape[-2:]
        return f"read {item.id} ({width}x{height})"

    def _degrader(self, part: Any) -> str:
        terse = part.degrade([self.caption], seed=0)
        if len(terse) != 1:
            raise PortError("degrader", "did not return one prompt for one caption")
        return f"{len(self.caption.split())} words -> {len(terse[0].split())}"

    def _synthesizer(self, part: Any) -> str:
        concept = self.prompt.tags[0] if self.prompt.tags else "colour:red"
        if concept.startswith("skill:"):
            concept = "colour:red"
        items = part.synthesize(concept, 1, out=self.scratch / "synth", seed=0)
        return f"synthesized {len(items)} sample(s) of {concept}"

    def _launcher(self, part: Any) -> str:
        return str(part.check())


def run_doctor(project: Project, context: AdapterContext) -> list[PartCheck]:
    """Every part's check, in smoke order (suites first: its prompt is the smoke's)."""
    order: list[PortName] = ["suites", "generator", "judge", "reward", "enhancer", "corpus"]
    order += [p for p in PORTS if p not in order]
    with tempfile.TemporaryDirectory(prefix="flywheel-doctor-") as scratch:
        smoke = _Smoke(project, context, Path(scratch))
        return [smoke.run(port) for port in order]

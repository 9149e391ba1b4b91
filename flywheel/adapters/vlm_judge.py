"""A judge from a local transformers vision-language model, asked yes or no per element.

In the style of VQA-based text-to-image evaluation (TIFA, VQAScore): each element the prompt
asks for becomes a question about the image (``question``, default "Does the image show
{element}? Answer yes or no."), and the element's score is the model's probability of
answering yes against no at the first answer token,

    score = P(yes) / (P(yes) + P(no))

read off the next-token logits after the question (no text is generated). ``P(yes)`` sums the
probabilities of the first tokens of "Yes", "yes", "YES" (with and without a leading space),
``P(no)`` those of "No", "no", "NO"; a token both answers begin with counts for neither. The
element passes when its score reaches ``threshold``.

The elements of a request come from its spec, when the spec has ``elements``::

    {"elements": ["a red circle", "two cats",
                  {"element": "the text 'OPEN'", "question": "Does the sign read OPEN?"}]}

each a non-empty string (asked with ``question``) or an object with the ``element`` and,
optionally, its own ``question``. Other keys of the spec are ignored. A request without a
spec, or whose spec has no ``elements``, is judged on one element: its whole prompt.

The model directory is what ``save_pretrained`` writes for a model that
``AutoModelForImageTextToText`` and ``AutoProcessor`` load (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA, Idefics3, SmolVLM, ...): its config, weights, and processor files (tokenizer, image
processor, chat template). It is loaded when the judge is built, with
``local_files_only=True`` (a path, never a hub id), on the project's device. Each question
is rendered with the processor's chat template as one user turn (the image, then the
question) followed by the assistant's header; a processor without a chat template gets the
image token followed by the question. Questions are batched (left-padded) ``batch_size`` at
a time; the same requests give the same verdicts.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from pydantic import Field, JsonValue, field_validator
from torch import Tensor

from flywheel.adapters.base import Adapter, AdapterContext, AdapterSettings
from flywheel.ports import ElementVerdict, JudgeRequest, PortError, Verdict
from model.torchvision_compat import import_torchvision

DEFAULT_QUESTION = "Does the image show {element}? Answer yes or no."
YES_ANSWERS = ("Yes", "yes", "YES", " Yes", " yes", " YES")
"""Answers counted as yes (the first token of each)."""
NO_ANSWERS = ("No", "no", "NO", " No", " no", " NO")
"""Answers counted as no (the first token of each)."""

VlmDtype = Literal["auto", "float32", "bfloat16", "float16"]


class VlmJudgeSettings(AdapterSettings):
    """The ``[judge]`` table of ``adapter = "vlm"``."""

    path: Path
    """The model directory (relative: to the project file's directory)."""
    question: str = DEFAULT_QUESTION
    """The question asked per element; ``{element}`` is replaced by the element."""
    threshold: float = Field(default=0.5, ge=0, le=1)
    """An element passes when its score, P(yes) / (P(yes) + P(no)), is at least this."""
    batch_size: int = Field(default=8, ge=1, le=1024)
    """Questions (one image each) per forward pass."""
    dtype: VlmDtype = "auto"
    """Weights dtype; ``auto``: bfloat16 on CUDA, float32 elsewhere."""

    @field_validator("question")
    @classmethod
    def _asks_about_the_element(cls, value: str) -> str:
        if "{element}" not in value:
            raise ValueError("must contain {element}, where the element goes")
        return value


@dataclass(frozen=True, slots=True)
class Question:
    """One element of one request, as asked."""

    request: int
    """Index of the request it belongs to."""
    element: str
    text: str


def questions_of(
    index: int, request: JudgeRequest, template: str = DEFAULT_QUESTION
) -> list[Question]:
    """The questions request number ``index`` asks (see the module doc for the spec shape);
    :class:`PortError` when its spec's ``elements`` are not of that shape."""
    if request.spec is None or "elements" not in request.spec:
        return [Question(index, request.prompt, template.replace("{element}", request.prompt))]
    elements = request.spec["elements"]
    if not isinstance(elements, list) or not elements:
        raise PortError("judge", f"request {index}: spec.elements must be a non-empty list")
    questions = []
    for number, entry in enumerate(elements):
        element: JsonValue = entry
        asked: JsonValue = None
        if isinstance(entry, Mapping):
            element, asked = entry.get("element"), entry.get("question")
        if not (isinstance(element, str) and element.strip()) or not (
            asked is None or (isinstance(asked, str) and asked.strip())
        ):
            raise PortError(
                "judge",
                f"request {index}: spec.elements[{number}] must be a non-empty string or "
                '{"element": "...", "question": "..."} (question optional)',
            )
        text = asked if isinstance(asked, str) else template.replace("{element}", element)
        questions.append(Question(index, element, text))
    return questions


def to_pil(image: Tensor) -> Image.Image:
    """``image`` ``(3, H, W)`` in [0, 1] as an 8-bit RGB picture."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"an image must be (3, H, W), not {tuple(image.shape)}")
    pixels = (image.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def answer_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The token ids a yes and a no answer begin with (:data:`YES_ANSWERS`,
    :data:`NO_ANSWERS`), less those both begin with; :class:`ValueError` when either side
    is left with none."""

    def first_tokens(answers: Sequence[str]) -> set[int]:
        firsts = set()
        for answer in answers:
            ids = tokenizer.encode(answer, add_special_tokens=False)
            if ids:
                firsts.add(int(ids[0]))
        return firsts

    yes, no = first_tokens(YES_ANSWERS), first_tokens(NO_ANSWERS)
    yes, no = yes - no, no - yes
    if not yes or not no:
        raise ValueError("its tokenizer does not tell a yes answer from a no at the first token")
    return sorted(yes), sorted(no)


class VlmJudge:
    """The :class:`~flywheel.ports.Judge` of a local vision-language model (see the module
    doc). Calls are serialized (one forward pass at a time)."""

    def __init__(self, settings: VlmJudgeSettings, directory: Path, device: str) -> None:
        self._settings = settings
        self._directory = directory
        self._lock = threading.Lock()
        where = f"vlm {directory}"
        if not directory.is_dir():
            raise PortError("judge", f"{where}: not a local directory")
        if not (directory / "config.json").is_file():
            raise PortError("judge", f"{where}: not a model directory (no config.json)")
        try:
            self._device = torch.device(device)
        except RuntimeError as exc:
            raise PortError("judge", f"{where}: device {device!r}: {_reason(exc)}") from None
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise PortError("judge", f"{where}: device {device!r}, but CUDA is not available")
        dtype = settings.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self._device.type == "cuda" else "float32"
        self._dtype: torch.dtype = getattr(torch, dtype)

        import_torchvision()  # transformers' modeling imports torchvision: see that module
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
            reason = _reason(exc)
            raise PortError("judge", f"{where}: cannot load its processor ({reason})") from exc
        tokenizer = getattr(processor, "tokenizer", None)
        if getattr(processor, "image_processor", None) is None or tokenizer is None:
            raise PortError(
                "judge",
                f"{where}: not a vision-language model (its processor, a "
                f"{type(processor).__name__}, lacks an image processor or a tokenizer)",
            )
        try:
            self._yes, self._no = answer_tokens(tokenizer)
        except ValueError as exc:
            raise PortError("judge", f"{where}: {exc}") from None
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                str(directory), local_files_only=True, dtype=self._dtype
            )
            self._model = model.to(self._device).eval().requires_grad_(False)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
            reason = _reason(exc)
            raise PortError(
                "judge", f"{where}: cannot load an image-text-to-text model ({reason})"
            ) from exc
        tokenizer.padding_side = "left"  # the answer is read at the last position
        self._processor = processor
        self._keep_last = "logits_to_keep" in inspect.signature(self._model.forward).parameters

    @property
    def checkpoint(self) -> Path:
        """The directory the model was loaded from."""
        return self._directory

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        """One verdict per request, in order: per element, P(yes) / (P(yes) + P(no))."""
        questions = [
            q
            for index, request in enumerate(requests)
            for q in questions_of(index, request, self._settings.question)
        ]
        pictures = [to_pil(request.image) for request in requests]
        size = self._settings.batch_size
        scored: list[tuple[float, float, float]] = []
        with self._lock:
            for start in range(0, len(questions), size):
                scored.extend(self._answer(questions[start : start + size], pictures))
        per_request: list[list[ElementVerdict]] = [[] for _ in requests]
        threshold = self._settings.threshold
        for question, (score, p_yes, p_no) in zip(questions, scored, strict=True):
            per_request[question.request].append(
                ElementVerdict(
                    element=question.element,
                    passed=score >= threshold,
                    score=score,
                    reason=f"P(yes)={p_yes:.3g}, P(no)={p_no:.3g}",
                )
            )
        return [Verdict(elements=tuple(elements)) for elements in per_request]

    def check(self) -> str:
        """Judge one probe image (a grey square) and say what the model made of it."""
        probe = JudgeRequest(prompt="a grey square", image=torch.full((3, 32, 32), 0.5))
        began = time.perf_counter()
        (verdict,) = self.judge([probe])
        took = (time.perf_counter() - began) * 1000
        kind = getattr(self._model.config, "model_type", "?")
        return (
            f"vlm {self._directory}: {kind} on {self._device} ({self._dtype}), "
            f"probe scored {verdict.score:.3f} in {took:.0f} ms"
        )

    def _prompt(self, question: str) -> str:
        processor = self._processor
        if getattr(processor, "chat_template", None):
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": question}],
                }
            ]
            text: str = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return text
        image_token = getattr(processor, "image_token", None)
        return f"{image_token}{question}" if isinstance(image_token, str) else question

    def _answer(
        self, questions: Sequence[Question], pictures: Sequence[Image.Image]
    ) -> list[tuple[float, float, float]]:
        """(score, P(yes), P(no)) of each question, in one forward pass."""
        try:
            inputs = self._processor(
                images=[[pictures[q.request]] for q in questions],
                text=[self._prompt(q.text) for q in questions],
                return_tensors="pt",
                padding=True,
            )
            batch = {
                name: (
                    value.to(self._device, self._dtype)
                    if value.is_floating_point()
                    else value.to(self._device)
                )
                if isinstance(value, Tensor)
                else value
                for name, value in inputs.items()
            }
            if self._keep_last:
                batch["logits_to_keep"] = 1
            with torch.inference_mode():
                logits = self._model(**batch).logits[:, -1].float()
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            raise PortError("judge", f"vlm {self._directory}: {_reason(exc)}") from exc
        log_all = logits.logsumexp(dim=-1)
        log_yes = logits[:, self._yes].logsumexp(dim=-1)
        log_no = logits[:, self._no].logsumexp(dim=-1)
        scores = torch.sigmoid(log_yes - log_no)
        p_yes, p_no = (log_yes - log_all).exp(), (log_no - log_all).exp()
        return [
            (float(s), float(y), float(n))
            for s, y, n in zip(scores.cpu(), p_yes.cpu(), p_no.cpu(), strict=True)
        ]


def _build(settings: VlmJudgeSettings, context: AdapterContext) -> VlmJudge:
    """The judge of ``settings``: the model loaded from ``path`` on the project's device."""
    return VlmJudge(settings, context.path(settings.path), context.device)


JUDGE: Adapter[VlmJudgeSettings] = Adapter(
    settings=VlmJudgeSettings,
    build=_build,
    summary="a local transformers VLM directory asked yes/no per element (VQAScore-style)",
)

__all__ = [
    "DEFAULT_QUESTION",
    "JUDGE",
    "NO_ANSWERS",
    "YES_ANSWERS",
    "Question",
    "VlmJudge",
    "VlmJudgeSettings",
    "answer_tokens",
    "questions_of",
    "to_pil",
]

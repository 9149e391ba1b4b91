"""The two small networks of the ground-truth evaluator, trained on rendered scenes.

:class:`ShapeNet` classifies one segmented component: a crop of its colour's coverage map
(:data:`CROP` x :data:`CROP`, two channels: every pixel of that colour, and the component's own
pixels) and its extent as a fraction of the canvas' shorter side. Its classes are the six
shapes and ``"text"`` (a glyph, part of one, or a clump of glyphs): :data:`SHAPE_CLASSES`.

:class:`TextNet` reads one text line, a CRNN: a coverage crop scaled to :data:`LINE_HEIGHT`
rows, three convolutions with batch norm (width / 4 columns left), two convolutions along the
columns and
per-column log-probabilities over :data:`ALPHABET` plus the CTC blank (index 0). Padded
columns of a batch are masked after every layer, so a line reads the same alone and in a
batch (in eval mode). :func:`ctc_greedy_decode` collapses repeats and drops blanks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flywheel.world.scenes import HAN_WORDS, LATIN_WORDS, SHAPES

SHAPE_CLASSES: tuple[str, ...] = (*SHAPES, "text")
"""What a component can be: one of the shapes, or text."""

TEXT_CLASS = len(SHAPES)
"""The index of ``"text"`` in :data:`SHAPE_CLASSES`."""

ALPHABET: str = "".join(sorted({c for word in LATIN_WORDS + HAN_WORDS for c in word}))
"""Every character a text of the world may hold; CTC class ``k + 1`` is ``ALPHABET[k]``."""

CROP = 24
"""Side of a component crop, in pixels."""

SCALE_FEATURES = 5
"""Scalars beside a component crop: width, height and sqrt(area) over the shorter canvas side,
height / width and area / box area."""

LINE_HEIGHT = 12
"""Rows of a text-line crop."""

LINE_STRETCH = 1.5
"""Horizontal over vertical scale of a line crop (more columns per character for CTC)."""

LINE_STRIDE = 4
"""Crop columns per output column of :class:`TextNet`."""


class ShapeNet(nn.Module):
    """Component crop + extent -> logits over :data:`SHAPE_CLASSES`."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 12 x 12
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 6 x 6
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 3 x 3
        )
        self.head = nn.Sequential(
            nn.Linear(32 * 9 + SCALE_FEATURES, 64),
            nn.ReLU(),
            nn.Linear(64, len(SHAPE_CLASSES)),
        )

    def forward(self, crops: Tensor, scale: Tensor) -> Tensor:
        """crops (B, 2, CROP, CROP), scale (B, SCALE_FEATURES) -> logits (B, classes)."""
        h = self.features(crops).flatten(1)  # (B, 288)
        return self.head(torch.cat([h, scale], dim=1))  # type: ignore[no-any-return]


class MaskedBatchNorm(nn.Module):
    """Batch norm over the valid columns only: padding does not enter the statistics."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x (B, C, H, W), keep (B, 1, 1, W) in {0, 1} -> normalised x."""
        running_mean, running_var = self.running_mean, self.running_var
        assert isinstance(running_mean, Tensor)
        assert isinstance(running_var, Tensor)
        if self.training:
            count = keep.sum() * x.shape[2]
            mean = (x * keep).sum((0, 2, 3)) / count  # (C,)
            var = ((x - mean.view(1, -1, 1, 1)) ** 2 * keep).sum((0, 2, 3)) / count
            with torch.no_grad():
                running_mean.lerp_(mean, self.momentum)
                running_var.lerp_(var * count / (count - 1).clamp(min=1), self.momentum)
        else:
            mean, var = running_mean, running_var
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * scale.view(1, -1, 1, 1) + (self.bias - mean * scale).view(1, -1, 1, 1)


class TextNet(nn.Module):
    """Line crops -> per-column CTC log-probabilities over blank + :data:`ALPHABET`."""

    def __init__(self, hidden: int = 96) -> None:
        super().__init__()
        widths = ((1, 16), (16, 32), (32, 48))
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in widths)
        self.norms = nn.ModuleList(MaskedBatchNorm(b) for _, b in widths)
        self.project = nn.Conv1d(48 * (LINE_HEIGHT // 4), 64, 1)
        self.sequence = nn.ModuleList(
            [nn.Conv1d(64, hidden, 5, padding=2), nn.Conv1d(hidden, hidden, 5, padding=2)]
        )
        self.out = nn.Conv1d(hidden, len(ALPHABET) + 1, 1)

    @staticmethod
    def _keep(widths: Tensor, columns: int) -> Tensor:
        """(B, columns) float mask: 1 on each sample's valid columns."""
        return (torch.arange(columns)[None, :] < widths[:, None]).float()

    def forward(self, lines: Tensor, widths: Tensor) -> tuple[Tensor, Tensor]:
        """lines (B, 1, LINE_HEIGHT, W), widths (B,) in crop columns.

        Returns log-probabilities (T, B, classes) and output lengths (B,), T = W // 4.
        """
        h, w = lines, widths
        pools = (2, LINE_STRIDE // 2, 0)
        for conv, norm, columns in zip(self.convs, self.norms, pools, strict=True):
            keep = self._keep(w, h.shape[-1])[:, None, None, :]  # (B, 1, 1, W)
            h = torch.relu(norm(conv(h * keep), keep))
            if columns:  # rows halved, columns divided by ``columns``
                h = nn.functional.max_pool2d(h, (2, columns))
                w = w // columns
        w = torch.clamp(w, min=1)
        keep = self._keep(w, h.shape[-1])[:, None, :]  # (B, 1, T)
        h = torch.relu(self.project(h.flatten(1, 2) * keep))  # (B, 64, T)
        for conv in self.sequence:
            h = torch.relu(conv(h * keep))  # (B, hidden, T)
        logits = self.out(h)  # (B, classes, T)
        return logits.log_softmax(1).permute(2, 0, 1), w


def ctc_greedy_decode(log_probs: Tensor, lengths: Tensor) -> list[str]:
    """Best path per sample of ``log_probs`` (T, B, classes): repeats merged, blanks dropped."""
    best = log_probs.argmax(-1).transpose(0, 1).tolist()  # (B, T)
    texts = []
    for path, length in zip(best, lengths.tolist(), strict=True):
        chars, previous = [], 0
        for k in path[:length]:
            if k != previous and k != 0:
                chars.append(ALPHABET[k - 1])
            previous = k
        texts.append("".join(chars))
    return texts

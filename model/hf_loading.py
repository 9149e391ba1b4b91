"""Frozen Hugging Face models and their tokenizers, from local directories only.

What :mod:`model.condition` and :mod:`model.prompt_enhancer` share when they load: a path is
checked to be a local directory before ``from_pretrained`` sees it (a string that is not a
directory would be taken for a hub id), loading passes ``local_files_only=True``, torchvision
is made importable before transformers' modeling code imports it
(:func:`model.torchvision_compat.import_torchvision`), and the model comes back in eval mode
with gradients off. Nothing global is set at import, or at any time.

Tokenizers: both users pad batches, and a tokenizer without a pad token gets its end-of-sequence
token as one (the padding is masked out, so any token will do). :func:`load_tokenizer` sets it on
the instance it has just loaded; :func:`with_pad_token` never changes a tokenizer it is given,
and returns a copy where one is needed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from model.torchvision_compat import import_torchvision

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TorchDtype = Literal["float32", "bfloat16", "float16"]
# The transformers auto class that builds the model: the base model, or a causal LM with its head.
AutoClass = Literal["AutoModel", "AutoModelForCausalLM"]


def require_local_dir(path: Path, what: str, error: type[Exception] = ValueError) -> Path:
    """``path``, after checking it is a local directory; else raise ``error`` naming ``what``."""
    if not path.is_dir():
        raise error(f"{what} {path}: not a local directory")
    return path


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` itself, in eval mode with every parameter's ``requires_grad`` off."""
    return model.eval().requires_grad_(False)


def load_frozen(
    auto_class: AutoClass,
    path: Path,
    *,
    dtype: TorchDtype,
    device: torch.device | str = "cpu",
) -> PreTrainedModel:
    """The model in the local directory ``path``, in ``dtype`` on ``device``, frozen.

    ``path`` must already have passed :func:`require_local_dir`.
    """
    import_torchvision()  # transformers' modeling imports torchvision: see the module doc
    import transformers

    loader = getattr(transformers, auto_class)
    model = loader.from_pretrained(str(path), dtype=getattr(torch, dtype), local_files_only=True)
    return freeze(model.to(device))


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer in the local directory ``path``, with a pad token (see the module doc).

    ``path`` must already have passed :func:`require_local_dir`.
    """
    import_torchvision()  # as in load_frozen: transformers may import torchvision on the way
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:  # our own instance: set it in place
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """``tokenizer`` if it has a pad token; else a copy whose pad token is its end of sequence.

    The tokenizer passed in is never changed.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    padded = copy.deepcopy(tokenizer)
    padded.pad_token = padded.eos_token
    return padded

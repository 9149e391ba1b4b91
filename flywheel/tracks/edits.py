"""A reviewer's edits to a track's artefact on a team's stack: what each artefact takes
(:func:`enhancer_vocabulary`, :func:`gap_vocabulary`, :func:`reward_vocabulary`, declared
on its review item) and the edited artefact a round then trains on
(:func:`edit_enhancer_pairs`, :func:`edit_gap_data`, :func:`edit_reward_data`).

The vocabulary per track (:mod:`flywheel.review.edits` checks a reviewer's edits against it):

- **prompt enhancer** (``prompt_enhancer_data``): ``{"drop": [3, "violet square"]}`` — pairs
  of ``pairs.jsonl`` by their index (line, from 0) or their prompt (every pair with it);
- **pretraining gap** (``augmentation_batch``): ``{"drop": ["pool-017"]}`` — augmentation
  samples by their item id: a retrieved pool item's id (the artefact's ``retrieved[].item``),
  a synthesized sample's id in ``samples.jsonl`` (``synthesized/<concept>/<id>``); the
  replayed corpus items always stay;
- **RL** (``reward_recalibration``): ``{"drop": [0, 5]}`` — preference pairs of
  ``preferences.jsonl`` by index (or prompt), and ``{"weights": {"count": 0.0}}`` — the
  reward's weight (its trust) per category, in [0, 1], over the measured one.

Edits never touch the reviewed files: the edited ones are written next to them —
``pairs.edited.jsonl``, ``dataset.edited/``, ``preferences.edited.jsonl`` and
``artefact.edited.json`` — each whole or not at all (a temporary name, then a rename), and
the returned artefact names them (the round's manifest follows).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from pydantic import BaseModel

from flywheel.review.edits import ArtefactEdits, DropVocabulary, EditVocabulary, dropped_indices
from flywheel.tracks.enhancer_data import EXAMPLES, EnhancerPair, EnhancerPairsArtefact
from flywheel.tracks.gap_data import GapArtefact
from flywheel.tracks.reward_data import RewardArtefact
from training.data import read_dataset, write_dataset
from training.io import atomic_write_text, fsync_directory, fsync_tree

EDITED_ARTEFACT = "artefact.edited.json"
"""The edited artefact, next to the reviewed ``artefact.json``."""
DROPPED_BY_REVIEW = "review"
"""A retrieved sample's ``dropped_by`` once a reviewer dropped it."""


def edited_path(path: Path) -> Path:
    """Where the edited version of a reviewed file goes: ``pairs.jsonl`` ->
    ``pairs.edited.jsonl``, ``dataset`` -> ``dataset.edited``."""
    return path.with_name(f"{path.stem}.edited{path.suffix}")


def _lines(path: Path) -> list[str]:
    """The non-empty lines of a JSONL file ("\\n" only: a prompt may hold U+2028)."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _prompts(lines: list[str]) -> list[str]:
    prompts = []
    for line in lines:
        record = json.loads(line)
        prompts.append(str(record.get("prompt", "")) if isinstance(record, dict) else "")
    return prompts


def _kept_lines(path: Path, drop: list[int | str], what: str) -> list[str]:
    lines = _lines(path)
    dropped = dropped_indices(_prompts(lines), drop, by_index=True, what=what)
    return [line for k, line in enumerate(lines) if k not in dropped]


def _write_artefact(directory: Path, artefact: BaseModel) -> None:
    atomic_write_text(directory / EDITED_ARTEFACT, artefact.model_dump_json(indent=2) + "\n")


# ---- prompt enhancer ---------------------------------------------------------------------------

PAIRS = "prompt-enhancer pairs"


def enhancer_vocabulary(artefact: EnhancerPairsArtefact) -> EditVocabulary:
    """The pairs, by index or prompt."""
    prompts = _prompts(_lines(Path(artefact.pairs_file)))
    return EditVocabulary(drop=DropVocabulary(what=PAIRS, items=prompts, by_index=True))


def edit_enhancer_pairs(
    artefact: EnhancerPairsArtefact, edits: ArtefactEdits
) -> EnhancerPairsArtefact:
    """``pairs.edited.jsonl`` without the dropped pairs, and the artefact naming it."""
    reviewed = Path(artefact.pairs_file)
    kept = _kept_lines(reviewed, edits.drop, PAIRS)
    target = edited_path(reviewed)
    atomic_write_text(target, "".join(line + "\n" for line in kept))
    pairs = [EnhancerPair.model_validate_json(line) for line in kept]
    echo = sum(1 for p in pairs if p.prompt == p.target)
    edited = artefact.model_copy(
        update={
            "pairs": len(pairs),
            "degraded": len(pairs) - echo,
            "echo": echo,
            "examples": pairs[:EXAMPLES],
            "pairs_file": str(target),
        }
    )
    _write_artefact(reviewed.parent, edited)
    return edited


# ---- pretraining gap ---------------------------------------------------------------------------

SAMPLES = "augmentation samples"


def _augmentation_id(sample_id: str) -> str | None:
    """A dataset sample's id as a drop names it (None: a replayed corpus item)."""
    origin, _, rest = sample_id.partition("/")
    if origin == "retrieved":
        return rest.rstrip("+")  # "+": a second sample of one item (gap_data's ids)
    if origin == "synthesized":
        return sample_id
    return None


def gap_vocabulary(artefact: GapArtefact) -> EditVocabulary:
    """The augmentation samples (retrieved and synthesized) by their item id."""
    ids = [_augmentation_id(s.id) for s in read_dataset(artefact.dataset_dir, check_images=False)]
    items = [i for i in ids if i is not None]
    return EditVocabulary(
        drop=DropVocabulary(
            what=SAMPLES, items=items, by_index=False, kept_anyway=len(ids) - len(items)
        )
    )


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def edit_gap_data(artefact: GapArtefact, edits: ArtefactEdits) -> GapArtefact:
    """``dataset.edited/`` (``samples.jsonl`` and the kept samples' images, linked) without
    the dropped samples, built in a temporary sibling and renamed into place; the artefact
    naming it (each dropped retrieved item's ``dropped_by``: ``review``)."""
    reviewed = Path(artefact.dataset_dir)
    samples = read_dataset(reviewed, check_images=False)
    ids = [_augmentation_id(s.id) for s in samples]
    droppable = [(k, i) for k, i in enumerate(ids) if i is not None]
    named = dropped_indices([i for _, i in droppable], edits.drop, by_index=False, what=SAMPLES)
    dropped = {droppable[n][0] for n in named}
    kept = [s for k, s in enumerate(samples) if k not in dropped]
    target = edited_path(reviewed)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=reviewed.parent))
    try:
        for sample in kept:
            _link(reviewed / sample.image, work / sample.image)
        write_dataset(work, kept)
        fsync_tree(work)
        if target.exists():  # an earlier attempt's, never trained on: its edits were not recorded
            shutil.rmtree(target)
        work.rename(target)
        fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    gone = {ids[k] for k in dropped}
    origins = Counter(s.id.partition("/")[0] for s in kept)
    edited = artefact.model_copy(
        update={
            "retrieved": [
                r.model_copy(update={"dropped_by": DROPPED_BY_REVIEW})
                if r.dropped_by is None and r.item in gone
                else r
                for r in artefact.retrieved
            ],
            "dataset_dir": str(target),
            "samples": len(kept),
            "augmentation": {o: origins[o] for o in ("retrieved", "synthesized")},
        }
    )
    _write_artefact(reviewed.parent, edited)
    return edited


# ---- RL ----------------------------------------------------------------------------------------

PREFERENCES = "preference pairs"


def reward_vocabulary(artefact: RewardArtefact) -> EditVocabulary:
    """The preference pairs by index (or prompt), and the weight of each category."""
    prompts = _prompts(_lines(Path(artefact.preferences_file)))
    return EditVocabulary(
        drop=DropVocabulary(what=PREFERENCES, items=prompts, by_index=True),
        weights=sorted(set(artefact.comparisons) | set(artefact.weights)),
    )


def _counts(values: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


def edit_reward_data(artefact: RewardArtefact, edits: ArtefactEdits) -> RewardArtefact:
    """``preferences.edited.jsonl`` without the dropped pairs and the weights as the reviewer
    set them; the artefact naming it (``pairs``, ``by_source``, ``comparisons``, ``cases``
    recounted; the agreement stays what was measured on the reviewed pairs)."""
    reviewed = Path(artefact.preferences_file)
    kept = _kept_lines(reviewed, edits.drop, PREFERENCES)
    target = edited_path(reviewed)
    atomic_write_text(target, "".join(line + "\n" for line in kept))
    records = [json.loads(line) for line in kept]
    edited = artefact.model_copy(
        update={
            "preferences_file": str(target),
            "pairs": len(records),
            "by_source": _counts([str(r.get("source")) for r in records]),
            "comparisons": _counts([str(r.get("category")) for r in records]),
            "cases": sorted({int(r["case_id"]) for r in records if "case_id" in r}),
            "weights": {**artefact.weights, **edits.weights},
        }
    )
    _write_artefact(reviewed.parent, edited)
    return edited

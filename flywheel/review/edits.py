"""What a reviewer may change in an artefact before its round trains on it, and the check
of a reviewer's edits against it.

The track that builds an artefact declares what its review item takes: an
:class:`EditVocabulary` stored in the item's artefact under :data:`EDITABLE` (written by
:mod:`flywheel.tracks.edits` on a team's stack, by the embedded world's loop for the world).
The review service checks a reviewer's edits against that declaration when the artefact is
approved (:func:`check_edits`), so a bad edit is refused at once — naming the key at fault —
without the track's code or files; the round then applies the checked edits to its data.

The edit vocabulary (every key optional; an artefact takes the keys it declares):

- ``{"drop": [...]}`` — items of the artefact's training data left out of the round. An
  entry is an item's **index** (an integer, where the artefact numbers its items: enhancer
  pairs, preference pairs, the RL round's prompts) or its **id** (a string: an enhancer pair's
  or a preference pair's prompt — every item with that id —, a retrieved pool item's id such
  as ``pool:17``). Dropping every item is refused (reject the artefact instead) unless the
  round keeps other data (replayed corpus items, synthesized scenes).
- ``{"weights": {"count": 0.0}}`` — the reward recalibration's weight of the learned reward
  in a category, in [0, 1] (the verifier, where the track has one, gets the rest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from flywheel.review.errors import EditError

EDITABLE = "editable"
"""The key of an artefact item's artefact that holds its :class:`EditVocabulary`."""
DROP = "drop"
WEIGHTS = "weights"


class DropVocabulary(BaseModel):
    """The items of an artefact's training data a ``drop`` can name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    what: str
    """What the items are (``prompt-enhancer pairs``), for messages."""
    items: list[str]
    """Each droppable item's id, in the artefact's order (index ``i`` names ``items[i]``)."""
    by_index: bool
    """Whether an integer names an item by its index."""
    kept_anyway: int = Field(default=0, ge=0)
    """Training items no drop reaches (replayed corpus items, synthesized scenes)."""


class EditVocabulary(BaseModel):
    """What an artefact's review item takes as edits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drop: DropVocabulary | None = None
    weights: list[str] | None = None
    """The categories whose reward weight may be set (None: the artefact has none)."""

    def keys(self) -> list[str]:
        """The edit keys the artefact takes."""
        return [k for k, v in ((DROP, self.drop), (WEIGHTS, self.weights)) if v is not None]


class ArtefactEdits(BaseModel):
    """Checked edits (what a round applies; stored on the review item)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drop: list[int | str] = Field(default_factory=list)
    weights: dict[str, float] = Field(default_factory=dict)

    def is_empty(self) -> bool:
        return not self.drop and not self.weights


def dropped_indices(
    items: Sequence[str], drop: Sequence[int | str], *, by_index: bool, what: str = "items"
) -> set[int]:
    """The indices into ``items`` that ``drop`` names (by index, and by id: every item with
    that id); ``ValueError`` naming the first entry that names none."""
    where: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        where.setdefault(item, []).append(index)
    out: set[int] = set()
    for entry in drop:
        if isinstance(entry, bool):
            raise ValueError(f"{entry!r} is neither an index nor an id of the {what}")
        if isinstance(entry, int):
            if not by_index:
                raise ValueError(f"{entry}: the {what} are named by id, not by index")
            if not 0 <= entry < len(items):
                raise ValueError(f"index {entry} is not one of the {len(items)} {what}")
            out.add(entry)
        elif entry in where:
            out.update(where[entry])
        else:
            raise ValueError(f"{entry!r} names none of the {len(items)} {what}")
    return out


def vocabulary_of(artefact: object) -> EditVocabulary | None:
    """The vocabulary an item's artefact declares (None: it takes no edits)."""
    if not isinstance(artefact, Mapping) or not isinstance(artefact.get(EDITABLE), Mapping):
        return None
    return EditVocabulary.model_validate(artefact[EDITABLE])


def _check_drop(value: object, vocabulary: DropVocabulary) -> list[int | str]:
    how = "an index or an id" if vocabulary.by_index else "an id"
    if not isinstance(value, list) or not value:
        raise EditError(f"edits.drop: a non-empty list of {how} of the {vocabulary.what}", key=DROP)
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, int | str):
            raise EditError(f"edits.drop: {entry!r} is not {how}", key=DROP)
    entries: list[int | str] = list(dict.fromkeys(value))
    try:
        dropped = dropped_indices(
            vocabulary.items, entries, by_index=vocabulary.by_index, what=vocabulary.what
        )
    except ValueError as exc:
        raise EditError(f"edits.drop: {exc}", key=DROP) from None
    if len(dropped) == len(vocabulary.items) and vocabulary.kept_anyway == 0:
        raise EditError(
            f"edits.drop: drops all {len(dropped)} {vocabulary.what}, leaving nothing to train "
            "on — reject the artefact instead",
            key=DROP,
        )
    return entries


def _check_weights(value: object, categories: Sequence[str]) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise EditError(
            f"edits.weights: an object of category -> weight in [0, 1] ({', '.join(categories)})",
            key=WEIGHTS,
        )
    out: dict[str, float] = {}
    for category, weight in value.items():
        if category not in categories:
            raise EditError(
                f"edits.weights: {category!r} is not a category of this artefact "
                f"({', '.join(categories) or 'none'})",
                key=f"{WEIGHTS}.{category}",
            )
        numeric = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not numeric or not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
            raise EditError(
                f"edits.weights.{category}: {weight!r} is not a weight in [0, 1]",
                key=f"{WEIGHTS}.{category}",
            )
        out[str(category)] = float(weight)
    return out


def check_edits(edits: object, vocabulary: EditVocabulary | None, *, kind: str) -> ArtefactEdits:
    """``edits`` (a reviewer's JSON object) checked against what a ``kind`` item declares it
    takes; :class:`~flywheel.review.errors.EditError` with a one-line reason naming the key
    at fault otherwise."""
    if not isinstance(edits, Mapping):
        raise EditError("edits: a JSON object of edits", key="edits")
    if vocabulary is None or not vocabulary.keys():
        raise EditError(f"edits: this item ({kind}) takes no edits", key="edits")
    takes = vocabulary.keys()
    for key in edits:
        if key not in takes:
            raise EditError(
                f"edits: unknown key {key!r} — {kind} takes {' and '.join(takes)}",
                key=str(key),
            )
    drop: list[int | str] = []
    weights: dict[str, float] = {}
    if DROP in edits:
        assert vocabulary.drop is not None
        drop = _check_drop(edits[DROP], vocabulary.drop)
    if WEIGHTS in edits:
        assert vocabulary.weights is not None
        weights = _check_weights(edits[WEIGHTS], vocabulary.weights)
    return ArtefactEdits(drop=drop, weights=weights)

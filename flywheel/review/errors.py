"""The review queue's refusals (the CLI exits 2 on them, the API answers 409 or 422)."""

from __future__ import annotations


class ReviewError(ValueError):
    """A decision that cannot be taken (already decided, missing track or reason)."""


class EditError(ReviewError):
    """Edits an artefact does not take: an unknown key, an item it does not have, a weight
    out of range. ``key`` names the edit at fault (``drop``, ``weights.count``)."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key

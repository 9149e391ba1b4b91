"""The embedded world's held-out gate: each track's routed cases split by failure theme into
what its round learns from and what its gate judges.

:func:`split_by_theme` splits a track's slice **per theme** (the case's failure cluster label,
else its scene's skill): the cases are first joined into prompt groups — cases whose prompt or
reference is the same prompt (:func:`~flywheel.tracks.routed.same_prompt_key`) — so that no
prompt lies on both sides; each theme's groups are then split by a stable hash of their
smallest case id (:func:`~flywheel.tracks.routed.split_by_hash`: a theme with two groups or
more has both sides). A theme of one prompt stays on the train side (the gate judges fresh
prompts of the themes the round learns), unless no theme has two: then the themes of one
prompt are split together as one stratum (the track still gets a gate). The **train**
side builds the track's artefact; the **gate** side is only judged, base against candidate,
at the slice's own noise seed and at ``gate.extra_seeds`` fresh ones
(:func:`gate_seeds`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flywheel.db.models import Track
from flywheel.tracks.routed import same_prompt_key, split_by_hash
from flywheel.world.loop.slices import SliceCase

UNTHEMED = "(no theme)"
"""The stratum of cases with neither a failure cluster nor a scene."""
SEED_STRIDE = 100
"""Distance between the gate's noise seeds (a slice's batches take consecutive seeds from
its first: seeds ``first + k * SEED_STRIDE`` never share a batch's noise while a slice has
fewer than ``SEED_STRIDE`` batches)."""


def case_theme(case: SliceCase) -> str:
    """The stratum a case is split in: its failure theme, else its scene's skill."""
    if case.theme:
        return case.theme
    if case.scene is not None:
        return f"skill: {case.scene.skill}"
    return UNTHEMED


def case_keys(case: SliceCase) -> set[str]:
    """The prompts a case stands for (:func:`same_prompt_key` of its prompt and reference)."""
    keys = {same_prompt_key(case.prompt), same_prompt_key(case.reference)}
    keys.discard("")
    return keys


@dataclass(kw_only=True, slots=True)
class GateSplit:
    """A track's slice split between its round (train) and its gate."""

    train: list[SliceCase] = field(default_factory=list)
    gate: list[SliceCase] = field(default_factory=list)
    themes: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """Theme -> ``{"train": case ids, "gate": case ids}``."""

    def record(self) -> dict[str, object]:
        """What the artefact and the round's data manifest keep of the split."""
        return {
            "train_cases": sorted(_ids(self.train)),
            "gate_cases": sorted(_ids(self.gate)),
            "themes": self.themes,
        }

    def gate_keys(self) -> set[str]:
        """The prompts (and references) the gate judges: what no round may train on."""
        return {k for case in self.gate for k in case_keys(case)}


def _ids(cases: Sequence[SliceCase]) -> list[int]:
    return [c.case_id for c in cases if c.case_id is not None]


def prompt_groups(cases: Sequence[SliceCase]) -> list[list[SliceCase]]:
    """The cases joined into groups that share a prompt key (transitively), in case order."""
    parent = list(range(len(cases)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, case in enumerate(cases):
        for key in sorted(case_keys(case)):
            if key in first:
                parent[root(i)] = root(first[key])
            else:
                first[key] = i
    groups: dict[int, list[SliceCase]] = defaultdict(list)
    for i, case in enumerate(cases):
        groups[root(i)].append(case)
    return list(groups.values())


def _group_id(group: Sequence[SliceCase]) -> int:
    return min((c.case_id for c in group if c.case_id is not None), default=0)


def group_theme(group: Sequence[SliceCase]) -> str:
    """The most common theme of a prompt group (ties: the first by name)."""
    counts: dict[str, int] = defaultdict(int)
    for case in group:
        counts[case_theme(case)] += 1
    return min(counts, key=lambda theme: (-counts[theme], theme))


def split_by_theme(
    cases: Sequence[SliceCase], *, gate_share: float = 0.5, seed: int = 0
) -> GateSplit:
    """The slice split per failure theme (see the module docstring); cases keep their order
    on each side."""
    by_theme: dict[str, list[list[SliceCase]]] = defaultdict(list)
    for group in prompt_groups(cases):
        by_theme[group_theme(group)].append(group)
    strata = [groups for groups in by_theme.values() if len(groups) >= 2]
    if not strata:  # every theme one prompt: split them together
        strata = [[groups[0] for groups in by_theme.values()]]
    gate_ids: set[int] = set()
    for groups in strata:
        _, held = split_by_hash(groups, key=_group_id, gate_share=gate_share, seed=seed)
        gate_ids.update(_ids([c for group in held for c in group]))
    split = GateSplit()
    for case in cases:
        held_out = case.case_id is not None and case.case_id in gate_ids
        (split.gate if held_out else split.train).append(case)
        if case.case_id is not None:
            side = split.themes.setdefault(case_theme(case), {"train": [], "gate": []})
            side["gate" if held_out else "train"].append(case.case_id)
    return split


def split_tracks(
    slices: Mapping[Track, Sequence[SliceCase]], *, gate_share: float, seed: int
) -> tuple[dict[Track, GateSplit], set[str]]:
    """Each track's slice split by theme (:func:`split_by_theme`), and every track's gate keys
    together: the prompts no round of the cycle may train on, whichever track's gate holds
    them."""
    splits = {
        track: split_by_theme(cases, gate_share=gate_share, seed=seed)
        for track, cases in slices.items()
    }
    return splits, {key for split in splits.values() for key in split.gate_keys()}


def gate_seeds(first: int, extra_seeds: int) -> list[int]:
    """The noise seeds the gate judges its cases at: the slice's own, then ``extra_seeds``
    fresh ones."""
    return [first + k * SEED_STRIDE for k in range(1 + extra_seeds)]

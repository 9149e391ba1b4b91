"""A reviewer's edits to the embedded world's artefacts (dicts: each is its round's data
manifest, :func:`flywheel.world.loop.steps.prepare_rounds`): what each takes
(:func:`edit_vocabulary`, declared on its review item) and the manifest its round then
trains on (:func:`apply_edits`).

The vocabulary per track (:mod:`flywheel.review.edits` checks a reviewer's edits against it):

- **prompt enhancer** (``prompt_enhancer_data``): ``{"drop": [3, "violet square"]}`` — pairs
  of the artefact's ``pairs_file`` by their index (line, from 0) or their prompt (every pair
  with it);
- **pretraining gap** (``augmentation_batch``): ``{"drop": ["pool/17"]}`` — retrieved pool
  scenes by their key (the plan's ``retrieved[].key``); the replayed and synthesized scenes
  always stay;
- **RL** (``reward_recalibration``): ``{"drop": [0, "three red squares"]}`` — the round's
  prompts (the artefact's ``prompts``) by index or text: the round neither trains on a
  dropped prompt nor recalibrates the reward on its preference pairs.

The enhancer's edited pairs and the RL round's kept preference pairs go to
``pairs.edited.jsonl`` / ``preferences.edited.jsonl`` next to the reviewed file (whole or not
at all: a temporary name, then a rename); the gap's plan and the RL round's prompts are the
manifest's own (the reviewed versions stay on the review item; the RL artefact's
``agreement`` stays the one measured on the reviewed pairs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flywheel.db.models import Track
from flywheel.review.edits import ArtefactEdits, DropVocabulary, EditVocabulary, dropped_indices
from flywheel.tracks.edits import edited_path
from flywheel.world.loop.rl import (
    PreferenceArtefact,
    read_preferences,
    tally,
    write_preferences,
)
from training.pe_sft import read_pairs, write_pairs

PAIRS = "prompt-enhancer pairs"
RETRIEVED = "retrieved pool scenes"
PROMPTS = "RL prompts"
EXAMPLES = 8
"""User-worded pairs shown in the artefact."""


def edit_vocabulary(track: Track, artefact: dict[str, Any]) -> EditVocabulary:
    """What the track's artefact takes as edits."""
    if track == Track.PROMPT_ENHANCER:
        pairs = read_pairs(Path(artefact["pairs_file"]))
        return EditVocabulary(
            drop=DropVocabulary(what=PAIRS, items=[p for p, _ in pairs], by_index=True)
        )
    if track == Track.PRETRAINING_GAP:
        plan = artefact["plan"]
        keys = [str(c["key"]) for c in plan["retrieved"]]
        others = int(plan["replay"]) + sum(int(n) for n in plan["synthesized"].values())
        return EditVocabulary(
            drop=DropVocabulary(what=RETRIEVED, items=keys, by_index=False, kept_anyway=others)
        )
    return EditVocabulary(
        drop=DropVocabulary(what=PROMPTS, items=list(artefact["prompts"]), by_index=True)
    )


def apply_edits(track: Track, manifest: dict[str, Any], edits: ArtefactEdits) -> dict[str, Any]:
    """The round's data manifest with ``edits`` applied (see the module docstring)."""
    if track == Track.PROMPT_ENHANCER:
        reviewed = Path(manifest["pairs_file"])
        pairs = read_pairs(reviewed)
        gone = dropped_indices([p for p, _ in pairs], edits.drop, by_index=True, what=PAIRS)
        kept = [pair for k, pair in enumerate(pairs) if k not in gone]
        target = write_pairs(edited_path(reviewed), kept)
        user = [p for p in kept if p[0] != p[1]]
        return {
            **manifest,
            "pairs": len(kept),
            "user_worded": len(user),
            "echo": len(kept) - len(user),
            "examples": [list(p) for p in user[:EXAMPLES]],
            "pairs_file": str(target),
        }
    if track == Track.PRETRAINING_GAP:
        plan = dict(manifest["plan"])
        retrieved = list(plan["retrieved"])
        keys = [str(c["key"]) for c in retrieved]
        gone = dropped_indices(keys, edits.drop, by_index=False, what=RETRIEVED)
        plan["retrieved"] = [c for k, c in enumerate(retrieved) if k not in gone]
        return {**manifest, "plan": plan}
    prompts = list(manifest["prompts"])
    gone = dropped_indices(prompts, edits.drop, by_index=True, what=PROMPTS)
    remaining = [p for k, p in enumerate(prompts) if k not in gone]
    preferences = PreferenceArtefact.model_validate(manifest["preferences"])
    reviewed = Path(preferences.preferences_file)
    chosen = [p for p in read_preferences(reviewed) if p.prompt in set(remaining)]
    target = write_preferences(edited_path(reviewed), chosen)
    by_source, categories = tally(chosen)
    edited = preferences.model_copy(
        update={
            "preferences_file": str(target),
            "pairs": len(chosen),
            "by_source": by_source,
            "categories": categories,
        }
    )
    return {**manifest, "prompts": remaining, "preferences": edited.model_dump(mode="json")}

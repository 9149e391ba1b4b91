"""Attribution's evidence is measured, not read off how a label is defined: the general colour
lexicon (the world's rewriter) knows colour words from public naming data, not from any
world's file; term rarity counts the corpus index's own words; the reward-human disagreement
is pooled per slice; the classifier's features leave out what restates a label; and each
world's labeled set follows its own file (rare concepts, users' words, the reward's blind
spots)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from qdrant_client import QdrantClient
from typer.testing import CliRunner

from flywheel.attribution.classifier import FEATURES, features
from flywheel.attribution.evidence import (
    SLICE_PRIOR,
    Evidence,
    slice_of,
    term_rarity,
    with_slice_disagreement,
)
from flywheel.cli.main import app
from flywheel.db.models import Track
from flywheel.world.corpus import scene_tags
from flywheel.world.definition import default_world, dump_world, load_world, shipped_worlds
from flywheel.world.lexicon import general_lexicon, lexicon_rewrites
from flywheel.world.loop.attribution import LabeledSetConfig, _candidates
from flywheel.world.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES
from retrieval.embedding import TextEmbedder
from retrieval.index import Embedders, IndexItem, count_terms, index_items
from retrieval.store import QdrantConfig, collection_name


def test_the_lexicon_knows_both_worlds_users_words_from_public_colour_names() -> None:
    lexicon = general_lexicon()
    worlds = [load_world(path) for path in shipped_worlds().values()]
    user_words = {w: c for world in worlds for c, ws in world.vocabulary.items() for w in ws}
    known = {w: lexicon.canonical[w] for w in user_words if w in lexicon.canonical}
    # Hundreds of words no world uses: it is a lexicon, not an inverse of the worlds' words.
    assert len(set(lexicon.canonical) - set(user_words)) > 250
    # Most users' words are there, and most map to the colour the world meant; the misses are
    # the lexicon's own (navy is darker than the world's blue; amber yellower than its orange).
    assert len(known) >= 0.75 * len(user_words)
    right = sum(known[w] == user_words[w] for w in known)
    assert right >= 0.8 * len(known), {w: (known[w], user_words[w]) for w in known}
    assert not set(lexicon.canonical) & {*COLOURS, *BACKGROUNDS, *SHAPES, *SIZES}


def test_the_lexicon_rewrites_colour_words_and_leaves_quoted_text_alone() -> None:
    assert lexicon_rewrites(
        ["Two Crimson circles left of a cobalt star", 'It reads "gold" in tangerine letters']
    ) == ["Two Red circles left of a blue star", 'It reads "gold" in orange letters']
    assert lexicon_rewrites(["a large purple square"]) == ["a large purple square"]


def test_term_rarity_counts_the_indexed_captions_words(offline: None) -> None:
    client = QdrantClient(location=":memory:")
    config = QdrantConfig()
    colours = ["red"] * 30 + ["blue"] * 30 + ["purple"]
    items = [
        IndexItem(dataset="d", split="corpus", text=f"a {c} square", key=f"c/{k}", tags=())
        for k, c in enumerate(colours)
    ]
    items.append(IndexItem(dataset="d", split="pool", text="a mauve square", key="p/0", tags=()))
    index_items(client, config, "prompts", items, Embedders(text=TextEmbedder()))
    name = collection_name(config, "prompts")
    counts = count_terms(client, name, "corpus")
    assert counts["square"] == 61
    assert counts["purple"] == 1
    rarity = term_rarity(client, name)
    red, purple, unknown, empty = rarity(
        ["a red square", "a purple square", "a mauve square", "?!"]
    )
    assert red is not None
    assert purple is not None
    assert unknown == 0.0
    assert empty is None
    assert purple < 0.1 < red


def _evidence(
    *, skill: str | None, flags: list[str], rank: float, editing: bool = False
) -> Evidence:
    return Evidence(
        rewritten_prompt="p",
        rewrite_changed=False,
        scored_by="none" if editing else "evaluator",
        score_original=0.0,
        score_rewritten=0.0,
        rewrite_gain=0.0,
        rewrite_fixed=False,
        scarcity=None,
        nearest_corpus=[],
        reward_rank=rank,
        skill=skill,
        sources={"mining": 1},
        negative_feedback=0,
        flags=flags,
        editing=editing,
    )


def test_the_reward_disagreement_is_pooled_per_slice_and_shrunk() -> None:
    counts = [_evidence(skill="count", flags=[], rank=r) for r in (1.0, 0.9, 0.8)]
    colour = [_evidence(skill=None, flags=["wrong_color"], rank=0.1)]
    edit = [_evidence(skill="editing", flags=[], rank=0.5, editing=True)]
    pooled = with_slice_disagreement([*counts, *colour, *edit])
    expected = (2.7 + 0.5 * SLICE_PRIOR) / (3 + SLICE_PRIOR)
    assert [e.slice_disagreement for e in pooled[:3]] == [expected] * 3
    assert pooled[3].slice_disagreement == (0.1 + 0.5 * SLICE_PRIOR) / (1 + SLICE_PRIOR)
    assert pooled[4].slice_disagreement is None
    assert slice_of("count", []) == "skill:count"
    assert slice_of(None, ["wrong_count", "artifact"]) == "flag:artifact"
    assert slice_of(None, []) == "unlabelled"


def test_the_classifier_reads_no_feature_that_restates_a_label() -> None:
    assert not {"rewrite_changed", "concept_rarity"} & set(FEATURES)
    assert not [f for f in FEATURES if f.startswith("skill_")]
    row = _evidence(skill="count", flags=[], rank=0.7)
    changed = row.model_copy(
        update={"rewrite_changed": True, "concept_rarity": 0.01, "skill": "colour"}
    )
    assert features(row) == features(changed)


def test_each_worlds_labeled_set_follows_its_file() -> None:
    config = LabeledSetConfig(per_track=6)
    default = _candidates(config, default_world(), random.Random(0))
    other_world = load_world(shipped_worlds()["other"])
    other = _candidates(config, other_world, random.Random(0))
    for world, candidates in ((default_world(), default), (other_world, other)):
        by_track = {t: [c for c, label in candidates if label == t] for t in Track}
        rare = set(world.rare_concepts())
        assert all(c.focus in rare for c in by_track[Track.PRETRAINING_GAP])
        words = {w for ws in world.vocabulary.values() for w in ws}
        assert all(
            any(w in c.prompt.lower().split() for w in words)
            for c in by_track[Track.PROMPT_ENHANCER]
        )
        rare_tags = {f"colour:{c}" for c in world.rare.colours}
        rare_tags |= {f"shape:{s}" for s in world.rare.shapes}
        mixed = [
            c
            for t in (Track.RL, Track.PROMPT_ENHANCER)
            for c in by_track[t]
            if rare_tags & set(scene_tags(c.spec))
        ]
        assert not mixed  # one cause per failure: no rare concept outside the gap's cases
        blind = {c.skill for c in by_track[Track.RL]} - {"colour"}
        assert blind == set(world.reward.blind_to()) & {"count", "relation"}
    gap = Counter(c.focus for c, t in other if t == Track.PRETRAINING_GAP)
    assert set(gap) == {"green", "star"}
    assert not any("crimson" in c.prompt.lower() for c, _ in other)
    assert {c.skill for c, t in default if t == Track.RL} == {"colour", "count", "relation"}


def test_measuring_on_another_world_refuses_the_models_own_and_a_bad_file(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    own = runner.invoke(app, ["attribution", "measure", "--on-world", "default"])
    assert own.exit_code == 2
    assert "the model's own world" in own.output
    bad = tmp_path / "bad.toml"
    bad.write_text(dump_world(default_world()).replace('caption = "terse"', 'caption = "loud"'))
    refused = runner.invoke(app, ["attribution", "measure", "--on-world", str(bad)])
    assert refused.exit_code == 2
    assert "reward.caption" in refused.output

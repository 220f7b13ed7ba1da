"""The shapes grammar, the held-out split, the renderer and the generated tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from diffsearch.pipelines.shapes import world
from diffsearch.pipelines.shapes.tokenizer import BOS, EOS, MAX_LENGTH, build_tokenizer

REQUIRED = {
    "a red circle on the left": world.Single("red", "circle", "left"),
    "a blue square at the top": world.Single("blue", "square", "top"),
    "a green triangle at the bottom": world.Single("green", "triangle", "bottom"),
}


@pytest.mark.parametrize("prompt", sorted(REQUIRED))
def test_required_prompts_are_in_the_grammar_and_trained_on(prompt: str) -> None:
    spec = world.parse(prompt)
    assert spec == REQUIRED[prompt]
    assert world.prompt_of(spec) == prompt
    assert not world.is_heldout(spec)


def test_every_spec_round_trips_through_its_caption() -> None:
    specs = world.all_specs()
    assert len(specs) == len(set(specs))
    for spec in specs:
        assert world.parse(world.prompt_of(spec)) == spec
    assert set(world.COLOURS) >= {"red", "green", "blue", "yellow"} and len(world.COLOURS) >= 5


@pytest.mark.parametrize(
    "prompt",
    ["a pink circle on the left", "two red circle", "one red circles",
     "a red circle to the left of a red circle", "a cat", ""],
)
def test_parse_rejects_prompts_outside_the_grammar(prompt: str) -> None:
    with pytest.raises(world.PromptError):
        world.parse(prompt)


def test_parse_normalises_case_and_spaces() -> None:
    assert world.parse("  Two  RED circles ") == world.Count("red", "circle", 2)


def test_prompt_lists_are_fixed_by_seed_and_split_cleanly() -> None:
    train = world.train_prompts(300, seed=3)
    held = world.heldout_prompts(300, seed=3)
    assert train == world.train_prompts(300, seed=3)
    assert held == world.heldout_prompts(300, seed=3)
    assert train != world.train_prompts(300, seed=4)
    assert not set(train) & set(held)
    assert all(world.is_heldout(world.parse(p)) for p in held)
    kinds = {type(world.parse(p)) for p in held}
    assert kinds == {world.Single, world.Count, world.Relation}


def test_training_split_still_covers_every_attribute_pair() -> None:
    """Holding out triples must not hide any single colour-shape, colour-position or
    shape-position pair from training, or the held-out set would test the impossible."""
    train = [s for s in world.all_specs()
             if isinstance(s, world.Single) and not world.is_heldout(s)]
    assert {(s.colour, s.shape) for s in train} == {
        (c, s) for c in world.COLOURS for s in world.SHAPES
    }
    assert {(s.colour, s.position) for s in train} == {
        (c, p) for c in world.COLOURS for p in world.POSITIONS
    }
    assert {(s.shape, s.position) for s in train} == {
        (s, p) for s in world.SHAPES for p in world.POSITIONS
    }


def test_render_is_deterministic_and_draws_what_the_spec_says() -> None:
    for spec in world.all_specs()[::7]:
        image, objects = world.render(spec, np.random.default_rng(5))
        again, _ = world.render(spec, np.random.default_rng(5))
        assert image.shape == (world.SIZE, world.SIZE, 3) and image.dtype == np.uint8
        assert np.array_equal(image, again)
        expected = spec.count if isinstance(spec, world.Count) else (
            2 if isinstance(spec, world.Relation) else 1
        )
        assert len(objects) == expected
        for obj in objects:
            half = obj.size / 2
            assert 0 <= obj.cx - half and obj.cx + half <= world.SIZE
            assert 0 <= obj.cy - half and obj.cy + half <= world.SIZE
    assert np.array_equal(
        world.render_prompt("two red circles", 1), world.render_prompt("two red circles", 1)
    )


def test_dataset_is_seeded() -> None:
    caps, images = world.dataset(50, seed=9)
    caps2, images2 = world.dataset(50, seed=9)
    assert caps == caps2 and np.array_equal(images, images2)
    assert not any(world.is_heldout(world.parse(c)) for c in caps)


def test_near_miss_is_a_different_grammar_prompt() -> None:
    rng = np.random.default_rng(0)
    for spec in world.all_specs():
        miss = world.near_miss(spec, rng)
        assert miss != spec
        assert world.parse(world.prompt_of(miss)) == miss


def test_tokenizer_makes_every_grammar_word_one_token(tmp_path) -> None:
    tokenizer = build_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    ids = tokenizer.convert_tokens_to_ids([BOS, EOS])
    assert ids == [len(tokenizer) - 2, len(tokenizer) - 1]
    assert tokenizer.eos_token_id == len(tokenizer) - 1
    for word in world.vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1
    longest = max((world.prompt_of(s) for s in world.all_specs()), key=lambda p: len(p.split()))
    assert len(tokenizer(longest).input_ids) <= MAX_LENGTH


def test_tokenizer_spells_unknown_words_instead_of_dropping_them(tmp_path) -> None:
    tokenizer = build_tokenizer(tmp_path)
    ids = tokenizer("a pink hexagon", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "a pink hexagon"


def test_distinct_prompts_are_seeded_distinct_and_split() -> None:
    train = world.distinct_prompts("train", 200, 0)
    assert len(set(train)) == 200 and train == world.distinct_prompts("train", 200, 0)
    assert len(set(world.distinct_prompts("heldout", 50, 0))) == 50
    everything = world.distinct_prompts("heldout", 500, 0)  # the split has fewer combinations
    assert len(everything) == len(set(everything)) < 500
    assert not set(train) & set(everything)

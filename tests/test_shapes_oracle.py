"""The oracle: right on every ground-truth render, robust to blur, and strict on near misses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from diffsearch.pipelines.shapes import world
from diffsearch.pipelines.shapes.oracle import detect, judge


def _renders(n: int, seed: int) -> list[tuple[str, world.Spec, list[world.DrawnObject]]]:
    rng = np.random.default_rng(seed)
    specs = world.sample_specs(n, rng) + world.sample_specs(n // 2, rng, heldout=True)
    return [(world.prompt_of(s), s, world.layout(s, rng)) for s in specs]


def test_every_ground_truth_render_is_judged_correct() -> None:
    for prompt, _, objects in _renders(600, seed=0):
        verdict = judge(world.draw(objects), prompt)
        assert verdict.correct, (prompt, verdict.aspects, verdict.objects)
        assert verdict.score == 1.0


def test_detection_recovers_colour_shape_and_centre() -> None:
    for _, _, objects in _renders(200, seed=1):
        found = detect(world.draw(objects))
        assert len(found) == len(objects)
        for obj in objects:
            match = min(found, key=lambda d: (d.cx - obj.cx) ** 2 + (d.cy - obj.cy) ** 2)
            assert (match.colour, match.shape) == (obj.colour, obj.shape)
            assert abs(match.cx - obj.cx) <= 1.0 and abs(match.cy - obj.cy) <= 1.0


def test_blur_and_noise_of_generated_images_do_not_flip_verdicts() -> None:
    rng = np.random.default_rng(2)
    cases = _renders(300, seed=2)
    right = 0
    for prompt, _, objects in cases:
        image = ndimage.gaussian_filter(world.draw(objects).astype(float), sigma=(0.6, 0.6, 0))
        image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
        right += judge(image, prompt).correct
    assert right / len(cases) >= 0.95


def test_float_and_upscaled_images_are_judged_like_the_uint8_original() -> None:
    image = world.render_prompt("a yellow triangle to the right of a blue circle", 4)
    prompt = "a yellow triangle to the right of a blue circle"
    assert judge(image.astype(np.float32) / 255.0, prompt).correct
    big = np.kron(image, np.ones((2, 2, 1), dtype=np.uint8))
    assert judge(big, prompt).correct


def _other(options: tuple, current):
    return options[(options.index(current) + 1) % len(options)]


def test_wrong_colour_is_rejected() -> None:
    for prompt, spec, objects in _renders(100, seed=3):
        first = objects[0]
        recoloured = [dataclasses.replace(first, colour=_other(world.COLOURS, first.colour))]
        verdict = judge(world.draw(recoloured + objects[1:]), prompt)
        assert not verdict.correct, prompt
        if isinstance(spec, world.Single):
            assert not verdict.aspects["colour"]


def test_wrong_shape_is_rejected() -> None:
    for prompt, _spec, objects in _renders(100, seed=4):
        first = objects[0]
        reshaped = [dataclasses.replace(first, shape=_other(world.SHAPES, first.shape))]
        verdict = judge(world.draw(reshaped + objects[1:]), prompt)
        assert not verdict.correct, prompt


@pytest.mark.parametrize("position", world.POSITIONS)
def test_moved_object_is_rejected(position: str) -> None:
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            spec = world.Single(colour, shape, position)
            elsewhere = _other(world.POSITIONS, position)
            cx, cy = world.ANCHORS[elsewhere]
            obj = world.DrawnObject(colour, shape, cx, cy, world.SINGLE_SIZE)
            verdict = judge(world.draw([obj]), world.prompt_of(spec))
            assert verdict.aspects["colour"] and verdict.aspects["count"]
            assert not verdict.aspects["position"] and not verdict.correct


def test_extra_object_is_rejected() -> None:
    extra = world.DrawnObject("purple", "square", 26.0, 26.0, world.COUNT_SIZE)
    for prompt, _spec, objects in _renders(150, seed=5):
        free = all(abs(o.cx - extra.cx) + abs(o.cy - extra.cy) > 12 for o in objects)
        if not free:
            continue
        verdict = judge(world.draw(objects + [extra]), prompt)
        assert not verdict.aspects["count"] and not verdict.correct, prompt


def test_swapped_relation_is_rejected() -> None:
    for prompt, spec, objects in _renders(200, seed=6):
        if not isinstance(spec, world.Relation):
            continue
        a, b = objects
        swapped = [dataclasses.replace(a, cx=b.cx, cy=b.cy),
                   dataclasses.replace(b, cx=a.cx, cy=a.cy)]
        verdict = judge(world.draw(swapped), prompt)
        assert verdict.aspects["binding"] and verdict.aspects["count"]
        assert not verdict.aspects["position"] and not verdict.correct


def test_swapped_colours_break_binding_only() -> None:
    prompt = "a red circle to the left of a blue square"
    objects = [
        world.DrawnObject("blue", "circle", 9.0, 16.0, world.PAIR_SIZE),
        world.DrawnObject("red", "square", 23.0, 16.0, world.PAIR_SIZE),
    ]
    verdict = judge(world.draw(objects), prompt)
    assert verdict.aspects["object"] and verdict.aspects["colour"] and verdict.aspects["count"]
    assert not verdict.aspects["binding"] and not verdict.aspects["position"]


def test_count_must_be_exact() -> None:
    rng = np.random.default_rng(7)
    two = world.layout(world.Count("green", "triangle", 2), rng)
    assert judge(world.draw(two), "two green triangles").correct
    assert not judge(world.draw(two), "three green triangles").aspects["count"]
    assert not judge(world.draw(two[:1]), "two green triangles").aspects["count"]


def test_blank_and_noise_images_score_zero() -> None:
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    assert judge(blank, "a red circle on the left").score == 0.0
    noise = np.random.default_rng(8).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert not judge(noise, "two red circles").correct

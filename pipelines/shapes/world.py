"""The shapes world: a prompt grammar, a seeded scene sampler and a renderer.

Why 32x32 RGB: the smallest objects drawn (count scenes, side 8 px) still have 64 px of area,
so the bounding-box fill ratio that tells squares (1.0), circles (0.785) and triangles (0.5)
apart is measured on dozens of pixels; the five palette colours are far apart in RGB (min
pairwise distance > 150), so colour survives blur; three objects fit on a 3x3 grid with 2 px
gaps; and the five named positions are 8 px apart. At 16x16 a count-scene object would be 4 px
wide and triangles become indistinguishable from circles, so 32x32 is the floor.

Three prompt kinds, all lower-case and exactly as produced by :func:`prompt_of`:

* single:   ``a red circle on the left`` / ``a blue square at the top`` /
            ``a green triangle at the bottom`` / ``... on the right`` / ``... in the centre``
* count:    ``one red circle`` / ``two blue squares`` / ``three green triangles``
* relation: ``a red circle to the left of a blue square`` (also ``to the right of``,
            ``above``, ``below``)

Some combinations are held out of training (see :func:`is_heldout`) so that generalisation to
unseen colour-shape-position triples, colour-shape-count triples and object pairs is
measurable; :func:`train_prompts` and :func:`heldout_prompts` give fixed seeded prompt lists.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from diffsearch.seeding import derive_seed, numpy_rng

SIZE = 32
"""Image side in pixels."""
SUPERSAMPLE = 4
"""Shapes are drawn at SIZE * SUPERSAMPLE and box-downsampled, which antialiases edges."""
BACKGROUND = (0, 0, 0)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 50),
    "purple": (170, 60, 220),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "centre")
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (8.0, 16.0),
    "right": (24.0, 16.0),
    "top": (16.0, 8.0),
    "bottom": (16.0, 24.0),
    "centre": (16.0, 16.0),
}
"""(x, y) pixel centre of each named position; a single object is drawn within 2 px of it."""
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASE = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
SINGLE_SIZE = 10
COUNT_SIZE = 8
PAIR_SIZE = 9
GRID_CENTRES = (6.0, 16.0, 26.0)


class PromptError(ValueError):
    """A prompt that is not in the shapes grammar."""


@dataclass(frozen=True)
class Single:
    colour: str
    shape: str
    position: str


@dataclass(frozen=True)
class Count:
    colour: str
    shape: str
    count: int


@dataclass(frozen=True)
class Relation:
    colour_a: str
    shape_a: str
    relation: str
    colour_b: str
    shape_b: str


Spec = Single | Count | Relation


@dataclass(frozen=True)
class DrawnObject:
    """One object of a rendered scene (ground truth, used by tests, never by the oracle)."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float


# ---- grammar ------------------------------------------------------------------------------
def prompt_of(spec: Spec) -> str:
    """The one canonical caption of a spec."""
    if isinstance(spec, Single):
        return f"a {spec.colour} {spec.shape} {POSITION_PHRASE[spec.position]}"
    if isinstance(spec, Count):
        noun = spec.shape if spec.count == 1 else spec.shape + "s"
        return f"{COUNT_WORDS[spec.count]} {spec.colour} {noun}"
    return (
        f"a {spec.colour_a} {spec.shape_a} {RELATION_PHRASE[spec.relation]} "
        f"a {spec.colour_b} {spec.shape_b}"
    )


_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_SINGLE_RE = re.compile(
    rf"a ({_C}) ({_S}) ({'|'.join(POSITION_PHRASE.values())})"
)
_COUNT_RE = re.compile(rf"(one|two|three) ({_C}) ({_S})(s?)")
_RELATION_RE = re.compile(
    rf"a ({_C}) ({_S}) ({'|'.join(RELATION_PHRASE.values())}) a ({_C}) ({_S})"
)


def parse(prompt: str) -> Spec:
    """The spec of a grammar prompt (whitespace and case are normalised); PromptError if none."""
    text = " ".join(prompt.lower().split())
    if m := _SINGLE_RE.fullmatch(text):
        position = {v: k for k, v in POSITION_PHRASE.items()}[m.group(3)]
        return Single(m.group(1), m.group(2), position)
    if m := _COUNT_RE.fullmatch(text):
        count = {v: k for k, v in COUNT_WORDS.items()}[m.group(1)]
        if (count == 1) != (m.group(4) == ""):
            raise PromptError(f"count and plural disagree in shapes prompt {prompt!r}")
        return Count(m.group(2), m.group(3), count)
    if m := _RELATION_RE.fullmatch(text):
        relation = {v: k for k, v in RELATION_PHRASE.items()}[m.group(3)]
        if (m.group(1), m.group(2)) == (m.group(4), m.group(5)):
            raise PromptError(f"a relation needs two different objects: {prompt!r}")
        return Relation(m.group(1), m.group(2), relation, m.group(4), m.group(5))
    raise PromptError(
        f"not a shapes-world prompt: {prompt!r} (e.g. 'a red circle on the left', "
        "'two blue squares', 'a red circle to the left of a blue square')"
    )


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the tokenizer makes each one a single token)."""
    words: set[str] = set()
    for spec in all_specs():
        words.update(prompt_of(spec).split())
    return sorted(words)


# ---- the combination space and what is held out -------------------------------------------
def all_specs() -> list[Spec]:
    """Every spec of the grammar, in a fixed order."""
    singles = [Single(c, s, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]
    counts = [Count(c, s, n) for c, s, n in itertools.product(COLOURS, SHAPES, (1, 2, 3))]
    objects = list(itertools.product(COLOURS, SHAPES))
    relations = [
        Relation(a[0], a[1], r, b[0], b[1])
        for a, b in itertools.permutations(objects, 2)
        for r in RELATIONS
    ]
    return [*singles, *counts, *relations]


HELDOUT_SINGLE = frozenset(
    {
        ("red", "circle", "right"),
        ("green", "square", "left"),
        ("blue", "triangle", "centre"),
        ("yellow", "circle", "bottom"),
        ("purple", "square", "top"),
        ("yellow", "triangle", "left"),
        ("red", "square", "centre"),
        ("blue", "circle", "top"),
    }
)
"""(colour, shape, position) triples never trained on; every colour, shape and position, and
every pair of them, still appears in training (the demo prompts stay in training)."""
HELDOUT_COUNT = frozenset(
    {
        ("red", "triangle", 2),
        ("green", "circle", 3),
        ("blue", "square", 2),
        ("yellow", "square", 3),
        ("purple", "circle", 2),
    }
)
HELDOUT_PAIRS = frozenset(
    frozenset(pair)
    for pair in (
        (("red", "circle"), ("blue", "square")),
        (("green", "triangle"), ("yellow", "circle")),
        (("purple", "square"), ("red", "triangle")),
        (("blue", "circle"), ("green", "square")),
        (("yellow", "triangle"), ("purple", "circle")),
        (("red", "square"), ("green", "circle")),
        (("blue", "triangle"), ("yellow", "square")),
        (("purple", "triangle"), ("blue", "square")),
        (("green", "circle"), ("yellow", "triangle")),
        (("red", "circle"), ("purple", "square")),
    )
)
"""Unordered object pairs never trained on together, in either order or any relation."""


def is_heldout(spec: Spec) -> bool:
    """True for the combinations kept out of training."""
    if isinstance(spec, Single):
        return (spec.colour, spec.shape, spec.position) in HELDOUT_SINGLE
    if isinstance(spec, Count):
        return (spec.colour, spec.shape, spec.count) in HELDOUT_COUNT
    pair = frozenset({(spec.colour_a, spec.shape_a), (spec.colour_b, spec.shape_b)})
    return pair in HELDOUT_PAIRS


KIND_WEIGHTS = {"single": 0.4, "count": 0.25, "relation": 0.35}


def _by_kind(heldout: bool) -> dict[str, list[Spec]]:
    groups: dict[str, list[Spec]] = {"single": [], "count": [], "relation": []}
    kinds = {Single: "single", Count: "count", Relation: "relation"}
    for spec in all_specs():
        if is_heldout(spec) == heldout:
            groups[kinds[type(spec)]].append(spec)
    return groups


_SPLITS = {False: _by_kind(False), True: _by_kind(True)}


def sample_specs(n: int, rng: np.random.Generator, heldout: bool = False) -> list[Spec]:
    """n specs drawn with replacement: a kind by KIND_WEIGHTS, then a combination uniformly."""
    groups = _SPLITS[heldout]
    kinds = list(KIND_WEIGHTS)
    picks = rng.choice(len(kinds), size=n, p=list(KIND_WEIGHTS.values()))
    return [groups[kinds[k]][rng.integers(len(groups[kinds[k]]))] for k in picks]


def train_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts from the training distribution (fixed for a given seed)."""
    rng = numpy_rng(derive_seed(seed, "", 0, "shapes-train-prompts"))
    return [prompt_of(s) for s in sample_specs(n, rng, heldout=False)]


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts made only of held-out combinations (fixed for a given seed)."""
    rng = numpy_rng(derive_seed(seed, "", 0, "shapes-heldout-prompts"))
    return [prompt_of(s) for s in sample_specs(n, rng, heldout=True)]


def distinct_prompts(split: str, n: int, seed: int = 0) -> list[str]:
    """The first ``n`` distinct prompts of a seeded draw from ``split`` ("train" or
    "heldout"). The draws follow the world's distribution and so repeat prompts; benchmarks
    and distillation want each prompt once. The held-out split has only 93 prompts, so it may
    give fewer than ``n``."""
    draw = {"train": train_prompts, "heldout": heldout_prompts}[split]
    prompts: list[str] = []
    for size in (n * 2 ** i for i in range(8)):
        prompts = list(dict.fromkeys(draw(size, seed)))
        if len(prompts) >= n:
            return prompts[:n]
    return prompts


# ---- scenes and rendering -----------------------------------------------------------------
def layout(spec: Spec, rng: np.random.Generator) -> list[DrawnObject]:
    """Where each object of ``spec`` goes: sizes and centres with small random jitter."""
    if isinstance(spec, Single):
        ax, ay = ANCHORS[spec.position]
        size = SINGLE_SIZE + rng.integers(-1, 2)
        dx, dy = rng.uniform(-2, 2, size=2)
        return [DrawnObject(spec.colour, spec.shape, ax + dx, ay + dy, float(size))]
    if isinstance(spec, Count):
        cells = rng.choice(9, size=spec.count, replace=False)
        objects = []
        for cell in cells:
            jx, jy = rng.uniform(-0.5, 0.5, size=2)
            cx, cy = GRID_CENTRES[cell % 3] + jx, GRID_CENTRES[cell // 3] + jy
            objects.append(DrawnObject(spec.colour, spec.shape, cx, cy, float(COUNT_SIZE)))
        return objects
    near, far = rng.uniform(7, 11), rng.uniform(21, 25)
    side_a, side_b = rng.uniform(12, 20, size=2)
    first, second = (near, far) if spec.relation in ("left of", "above") else (far, near)
    if spec.relation in ("left of", "right of"):
        (xa, ya), (xb, yb) = (first, side_a), (second, side_b)
    else:
        (xa, ya), (xb, yb) = (side_a, first), (side_b, second)
    return [
        DrawnObject(spec.colour_a, spec.shape_a, xa, ya, float(PAIR_SIZE)),
        DrawnObject(spec.colour_b, spec.shape_b, xb, yb, float(PAIR_SIZE)),
    ]


def draw(objects: list[DrawnObject]) -> np.ndarray:
    """Render objects to a uint8 (SIZE, SIZE, 3) image, antialiased by supersampling."""
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUND)
    pen = ImageDraw.Draw(canvas)
    for obj in objects:
        half = obj.size / 2
        x0, y0, x1, y1 = (
            (obj.cx - half) * k,
            (obj.cy - half) * k,
            (obj.cx + half) * k - 1,
            (obj.cy + half) * k - 1,
        )
        colour = PALETTE[obj.colour]
        if obj.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=colour)
        elif obj.shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    small = canvas.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def render(spec: Spec, rng: np.random.Generator) -> tuple[np.ndarray, list[DrawnObject]]:
    """A ground-truth image for ``spec`` and the objects drawn in it."""
    objects = layout(spec, rng)
    return draw(objects), objects


def render_prompt(prompt: str, seed: int) -> np.ndarray:
    """A ground-truth uint8 (SIZE, SIZE, 3) image for a grammar prompt, fixed by ``seed``."""
    rng = numpy_rng(derive_seed(seed, prompt, 0, "shapes-render"))
    return render(parse(prompt), rng)[0]


def dataset(n: int, seed: int, heldout: bool = False) -> tuple[list[str], np.ndarray]:
    """n (caption, image) pairs: captions and a uint8 (n, SIZE, SIZE, 3) array, seeded."""
    rng = numpy_rng(derive_seed(seed, "", 0, "shapes-dataset"))
    specs = sample_specs(n, rng, heldout=heldout)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, spec in enumerate(specs):
        images[i] = render(spec, rng)[0]
    return [prompt_of(s) for s in specs], images


def near_miss(spec: Spec, rng: np.random.Generator) -> Spec:
    """A different spec one edit away (a colour, shape, position, count or relation changed, or
    the two objects swapped): the hard negative captions that teach a CLIP to bind attributes."""

    def other(options: tuple, current):
        return options[(options.index(current) + rng.integers(1, len(options))) % len(options)]

    if isinstance(spec, Single):
        field_ = rng.integers(3)
        if field_ == 0:
            return Single(other(COLOURS, spec.colour), spec.shape, spec.position)
        if field_ == 1:
            return Single(spec.colour, other(SHAPES, spec.shape), spec.position)
        return Single(spec.colour, spec.shape, other(POSITIONS, spec.position))
    if isinstance(spec, Count):
        field_ = rng.integers(3)
        if field_ == 0:
            return Count(spec.colour, spec.shape, other((1, 2, 3), spec.count))
        if field_ == 1:
            return Count(other(COLOURS, spec.colour), spec.shape, spec.count)
        return Count(spec.colour, other(SHAPES, spec.shape), spec.count)
    edit = rng.integers(4)
    if edit == 0:
        return Relation(spec.colour_b, spec.shape_b, spec.relation, spec.colour_a, spec.shape_a)
    if edit == 1:
        return Relation(
            spec.colour_a, spec.shape_a, other(RELATIONS, spec.relation), spec.colour_b,
            spec.shape_b,
        )
    if edit == 2 and spec.colour_a != spec.colour_b and spec.shape_a != spec.shape_b:
        # the binding swap: same colours and shapes, attached to the other object
        return Relation(spec.colour_b, spec.shape_a, spec.relation, spec.colour_a, spec.shape_b)
    banned = {spec.colour_a} | ({spec.colour_b} if spec.shape_a == spec.shape_b else set())
    choices = [c for c in COLOURS if c not in banned]
    return Relation(
        choices[rng.integers(len(choices))], spec.shape_a, spec.relation, spec.colour_b,
        spec.shape_b,
    )

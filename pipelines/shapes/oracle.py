"""An exact, GenEval-like judge of whether a 32x32 image matches a shapes-world prompt.

It reads only pixels: each pixel goes to the nearest of background + palette colours (or to
nothing when it is far from all of them, as blurred or off-palette pixels are); connected
components of each colour above a minimum area are objects; an object's shape comes from its
bounding box: the fill ratio (square ~1, circle ~0.785, triangle ~0.5) and the share of its
area in the top half (an upward triangle has ~1/4 there, circles and squares ~1/2). Centres are
bounding-box centres. Thresholds sit halfway between the ideal values so that the soft edges
and speckle of generated images do not flip answers.

Aspects per prompt kind (a 0..1 score is the share that are right; ``correct`` means all):

* single ``a red circle on the left``: object (a circle exists), colour (a circle is red),
  count (exactly one object in the image), position (a red circle sits nearest the named spot)
* count ``two red circles``: object (a circle exists), colour (a red circle exists),
  count (exactly two red circles and nothing else)
* relation ``a red circle to the left of a blue square``: object (both shapes present),
  colour (both colours present), binding (a red circle and a blue square, as two objects),
  count (exactly two objects), position (such a pair in the named relation)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from diffsearch.pipelines.shapes.world import (
    ANCHORS,
    BACKGROUND,
    PALETTE,
    SIZE,
    Count,
    Relation,
    Single,
    parse,
)

MAX_COLOUR_DISTANCE = 110.0
"""A pixel farther than this (RGB euclidean) from every palette colour and the background is
left unlabelled; half-way between two palette colours is always farther than this."""
MIN_AREA = 10
"""Components smaller than this many pixels are speckle, not objects (the smallest object
drawn, an 8 px triangle, covers ~32 px)."""
RING_FLOOR = 0.1
"""Edge pixels with less coverage than this are background noise, not part of the object."""
RELATION_MARGIN = 3.0
"""Centres must differ by at least this many pixels along the relation's axis."""

_COLOURS = list(PALETTE)
_REFERENCE = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)


@dataclass(frozen=True)
class Detected:
    """One object found in an image."""

    colour: str
    shape: str | None
    """circle, square, triangle, or None for a blob that looks like none of them."""
    cx: float
    cy: float
    area: int
    fill: float
    top_share: float


@dataclass
class Judgement:
    prompt: str
    aspects: dict[str, bool]
    objects: list[Detected] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return all(self.aspects.values())

    @property
    def score(self) -> float:
        return sum(self.aspects.values()) / len(self.aspects)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) float [0, 1] or uint8 image as uint8 SIZE x SIZE (bilinear if resized)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"oracle needs an (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.shape[:2] != (SIZE, SIZE):
        image = np.asarray(
            Image.fromarray(image).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        )
    return image


def _soft_extent(profile: np.ndarray) -> tuple[float, float]:
    """Sub-pixel (start, end) of a coverage profile: partly covered edge cells count partly."""
    cells = np.nonzero(profile > 0)[0]
    first, last = cells[0], cells[-1]
    return first + 1.0 - profile[first], last + profile[last]


def classify_shape(alpha: np.ndarray) -> tuple[str | None, float, float]:
    """(shape, fill ratio, top-half share) of one object's coverage map (values in [0, 1]).

    Coverage, not a hard mask: a circle 8 px wide rasterised to hard pixels looks like a
    square (its corners lose under one pixel each), but its antialiased or blurred coverage
    still sums to ~0.785 of its sub-pixel bounding box.
    """
    top, bottom = _soft_extent(alpha.max(axis=1))
    left, right = _soft_extent(alpha.max(axis=0))
    h, w = bottom - top, right - left
    area = float(alpha.sum())
    fill = area / (h * w)
    middle = (top + bottom) / 2.0
    rows = np.arange(alpha.shape[0], dtype=np.float64)
    above = np.clip(middle - rows, 0.0, 1.0)
    top_share = float((alpha.sum(axis=1) * above).sum()) / area
    if max(h, w) > 2.0 * min(h, w) or fill < 0.3:
        return None, fill, top_share
    if top_share < 0.41 or fill < 0.6:
        return "triangle", fill, top_share
    return ("square" if fill > 0.88 else "circle"), fill, top_share


def detect(image: np.ndarray) -> list[Detected]:
    """All objects in an image (any size; float [0, 1] or uint8, HWC)."""
    pixels = to_uint8(image).astype(np.float32)
    distances = np.linalg.norm(pixels[:, :, None, :] - _REFERENCE[None, None], axis=-1)
    labels = distances.argmin(axis=-1)
    labels[distances.min(axis=-1) > MAX_COLOUR_DISTANCE] = 0
    found = []
    for index, colour in enumerate(_COLOURS, start=1):
        reference = _REFERENCE[index]
        coverage = np.clip(pixels @ reference / float(reference @ reference), 0.0, 1.0)
        components, _ = ndimage.label(labels == index)
        for k in range(1, components.max() + 1):
            mask = components == k
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            # the object's soft edge: its pixels plus the unlabelled or background ring around it
            ring = ndimage.binary_dilation(mask) & (labels == 0)
            alpha = np.where(mask, 1.0, np.where(ring & (coverage > RING_FLOOR), coverage, 0.0))
            ys, xs = np.nonzero(alpha)
            box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
            shape, fill, top = classify_shape(alpha[box])
            ys, xs = np.nonzero(mask)
            cy = (ys.min() + ys.max() + 1) / 2.0
            cx = (xs.min() + xs.max() + 1) / 2.0
            found.append(Detected(colour, shape, cx, cy, area, fill, top))
    return found


def nearest_position(obj: Detected) -> str:
    return min(ANCHORS, key=lambda p: (ANCHORS[p][0] - obj.cx) ** 2 + (ANCHORS[p][1] - obj.cy) ** 2)


def _holds(relation: str, a: Detected, b: Detected) -> bool:
    if relation == "left of":
        return a.cx <= b.cx - RELATION_MARGIN
    if relation == "right of":
        return a.cx >= b.cx + RELATION_MARGIN
    if relation == "above":
        return a.cy <= b.cy - RELATION_MARGIN
    return a.cy >= b.cy + RELATION_MARGIN


def _covers(found: list, wanted: list) -> bool:
    """True when the multiset ``found`` contains the multiset ``wanted``."""
    have = Counter(found)
    return all(have[k] >= n for k, n in Counter(wanted).items())


def judge(image: np.ndarray, prompt: str) -> Judgement:
    """Per-aspect verdicts of ``image`` against a grammar ``prompt`` (PromptError if not one)."""
    spec = parse(prompt)
    objects = detect(image)
    shapes = [o.shape for o in objects]

    def matches(colour: str, shape: str) -> list[Detected]:
        return [o for o in objects if o.colour == colour and o.shape == shape]

    if isinstance(spec, Single):
        hits = matches(spec.colour, spec.shape)
        aspects = {
            "object": spec.shape in shapes,
            "colour": bool(hits),
            "count": len(objects) == 1,
            "position": any(nearest_position(o) == spec.position for o in hits),
        }
    elif isinstance(spec, Count):
        hits = matches(spec.colour, spec.shape)
        aspects = {
            "object": spec.shape in shapes,
            "colour": bool(hits),
            "count": len(hits) == spec.count == len(objects),
        }
    else:
        assert isinstance(spec, Relation)
        hits_a = matches(spec.colour_a, spec.shape_a)
        hits_b = matches(spec.colour_b, spec.shape_b)
        pairs = [(a, b) for a in hits_a for b in hits_b if a is not b]
        aspects = {
            "object": _covers(shapes, [spec.shape_a, spec.shape_b]),
            "colour": _covers([o.colour for o in objects], [spec.colour_a, spec.colour_b]),
            "binding": bool(pairs),
            "count": len(objects) == 2,
            "position": any(_holds(spec.relation, a, b) for a, b in pairs),
        }
    return Judgement(prompt, aspects, objects)

"""Images from the bundled SD pipeline, labelled by the oracle: what shapes-clip trains on.

    python -m diffsearch.pipelines.shapes.clip_samples --out runs/clip-samples.npz --n 8000

A guide only ever scores generated images, and those fail in ways renders never do (a third
object, a melted triangle, the right colours on the wrong shapes). Ground-truth renders teach a
CLIP the grammar; these samples teach it which generated images the oracle accepts. Each image is
labelled against several captions by the exact oracle, so each gives positives and hard
negatives in the image domain the guide is measured on:

* its own prompt (right or wrong, as the oracle says);
* near misses of that prompt (one edit away), which are mostly wrong but not always;
* what the image shows, when the detected objects make a grammar prompt (always right).

Prompts come from the training split only, and no caption is a held-out combination, so the
held-out split stays unseen. Initial noises come from ``derive_seed(seed, prompt, index,
"shapes-clip-samples")``, a stream apart from the benchmarks' ones.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from diffsearch.pipelines.shapes import bundled_defaults, bundled_model_path, world
from diffsearch.pipelines.shapes.oracle import Detected, detect, judge, nearest_position
from diffsearch.seeding import derive_seed, numpy_rng, torch_generator

NEAR_MISSES = 4
"""Near-miss captions labelled per image."""


@dataclass
class Samples:
    """Generated images and oracle-labelled (image, caption) pairs."""

    images: np.ndarray
    """float16 (N, SIZE, SIZE, 3) in [0, 1]."""
    prompts: list[str]
    """The prompt each image was generated from."""
    pair_image: np.ndarray
    """int (P,): the image of each labelled pair."""
    pair_text: list[str]
    """The caption of each labelled pair."""
    pair_label: np.ndarray
    """bool (P,): the oracle's ``correct`` for the pair."""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path, images=self.images, prompts=np.array(self.prompts),
            pair_image=self.pair_image, pair_text=np.array(self.pair_text),
            pair_label=self.pair_label,
        )

    def subset(self, images: list[int]) -> Samples:
        """These images (in this order) and their pairs."""
        new_index = {old: new for new, old in enumerate(images)}
        keep = [k for k, i in enumerate(self.pair_image.tolist()) if i in new_index]
        return Samples(
            self.images[images], [self.prompts[i] for i in images],
            np.array([new_index[int(self.pair_image[k])] for k in keep], dtype=np.int64),
            [self.pair_text[k] for k in keep], self.pair_label[keep],
        )

    @classmethod
    def load(cls, path: Path) -> Samples:
        with np.load(path) as data:
            return cls(
                data["images"], data["prompts"].tolist(), data["pair_image"],
                data["pair_text"].tolist(), data["pair_label"],
            )


def describe(objects: list[Detected]) -> world.Spec | None:
    """A grammar spec for what the detected objects show, or None when none fits."""
    if any(o.shape is None for o in objects) or not 1 <= len(objects) <= 3:
        return None
    kinds = {(o.colour, o.shape) for o in objects}
    if len(objects) == 1:
        o = objects[0]
        return world.Single(o.colour, o.shape, nearest_position(o))
    if len(kinds) == 1:
        colour, shape = kinds.pop()
        return world.Count(colour, shape, len(objects))
    if len(objects) == 2:
        a, b = objects
        dx, dy = b.cx - a.cx, b.cy - a.cy
        if abs(dx) >= abs(dy):
            relation = "left of" if dx > 0 else "right of"
        else:
            relation = "above" if dy > 0 else "below"
        return world.Relation(a.colour, a.shape, relation, b.colour, b.shape)
    return None


def mirror(spec: world.Spec) -> world.Spec:
    """The spec of the left-right mirror image (triangles point up, so they stay triangles)."""
    swap = {"left": "right", "right": "left", "left of": "right of", "right of": "left of"}
    if isinstance(spec, world.Single):
        return world.Single(spec.colour, spec.shape, swap.get(spec.position, spec.position))
    if isinstance(spec, world.Relation):
        return world.Relation(spec.colour_a, spec.shape_a, swap.get(spec.relation, spec.relation),
                              spec.colour_b, spec.shape_b)
    return spec


def mirrored(samples: Samples) -> Samples:
    """Left-right mirrors of the images with mirrored captions, each relabelled by the oracle
    (captions that mirror into a held-out combination are dropped): twice the generated data
    for the price of labelling it."""
    images = samples.images[:, :, ::-1].copy()
    pixels = images.astype(np.float32)
    index, texts, labels = [], [], []
    for i, text in zip(samples.pair_image.tolist(), samples.pair_text, strict=True):
        spec = mirror(world.parse(text))
        if world.is_heldout(spec):
            continue
        index.append(i)
        texts.append(world.prompt_of(spec))
        labels.append(judge(pixels[i], texts[-1]).correct)
    prompts = [world.prompt_of(mirror(world.parse(p))) for p in samples.prompts]
    return Samples(images, prompts, np.array(index, dtype=np.int64), texts,
                   np.array(labels, dtype=bool))


def concat(parts: list[Samples]) -> Samples:
    """One Samples of several, pair indices shifted to the joined images."""
    offsets = np.cumsum([0] + [len(p.prompts) for p in parts[:-1]])
    return Samples(
        np.concatenate([p.images for p in parts]), [t for p in parts for t in p.prompts],
        np.concatenate([p.pair_image + o for p, o in zip(parts, offsets, strict=True)]),
        [t for p in parts for t in p.pair_text], np.concatenate([p.pair_label for p in parts]),
    )


def label(images: np.ndarray, prompts: list[str], seed: int) -> tuple[list, list, list]:
    """(image index, caption, oracle verdict) triples for every image (see the docstring)."""
    rng = numpy_rng(derive_seed(seed, "", 0, "shapes-clip-sample-labels"))
    index, texts, labels = [], [], []
    seen: set[tuple[int, world.Spec]] = set()

    def add(i: int, spec: world.Spec) -> None:
        if world.is_heldout(spec) or (i, spec) in seen:
            return
        seen.add((i, spec))
        text = world.prompt_of(spec)
        index.append(i)
        texts.append(text)
        labels.append(judge(images[i], text).correct)

    for i, prompt in enumerate(prompts):
        spec = world.parse(prompt)
        add(i, spec)
        for _ in range(NEAR_MISSES):
            add(i, world.near_miss(spec, rng))
        shown = describe(detect(images[i]))
        if shown is not None and shown != spec:
            add(i, shown)
    return index, texts, labels


def generate(
    model: Path, n: int, seed: int, minutes: float | None = None, batch: int = 64, log=print
) -> Samples:
    """Up to ``n`` images for seeded training-split prompts at the pipeline's defaults, labelled.

    Prompts and noises are drawn per batch of ``batch``, so a run stopped early by ``minutes``
    holds exactly the first images of the full run: ``--n`` set to the count it reached
    reproduces it.
    """
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    defaults = bundled_defaults(model)
    prompts: list[str] = []
    chunks, started = [], time.monotonic()
    for begin in range(0, n, batch):
        rng = numpy_rng(derive_seed(seed, "", begin, "shapes-clip-sample-prompts"))
        part = [world.prompt_of(s) for s in world.sample_specs(min(batch, n - begin), rng)]
        generators = [
            torch_generator(derive_seed(seed, p, begin + i, "shapes-clip-samples"))
            for i, p in enumerate(part)
        ]
        chunks.append(pipe(
            part, num_inference_steps=defaults["num_steps"],
            guidance_scale=defaults["guidance_scale"], height=defaults["height"],
            width=defaults["width"], generator=generators, output_type="np",
        ).images)
        prompts += part
        elapsed = time.monotonic() - started
        log(f"generated {len(prompts)}/{n} in {elapsed:.0f}s")
        if minutes is not None and elapsed >= minutes * 60.0:
            log(f"the {minutes}-minute cap stopped generation at {len(prompts)} images")
            break
    images = np.concatenate(chunks).astype(np.float32)
    index, texts, labels = label(images, prompts, seed)
    return Samples(
        images.astype(np.float16), prompts, np.array(index), texts, np.array(labels, dtype=bool)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help=".npz file to write")
    parser.add_argument("--n", type=int, default=8000, help="images to generate")
    parser.add_argument("--model", type=Path, default=bundled_model_path())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop after the batch that passes this many minutes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    samples = generate(args.model, args.n, args.seed, args.minutes, log=log)
    samples.save(args.out)
    right = samples.pair_label
    log(f"saved {len(samples.prompts)} images, {len(right)} pairs ({right.mean():.0%} right) "
        f"to {args.out}")


if __name__ == "__main__":
    main()

"""How good and how fast the bundled shapes model is; prints and saves JSON.

    python benchmarks/shapes_model.py [--model DIR] [--clip DIR ...] [--n 256] [--out FILE]

* single-sample oracle accuracy (overall, per aspect, per prompt kind) on a fixed seeded set of
  held-out prompts (combinations never trained on) and on training-distribution prompts;
* how well each CLIP guide agrees with the oracle: ROC AUC of its score for oracle-correct
  versus oracle-wrong generated images (Mann-Whitney rank formula, ties averaged), over the
  split and per prompt kind; by default for both shipped guides, shapes-clip and
  shapes-clip-small, on the same images; with bootstrap 95% intervals for each guide's AUC and
  for the paired difference of the first guide minus each other one (prompts resampled, each
  with all its images: the draws repeat prompts, and one prompt's images are not independent);
* the wall time of generating 32 images at the shipped step count with StableDiffusionPipeline
  directly, after a warm-up, and the torch thread count it ran with.

Every image's initial noise comes from derive_seed(seed, prompt, index, "benchmark"), so a rerun
gives the same numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffsearch.pipelines.shapes import bundled_defaults, bundled_model_path, world
from diffsearch.pipelines.shapes.clip_model import SMALL_WEIGHTS_DIR, WEIGHTS_DIR
from diffsearch.pipelines.shapes.oracle import judge
from diffsearch.seeding import derive_seed, torch_generator
from diffsearch.verifiers.shapes import ShapesClipSmallVerifier, ShapesClipVerifier

from _report import RESULTS


def load_pipeline(path: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seed: int,
    defaults: dict,
    batch: int = 32,
    guidance_scale: float | None = None,
) -> np.ndarray:
    """float (N, H, W, 3) images in [0, 1], one seeded generator per image."""
    out = []
    for begin in range(0, len(prompts), batch):
        chunk = prompts[begin : begin + batch]
        generators = [
            torch_generator(derive_seed(seed, p, begin + i, "benchmark"))
            for i, p in enumerate(chunk)
        ]
        result = pipe(
            chunk,
            num_inference_steps=defaults["num_steps"],
            guidance_scale=defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
            height=defaults["height"],
            width=defaults["width"],
            generator=generators,
            output_type="np",
        )
        out.append(result.images)
    return np.concatenate(out)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a random positive > score of a random negative), ties counted half."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def guide_label(folder: Path) -> str:
    """The verifier name of a shipped CLIP folder, else the folder as given."""
    shipped = {WEIGHTS_DIR.resolve(): ShapesClipVerifier.name,
               SMALL_WEIGHTS_DIR.resolve(): ShapesClipSmallVerifier.name}
    return shipped.get(folder.resolve(), str(folder))


BOOTSTRAP = 2000
"""Resamples for the AUC intervals."""


def _interval(values: np.ndarray) -> list[float]:
    """The 2.5th and 97.5th percentiles (a resample without both classes is left out)."""
    return [float(v) for v in np.nanpercentile(values, [2.5, 97.5])]


def bootstrap_auc(scores: dict[str, np.ndarray], correct: np.ndarray, prompts: list[str],
                  seed: int) -> dict:
    """95% percentile intervals of each guide's AUC and of the first guide's AUC minus each
    other's, over the same resamples (so the difference is paired). A resample draws distinct
    prompts with replacement and takes every image of each (a cluster bootstrap)."""
    rng = np.random.default_rng(seed)
    names = list(scores)
    groups = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt].append(i)
    clusters = list(groups.values())
    draws: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(BOOTSTRAP):
        chosen = rng.integers(0, len(clusters), len(clusters))
        pick = np.concatenate([clusters[c] for c in chosen])
        for name in names:
            draws[name].append(roc_auc(scores[name][pick], correct[pick]))
    values = {name: np.asarray(draws[name], dtype=float) for name in names}
    return {
        "auc": {name: _interval(values[name]) for name in names},
        "difference": {f"{names[0]} - {name}": _interval(values[names[0]] - values[name])
                       for name in names[1:]},
    }


def kind_of(prompt: str) -> str:
    return type(world.parse(prompt)).__name__.lower()


def accuracy(images: np.ndarray, prompts: list[str]) -> tuple[dict, np.ndarray]:
    """Oracle summary (overall, per aspect, per kind) and the per-image correctness."""
    correct = np.zeros(len(prompts), dtype=bool)
    aspects: dict[str, list[bool]] = defaultdict(list)
    kinds: dict[str, list[bool]] = defaultdict(list)
    single_colour = []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        verdict = judge(image, prompt)
        correct[i] = verdict.correct
        kind = kind_of(prompt)
        kinds[kind].append(verdict.correct)
        for name, ok in verdict.aspects.items():
            aspects[name].append(ok)
        if kind == "single":
            single_colour.append(verdict.aspects["colour"])
    summary = {
        "n": len(prompts),
        "overall": float(correct.mean()),
        "per_aspect": {k: float(np.mean(v)) for k, v in sorted(aspects.items())},
        "per_kind": {k: float(np.mean(v)) for k, v in sorted(kinds.items())},
        "single_object_colour": float(np.mean(single_colour)) if single_colour else None,
    }
    return summary, correct


def time_generation(pipe: StableDiffusionPipeline, defaults: dict) -> dict:
    prompts = world.train_prompts(32, seed=123)
    generate(pipe, prompts, 1, defaults)  # warm-up
    start = time.perf_counter()
    generate(pipe, prompts, 2, defaults)
    return {
        "images": 32,
        "steps": defaults["num_steps"],
        "seconds": round(time.perf_counter() - start, 3),
        "torch_threads": torch.get_num_threads(),
    }


def save_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    rows = len(images) // columns
    tiles = (images[: rows * columns] * 255).round().astype(np.uint8)
    h, w = tiles.shape[1:3]
    grid = (tiles.reshape(rows, columns, h, w, 3).transpose(0, 2, 1, 3, 4)
            .reshape(rows * h, columns * w, 3))
    size = (columns * w * 4, rows * h * 4)
    Image.fromarray(grid).resize(size, Image.Resampling.NEAREST).save(path)


def run(model: Path, clips: list[Path], n: int, seed: int, guidance_scale: float | None,
        out: Path, timing: bool = True) -> dict:
    """The report; sample grids go beside ``out`` (``<stem>_<split>_samples.png``)."""
    pipe = load_pipeline(model)
    defaults = bundled_defaults(model)
    if guidance_scale is not None:
        defaults = defaults | {"guidance_scale": guidance_scale}
    guides = {guide_label(c): ShapesClipVerifier(weights=str(c)) for c in clips}
    report: dict = {"model": str(model), "clips": {k: v.weights for k, v in guides.items()},
                    "seed": seed, "defaults": defaults}
    all_scores: dict[str, list[np.ndarray]] = defaultdict(list)
    all_correct = []
    for split, prompts in (
        ("heldout", world.heldout_prompts(n, seed)),
        ("train", world.train_prompts(n, seed)),
    ):
        images = generate(pipe, prompts, seed, defaults)
        summary, correct = accuracy(images, prompts)
        tensors = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        kinds = np.array([kind_of(p) for p in prompts])
        summary["clip_auc"], summary["clip_auc_per_kind"] = {}, {}
        split_scores = {}
        for name, guide in guides.items():
            scores = guide.score(tensors, prompts).numpy()
            summary["clip_auc"][name] = roc_auc(scores, correct)
            summary["clip_auc_per_kind"][name] = {
                k: roc_auc(scores[kinds == k], correct[kinds == k]) for k in sorted(set(kinds))}
            all_scores[name].append(scores)
            split_scores[name] = scores
        summary["clip_auc_ci95"] = bootstrap_auc(split_scores, correct, prompts, seed)
        report[split] = summary
        all_correct.append(correct)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images[:64], out.with_name(f"{out.stem}_{split}_samples.png"))
    correct = np.concatenate(all_correct)
    report["clip_auc_all"] = {
        name: roc_auc(np.concatenate(scores), correct) for name, scores in all_scores.items()}
    if timing:
        report["timing"] = time_generation(pipe, defaults)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=bundled_model_path())
    parser.add_argument("--clip", type=Path, nargs="+", default=[WEIGHTS_DIR, SMALL_WEIGHTS_DIR],
                        help="shapes-clip folders to measure (default: both shipped guides)")
    parser.add_argument("--n", type=int, default=256, help="prompts per split (>= 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=None, help="override the default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "shapes_model.json")
    parser.add_argument("--skip-timing", action="store_true",
                        help="leave out the generation timing (meaningless on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run(args.model, args.clip, args.n, args.seed, args.guidance_scale, args.out,
                 timing=not args.skip_timing)
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""The exact-target testbed: do the strategies reach what they should, where it is known exactly?

On the 2-D Gaussian-mixture model with the exact denoiser and the reward r(x) = x_1
(:mod:`diffsearch.testbed`), every prompt is one independent run of a real strategy through the
real engine. It reports, with bootstrap 95% intervals over runs:

- search at budgets of N samples' NFE: the mean reward of the returned best for best-of-N,
  EvoSearch and zero-order, against the exact expected best of N iid samples from p; and each
  strategy's paired difference to best-of-N (same prompts, same seeds);
- particles (FK steering, potential "diff", lam of the target): MMD^2 between the final
  particles (pooled over runs) and the tilted target p exp(lam r) / Z, as returned (equal
  weights) and with FK's final importance weights exp(lam (r(x_T) - r at the last resampling)),
  the effective sample size of those weights, and the mode masses; next to the same figures
  for plain samples of p (the distance the particles must close) and the exact MMD of p to the
  target.

Prints and saves ``benchmarks/results/gmm_testbed.json`` and ``gmm_testbed.png``::

    python benchmarks/gmm_testbed.py [--runs 128] [--budgets 4 8 16 32] [--particles 16]
        [--resample-every 5 25]

With ``--sampler-steps 20 50 100 200`` it measures instead what a finite number of DDIM steps
costs (moments and mode masses of the bare sampler against p's), into
``gmm_testbed_sampler.json``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffsearch.pipelines.base import Conditioning
from diffsearch.pipelines.gmm import GaussianMixture
from diffsearch.seeding import torch_generator
from diffsearch.testbed import GmmRun, GmmTestbed
from diffsearch.testbed_stats import (
    MmdToMixture,
    effective_sample_size,
    expected_max,
    mixture_mmd,
    normalised_weights,
)

from _report import command_line, save_plot, save_report
from _stats import mean_interval, paired_difference

SEARCHES: dict[str, tuple[str, dict[str, Any]]] = {
    "best-of-n": ("best-of-n", {}),
    "evosearch": ("evosearch", {}),
    "zero-order": ("zero-order", {}),
    "zero-order cosine 0.5": ("zero-order", {"cosine": 0.5}),
}
"""Label -> (strategy, options): the defaults, and zero-order with wider steps (in 2-D a
neighbour keeps its pivot's norm and turns by acos(cosine): 18 degrees at the default 0.95)."""
BANDWIDTH = 0.5
"""The MMD kernel's width: the mixture components' scale, so mode masses and shapes count."""


def search_rows(testbed: GmmTestbed, budgets: list[int], runs: int, seed: int, out: Path
                ) -> tuple[list[dict[str, Any]], dict[int, GmmRun]]:
    """One row per (budget, strategy); also the best-of-N runs by budget (their samples are
    plain draws of p)."""
    rows, plain = [], {}
    projection = testbed.mixture.projected(testbed.direction)
    prompts = range(runs)
    for n in budgets:
        analytic = expected_max(*projection, n)
        results = {label: testbed.run(name, out / f"{label.replace(' ', '-')}-{n}",
                                      budget=f"{n}x", runs=runs, seed=seed, options=options)
                   for label, (name, options) in SEARCHES.items()}
        plain[n] = results["best-of-n"]
        reference = plain[n].best_rewards
        for label, run in results.items():
            rewards = run.best_rewards
            best = mean_interval(rewards, prompts)
            gap = mean_interval(rewards - analytic, prompts)
            paired = paired_difference(rewards, reference, prompts)
            rows.append({
                "strategy": label, "options": SEARCHES[label][1], "budget_samples": n,
                "nfe_per_run": run.nfe_per_run, "mean_best_reward": best.to_json(),
                "expected_max_of_n_iid": analytic, "minus_expected_max": gap.to_json(),
                "minus_best_of_n_paired": paired.to_json(),
                "wall_seconds": run.result.wall_seconds,
            })
            print(f"N={n:3d} {label:22s} best reward {best.mean:.3f} [{best.low:.3f}, "
                  f"{best.high:.3f}]  E[max of N iid] {analytic:.3f}  minus it {gap}  "
                  f"vs best-of-N {paired}", flush=True)
    return rows, plain


def mode_masses(points: list[np.ndarray], weights: list[np.ndarray],
                mixture: GaussianMixture) -> list[float]:
    """The pooled (runs equal) mass of each mode: points go to the component of ``mixture``
    with the highest responsibility."""
    masses = np.zeros(len(mixture.weights))
    for x, w in zip(points, weights):
        labels = mixture.responsibilities(x).argmax(axis=1)
        masses += np.bincount(labels, weights=w, minlength=len(masses))
    return (masses / len(points)).tolist()


def distribution_row(label: str, points: list[np.ndarray], weights: list[np.ndarray],
                     testbed: GmmTestbed, rng: np.random.Generator) -> dict[str, Any]:
    to_target = MmdToMixture(points, weights, testbed.target, BANDWIDTH)
    to_p = MmdToMixture(points, weights, testbed.mixture, BANDWIDTH)
    row = {"points": label, "runs": len(points), "points_per_run": len(points[0]),
           "mmd2_to_target": to_target.value(), "interval": list(to_target.interval(rng)),
           "mmd2_to_p": to_p.value(), "mmd2_to_p_interval": list(to_p.interval(rng)),
           "mode_masses": mode_masses(points, weights, testbed.target)}
    print(f"{label:34s} MMD^2 to target {row['mmd2_to_target']:.5f} "
          f"[{row['interval'][0]:.5f}, {row['interval'][1]:.5f}]  to p "
          f"{row['mmd2_to_p']:.5f}  modes {np.round(row['mode_masses'], 3).tolist()}",
          flush=True)
    return row


def particle_rows(testbed: GmmTestbed, particles: int, every: list[int], runs: int, seed: int,
                  out: Path, rng: np.random.Generator, plain: GmmRun
                  ) -> tuple[list[dict[str, Any]], dict[str, list[np.ndarray]]]:
    base_points = [p.final_points for p in plain.prompts]
    equal = [np.full(len(x), 1 / len(x)) for x in base_points]
    rows = [distribution_row(f"samples of p ({particles} per run)", base_points, equal,
                             testbed, rng)]
    shown = {"p": base_points}
    for steps in every:
        options = {"potential": "diff", "lam": testbed.lam, "particles": particles,
                   "resample_every": steps}
        run = testbed.run("particles", out / f"particles-{steps}", budget=f"{particles}x",
                          runs=runs, seed=seed, options=options)
        points = [p.final_points for p in run.prompts]
        fk = [normalised_weights(log_w) for log_w in run.fk_log_weights(testbed.lam)]
        ess = mean_interval([effective_sample_size(w) / len(w) for w in fk], range(runs))
        for label, weights in (("as returned", [np.full(len(x), 1 / len(x)) for x in points]),
                               ("FK-weighted", fk)):
            row = distribution_row(f"particles every {steps} ({label})", points, weights,
                                   testbed, rng)
            row.update(options=options, nfe_per_run=run.nfe_per_run,
                       wall_seconds=run.result.wall_seconds)
            if label == "FK-weighted":
                row["ess_fraction"] = ess.to_json()
                print(f"{'':34s} ESS/N of the final weights {ess.mean:.3f} [{ess.low:.3f}, "
                      f"{ess.high:.3f}]")
            rows.append(row)
        shown[f"particles every {steps}"] = points
    return rows, shown


def sampler_rows(steps: list[int], n: int) -> list[dict[str, Any]]:
    """What a finite T costs: the moments and mode masses of n samples of the bare sampler
    (no engine) against p's exact ones, at eta 0 and 1. Every T draws from the same seeds, so
    the rows differ by the sampler only."""
    rows = []
    mixture = GmmTestbed().mixture
    for num_steps, eta in itertools.product(steps, (0.0, 1.0)):
        denoiser = GmmTestbed(num_steps=num_steps).denoiser()
        generators = [torch_generator(s + 10**9) for s in range(n)] if eta else None
        x = denoiser.denoise(denoiser.initial_noise(range(n)), [Conditioning("")] * n, 0,
                             num_steps, eta=eta, generators=generators).latents
        x = x.reshape(n, mixture.dim).double().numpy()
        error = np.cov(x.T) - mixture.covariance()
        rows.append({
            "num_steps": num_steps, "eta": eta, "samples": n,
            "mean_error": (x.mean(axis=0) - mixture.mean()).tolist(),
            "mean_standard_error": np.sqrt(np.diag(mixture.covariance()) / n).tolist(),
            "covariance_error": error.tolist(),
            "mode_masses": mode_masses([x], [np.full(n, 1 / n)], mixture)})
        print(f"T={num_steps:4d} eta={eta:.0f}  variance error {np.diag(error).round(4)} "
              f"(of {np.diag(mixture.covariance()).round(4)})  mean error "
              f"{np.round(rows[-1]['mean_error'], 4)}  modes "
              f"{np.round(rows[-1]['mode_masses'], 4).tolist()}", flush=True)
    return rows


def plot(report: dict[str, Any], shown: dict[str, list[np.ndarray]], testbed: GmmTestbed,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    budgets = sorted({row["budget_samples"] for row in report["search"]})
    grid = np.arange(1, max(budgets) + 1)
    projection = testbed.mixture.projected(testbed.direction)
    left.plot(grid, [expected_max(*projection, int(n)) for n in grid], "k-",
              label="E[max of N iid samples of p] (exact)")
    for offset, label in zip((-0.09, -0.03, 0.03, 0.09), SEARCHES):
        rows = [r["mean_best_reward"] for r in report["search"] if r["strategy"] == label]
        x = np.array(budgets) * (1 + offset)
        y = np.array([r["mean"] for r in rows])
        err = np.array([[r["mean"] - r["low"], r["high"] - r["mean"]] for r in rows]).T
        left.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=label)
    left.set_xscale("log", base=2)
    left.set_xlabel("budget (NFE of N samples)")
    left.set_ylabel("mean reward of the returned best (95% CI)")
    left.legend()
    xs, ys = np.meshgrid(np.linspace(-4, 4, 200), np.linspace(-4, 4, 200))
    grid_points = np.stack([xs.ravel(), ys.ravel()], 1)
    for mixture, style in ((testbed.mixture, "dashed"), (testbed.target, "solid")):
        density = np.exp(mixture.log_prob(grid_points)).reshape(xs.shape)
        right.contour(xs, ys, density, levels=6, colors="k", linewidths=0.7,
                      linestyles=style)
    for (label, points), colour in zip(shown.items(), ("grey", "tab:red", "tab:blue")):
        pts = np.concatenate(points)[:4000]
        right.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.35, color=colour, label=label)
    right.set_title("p (dashed), the target p exp(lam x_1) / Z (solid), and samples")
    right.legend(markerscale=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=128, help="independent runs (prompts)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32],
                        help="budgets in samples' NFE")
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--resample-every", type=int, nargs="+", default=[5, 25],
                        help="FK resampling intervals in steps (25: the strategy's T/4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="gmm_testbed")
    parser.add_argument("--sampler-steps", type=int, nargs="+", default=None,
                        help="instead: the bare sampler's moments at these T (20 50 100 200) "
                             "into <name>_sampler.json")
    parser.add_argument("--sampler-samples", type=int, default=20_000)
    args = parser.parse_args(argv)
    if args.sampler_steps:
        torch.set_num_threads(1)
        mixture = GmmTestbed().mixture
        report = {"command": command_line(argv),
                  "exact_mode_masses": mode_masses(
                      [mixture.sample(10**6, np.random.default_rng(args.seed))],
                      [np.full(10**6, 1e-6)], mixture),
                  "sampler": sampler_rows(args.sampler_steps, args.sampler_samples)}
        save_report(report, f"{args.name}_sampler", show=False)
        return report
    testbed = GmmTestbed()
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        search, plain = search_rows(testbed, args.budgets, args.runs, args.seed, Path(tmp))
        if args.particles not in plain:
            plain[args.particles] = testbed.run("best-of-n", Path(tmp) / "plain",
                                                budget=f"{args.particles}x", runs=args.runs,
                                                seed=args.seed)
        particles, shown = particle_rows(testbed, args.particles, args.resample_every,
                                         args.runs, args.seed, Path(tmp), rng,
                                         plain[args.particles])
    report = {
        "command": command_line(argv),
        "testbed": {"weights": testbed.mixture.weights.tolist(),
                    "means": testbed.mixture.means.tolist(),
                    "covariances": testbed.mixture.covariances.tolist(),
                    "reward_direction": list(testbed.direction), "lam": testbed.lam,
                    "num_steps": testbed.num_steps, "sampler": "ddim",
                    "target_weights": testbed.target.weights.tolist(),
                    "target_means": testbed.target.means.tolist(),
                    "mmd_bandwidth": BANDWIDTH,
                    "mmd2_p_to_target_exact": mixture_mmd(testbed.mixture, testbed.target,
                                                          BANDWIDTH) ** 2},
        "runs": args.runs, "search": search, "particles": particles,
        "wall_seconds": time.perf_counter() - started,
    }
    print(f"exact MMD^2(p, target) {report['testbed']['mmd2_p_to_target_exact']:.5f}; "
          f"target mode masses {np.round(testbed.target.weights, 3).tolist()}")
    save_report(report, args.name, show=False)
    save_plot(lambda path: plot(report, shown, testbed, path), args.name)
    return report


if __name__ == "__main__":
    main()

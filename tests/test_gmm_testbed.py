"""The exact-target testbed: the Gaussian-mixture model's closed forms, its sampler's
marginals and reproducibility, and the real strategies through the real engine against what
they must reach (benchmarks/gmm_testbed.py measures the same at scale)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from diffsearch.pipelines.base import Conditioning
from diffsearch.pipelines.gmm import GaussianMixture, image_to_point, point_to_image
from diffsearch.seeding import torch_generator
from diffsearch.testbed import MIXTURE, GmmTestbed
from diffsearch.testbed_stats import (
    MmdToMixture,
    expected_max,
    mixture_kernel_mean,
    normalised_weights,
)
from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.gmm import LinearReward

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from _stats import mean_interval  # noqa: E402

TESTBED = GmmTestbed()
BANDWIDTH = 0.5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sample(n: int, eta: float, offset: int = 0) -> np.ndarray:
    denoiser = TESTBED.denoiser()
    seeds = range(offset, offset + n)
    generators = [torch_generator(s + 10**9) for s in seeds] if eta else None
    result = denoiser.denoise(denoiser.initial_noise(seeds), [Conditioning("")] * n, 0,
                              denoiser.num_steps, eta=eta, generators=generators)
    return result.latents.reshape(n, 2).double().numpy()


# ---- closed forms --------------------------------------------------------------------------
def test_the_denoiser_is_the_posterior_mean_formula():
    denoiser = TESTBED.denoiser()
    x = torch.randn(50, 2, generator=torch_generator(1), dtype=torch.float64) * 2
    for step in (0, 1, 40, 99):
        reference = MIXTURE.posterior_mean(x.numpy(), float(denoiser.alpha_bar[step]))
        np.testing.assert_allclose(denoiser.posterior_mean(x, step).numpy(), reference,
                                   rtol=0, atol=1e-12)


def test_the_density_is_scipys():
    x = np.random.default_rng(1).uniform(-4, 4, size=(30, 2))
    density = sum(w * stats.multivariate_normal(m, c).pdf(x)
                  for w, m, c in zip(MIXTURE.weights, MIXTURE.means, MIXTURE.covariances))
    np.testing.assert_allclose(MIXTURE.log_prob(x), np.log(density), rtol=0, atol=1e-10)


def test_the_posterior_mean_formula_is_tweedies():
    """E[x0 | x_t] = (x_t + (1 - a) grad log p_t(x_t)) / sqrt(a), the score taken by central
    differences of the noisy marginal's density (a separate code path)."""
    x = np.random.default_rng(2).uniform(-3, 3, size=(40, 2))
    h = 1e-5
    for a in (0.05, 0.5, 0.95):
        noisy = MIXTURE.noisy(a)
        score = np.stack([(noisy.log_prob(x + h * e) - noisy.log_prob(x - h * e)) / (2 * h)
                          for e in np.eye(2)], axis=1)
        np.testing.assert_allclose(MIXTURE.posterior_mean(x, a),
                                   (x + (1 - a) * score) / np.sqrt(a), rtol=0, atol=1e-6)


def test_the_tilted_mixture_is_p_times_exp_lam_r():
    points = np.random.default_rng(3).uniform(-4, 4, size=(200, 2))
    target = MIXTURE.tilted([0.6, -0.8], 1.5)
    log_ratio = target.log_prob(points) - MIXTURE.log_prob(points) - 1.5 * points @ [0.6, -0.8]
    np.testing.assert_allclose(log_ratio, log_ratio[0], atol=1e-10)  # the constant is -log Z


def test_the_tilt_reweights_the_modes():
    target = TESTBED.target
    assert MIXTURE.weights[3] == pytest.approx(0.1) and target.weights[3] > 0.5
    assert target.weights[0] < 0.1 < MIXTURE.weights[0]


def test_expected_max_matches_a_large_exact_sample():
    rng = np.random.default_rng(4)
    rewards = MIXTURE.sample(8 * 100_000, rng) @ np.array(TESTBED.direction)
    projection = MIXTURE.projected(TESTBED.direction)
    assert expected_max(*projection, 1) == pytest.approx(rewards.mean(), abs=0.01)
    best = rewards.reshape(-1, 8).max(axis=1)
    assert expected_max(*projection, 8) == pytest.approx(best.mean(), abs=4 * best.std() / 316)


def test_mmd_of_exact_samples_is_zero_within_its_interval_and_of_p_to_target_is_not():
    rng = np.random.default_rng(5)
    runs = [MIXTURE.sample(16, rng) for _ in range(48)]
    weights = [np.full(16, 1 / 16)] * 48
    to_p = MmdToMixture(runs, weights, MIXTURE, BANDWIDTH)
    low, high = to_p.interval(rng)
    assert low < 0 < high
    to_target = MmdToMixture(runs, weights, TESTBED.target, BANDWIDTH)
    exact = (mixture_kernel_mean(MIXTURE, MIXTURE, BANDWIDTH)
             - 2 * mixture_kernel_mean(MIXTURE, TESTBED.target, BANDWIDTH)
             + mixture_kernel_mean(TESTBED.target, TESTBED.target, BANDWIDTH))
    low, high = to_target.interval(rng)
    assert low < exact < high and low > 0.5 * exact


def test_decoded_points_score_their_linear_reward():
    points = torch.tensor([[0.25, -1.5], [3.0, 2.0], [-7.5, 0.125]], dtype=torch.float64)
    images = point_to_image(points)
    assert images.shape == (3, 3, 1, 1) and 0 <= images.min() and images.max() <= 1
    np.testing.assert_allclose(image_to_point(images, 2).numpy(), points.numpy(), atol=1e-6)
    reward = LinearReward(direction=[0.5, -2.0]).score(images, ["", "", ""])
    np.testing.assert_allclose(reward.numpy(), points.numpy() @ [0.5, -2.0], atol=1e-5)


def test_bad_testbed_input_is_refused_in_one_line():
    with pytest.raises(VerifierError, match="direction must be 1 to 3 numbers"):
        LinearReward(direction=[1.0, "up"])
    with pytest.raises(ValueError, match="direction: the reward needs 2 numbers"):
        GmmTestbed(direction=(1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="K positive weights"):
        GaussianMixture.of([0.5, 0.5], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="symmetric positive definite"):
        GaussianMixture.of([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="symmetric positive definite"):
        GaussianMixture.of([1.0], [[0.0, 0.0]], [[[1.0, 0.5], [0.0, 1.0]]])


# ---- the sampler ---------------------------------------------------------------------------
def _moment_statistics(x: np.ndarray) -> np.ndarray:
    """Per row: x1, x2, and the centred products (x1 - m1)^2, (x1 - m1)(x2 - m2), (x2 - m2)^2
    about the mixture's exact means; their means are the mixture's means and covariance."""
    centred = x - MIXTURE.weights @ MIXTURE.means
    return np.stack([x[:, 0], x[:, 1], centred[:, 0] ** 2, centred[:, 0] * centred[:, 1],
                     centred[:, 1] ** 2], axis=1)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_samples_have_the_mixtures_moments(eta):
    """Mean and covariance of 0 -> T samples within 4 standard errors of the exact ones; the
    errors come from the statistics' own spread, measured on a big exact sample."""
    n = 2000
    exact = _moment_statistics(MIXTURE.sample(1_000_000, np.random.default_rng(6)))
    measured = _moment_statistics(_sample(n, eta)).mean(axis=0)
    se = exact.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(measured - exact.mean(axis=0)) < 4 * se), (measured, exact.mean(0), se)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_stopping_at_a_step_and_resuming_is_one_run(eta):
    denoiser = TESTBED.denoiser()
    noise = denoiser.initial_noise(range(5))
    conds = [Conditioning("")] * 5
    gens = [torch_generator(s) for s in range(5)] if eta else None
    whole = denoiser.denoise(noise, conds, 0, 100, eta=eta, generators=gens)
    gens = [torch_generator(s) for s in range(5)] if eta else None
    half = denoiser.denoise(noise, conds, 0, 37, eta=eta, generators=gens)
    rest = denoiser.denoise(half.latents, conds, 37, 100, eta=eta, generators=gens)
    assert torch.equal(whole.latents, rest.latents)
    assert half.rows + rest.rows == whole.rows == 100 * denoiser.compute_batch


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_batch_gives_each_row_what_it_gives_alone(eta):
    denoiser = GmmTestbed(compute_batch=8).denoiser()
    seeds = list(range(13))  # two forward passes, the last padded
    noise = denoiser.initial_noise(seeds)
    gens = [torch_generator(s) for s in seeds] if eta else None
    batch = denoiser.denoise(noise, [Conditioning("")] * 13, 0, 100, eta=eta, generators=gens)
    for i in seeds:
        alone = denoiser.denoise(noise[i : i + 1], [Conditioning("")], 0, 100, eta=eta,
                                 generators=[torch_generator(i)] if eta else None)
        assert torch.equal(alone.latents[0], batch.latents[i]), i


def test_renoise_is_the_forward_process():
    """Exact samples of the marginal at step 80, renoised to step 30, have step 30's marginal."""
    denoiser = TESTBED.denoiser()
    n = 4000
    a_from, a_to = (float(denoiser.alpha_bar[k]) for k in (80, 30))
    rng = np.random.default_rng(7)
    x = torch.from_numpy(MIXTURE.noisy(a_from).sample(n, rng)).float().reshape(n, 2, 1, 1)
    moved = denoiser.renoise(x, 80, 30, [torch_generator(s) for s in range(n)])
    moved = moved.reshape(n, 2).double().numpy()
    expected = MIXTURE.noisy(a_to).sample(1_000_000, rng)
    se = expected.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(moved.mean(axis=0) - expected.mean(axis=0)) < 4 * se)
    assert np.allclose(moved.std(axis=0), expected.std(axis=0), rtol=0.05)


# ---- real strategies through the real engine -----------------------------------------------
def test_best_of_n_reaches_the_exact_expected_max(tmp_path: Path):
    run = TESTBED.run("best-of-n", tmp_path / "run", budget="8x", runs=96)
    assert run.nfe_per_run == 8 * TESTBED.num_steps
    assert all(len(p.final_points) == 8 for p in run.prompts)
    analytic = expected_max(*MIXTURE.projected(TESTBED.direction), 8)
    interval = mean_interval(run.best_rewards, range(96), level=0.99)
    assert interval.low < analytic < interval.high
    assert analytic - expected_max(*MIXTURE.projected(TESTBED.direction), 4) > (
        interval.high - interval.low)


def test_particles_sample_the_tilted_target(tmp_path: Path):
    """FK steering's weighted final particles are far closer to p exp(lam r) / Z than plain
    samples of p, the same number from the same engine: the particles' whole 95% interval
    lies below a quarter of the plain samples' lower bound."""
    runs, particles = 24, 16
    options = {"potential": "diff", "lam": TESTBED.lam, "particles": particles,
               "resample_every": 10}
    fk = TESTBED.run("particles", tmp_path / "fk", budget=f"{particles}x", runs=runs,
                     options=options)
    plain = TESTBED.run("best-of-n", tmp_path / "plain", budget=f"{particles}x", runs=runs)
    rng = np.random.default_rng(9)
    steered = MmdToMixture([p.final_points for p in fk.prompts],
                           [normalised_weights(w) for w in fk.fk_log_weights(TESTBED.lam)],
                           TESTBED.target, BANDWIDTH)
    base = MmdToMixture([p.final_points for p in plain.prompts],
                        [np.full(particles, 1 / particles)] * runs, TESTBED.target, BANDWIDTH)
    assert steered.interval(rng)[1] < 0.25 * base.interval(rng)[0]

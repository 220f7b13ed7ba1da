"""The flow-matching SDE step (``FlowDenoiser._step`` at eta > 0) and ``renoise`` sample the
marginals they claim, on a case where every marginal is known in closed form.

The case: data x0 ~ N(mu, S^2 I) in D dimensions (independent coordinates, each its own mean).
Along the flow path x_s = (1 - s) x0 + s eps the marginal is N((1 - s) mu, V_s I) with
V_s = (1 - s)^2 S^2 + s^2, and the exact velocity is closed form,

    v(x, s) = E[eps - x0 | x_s = x] = ((s - (1 - s) S^2) / V_s) (x - (1 - s) mu) - mu.

:class:`ExactFlowDenoiser` is a real :class:`~diffsearch.pipelines._flow.FlowDenoiser` (its
``_step``, ``_noise_std`` and ``_forward_process`` untouched, on a real
``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3) whose network is that velocity. Samples
are ``ROWS`` x D = 32,768 independent scalars per step; tolerances are standard errors of that
sample size (5 of them, or a KS p-value of 1e-5): a correct sampler fails one of the file's
~60 KS tests and ~120 moment checks by chance about once in 1,500 seeds.

What is checked, and what each would catch:

- **The exact law of the sampler.** With the exact velocity every step is affine in x plus
  Gaussian noise, so the discrete chain's state is Gaussian with a mean and variance that a
  float64 recursion of the module docstring's step gives exactly (:func:`chain_moments`, written
  from the formulas, not from the code). The samples match it (KS) at every checked step, for
  eta = 0, 0.5 and 1: the code takes the step its docstring states.
- **The right marginals.** The same samples match N((1 - s_k) mu, V_k) at every checked step k,
  the end N(mu, S^2) included. Euler's discretisation bias is not zero: at ``STEPS`` = 500 the
  chain's own variance is 1.2% (eta = 1) below V_k at worst, which the test computes and
  requires to stay under a third of the tolerance; it shrinks as 1/T (checked), so the
  sampler converges to the flow's marginals rather than to something near them.
- **The noise std itself.** Two draws of one step from the same states differ by u (z1 - z2):
  the deterministic part cancels, so half their variance is u^2 with no discretisation error.
  It equals (eta times) the std of the forward process's posterior q(x_s' | x_s, x0), computed
  here by conditioning the forward Markov chain (:func:`posterior_std`), another formula than
  the code's ``kept`` ratio.
- **renoise.** Exact draws of the marginal at step k, renoised to j < k, have step j's
  marginal, and keep Cov(x0, x_j) = (1 - s_j) S^2: the forward kernel, not a fresh sample.

Why a wrong noise std fails (reasoned here, and tried on throwaway variants, rather than
shipped as a broken one):

- u doubled in the noise term only (x' = ... + sqrt(s'^2 - u^2) eps_hat + 2u z) adds 3u^2 of
  variance per step. At eta = 1 the first step from pure noise has u = s' (nothing is known of
  the data there), so the state at step 1 has variance 4 s_1^2 against V_1 ~ s_1^2: every
  marginal check fails from step 1 on, and the two-draw check sees 4u^2 at every step.
- u doubled consistently (also inside the root) is the eta = 2 member of the DDIM family,
  which in continuous time keeps the marginals too, so the marginal checks cannot pin u where
  2u < s'. At eta = 1 the first step has 2u > s' (the root clips to 0, the noise is 2 s'), so
  they fail there; at eta = 0.5 (an effective eta of 1) they pass (the two chains' variances
  differ by 0.5%, under the tolerance), and the two-draw check fails at every step. Likewise
  any other u <= s' (e.g. sqrt(1 - kept) for sqrt(1 - kept^2)) is a valid member of the
  family that only the two-draw check tells apart.
- Noise added without shrinking eps_hat's coefficient (sqrt(s'^2) in place of sqrt(s'^2 - u^2))
  overshoots every variance: the exact-law and marginal checks fail.
- renoise adding r z instead of sqrt(r^2 - (keep s)^2) z is off by keep^2 s^2, large on a short
  hop (step 3T/4 back 5 steps: about 20% of the variance), which that case checks.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from scipy import stats

from diffsearch.pipelines._flow import FlowDenoiser
from diffsearch.pipelines.base import Conditioning
from diffsearch.seeding import torch_generator

DIM = 256
ROWS = 128
MU = torch.linspace(-1.5, 1.5, DIM, dtype=torch.float64)
S = 2.0
STEPS = 500
SHIFT = 3.0
"""SD3's shift: the schedule spends most steps near pure noise, its largest steps near clean."""
CHECKED = (1, 5, STEPS // 4, STEPS // 2, 3 * STEPS // 4, STEPS - 1, STEPS)
"""Steps whose states are compared with their marginals (the first ones catch a noise std
that is wrong where the step from pure noise has u = s')."""
Z = 5.0
"""Tolerance in standard errors."""
KS_P = 1e-5


class ExactVelocity(torch.nn.Module):
    """v(x, s) = E[eps - x0 | x_s = x] for x0 ~ N(MU, S^2 I) (module docstring), in float64."""

    dtype = torch.float32

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        mean = (1 - sigma) * MU.view(1, DIM, 1, 1)
        variance = (1 - sigma) ** 2 * S**2 + sigma**2
        slope = (sigma - (1 - sigma) * S**2) / variance
        return (slope * (x.double() - mean) - MU.view(1, DIM, 1, 1)).float()


class ExactFlowDenoiser(FlowDenoiser):
    """The flow adapters' sampler with :class:`ExactVelocity` as the network, unconditional."""

    def __init__(self, num_steps: int = STEPS) -> None:
        pipe = SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
                               _execution_device=torch.device("cpu"))
        super().__init__(pipe, ExactVelocity(), num_steps=num_steps, guidance_scale=1.0,
                         latent_shape=(DIM, 1, 1), compute_batch=ROWS)

    def _set_timesteps(self, scheduler: Any) -> None:
        scheduler.set_timesteps(self.num_steps)

    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        return {}

    def _predict_rows(self, x: torch.Tensor, t: torch.Tensor, **rows: torch.Tensor
                      ) -> torch.Tensor:
        # the network sees the timestep, as a transformer does: s = t / num_train_timesteps
        return self.network(x, float(t) / self._schedule.config.num_train_timesteps)


DENOISER = ExactFlowDenoiser()
SIGMAS = DENOISER._schedule.sigmas.double().numpy()
"""s_k for k = 0..T (s_0 = 1: the initial noise is exactly the step-0 marginal)."""


def generators(offset: int) -> list[torch.Generator]:
    return [torch_generator(offset + row) for row in range(ROWS)]


def true_moments(sigma: float) -> tuple[np.ndarray, float]:
    """Mean (per coordinate) and variance of the flow marginal (1 - s) x0 + s eps."""
    return (1 - sigma) * MU.numpy(), (1 - sigma) ** 2 * S**2 + sigma**2


def posterior_std(s: float, s_next: float) -> float:
    """Std of q(x_s' | x_s, x0), s' < s, by conditioning the forward chain: given x0,
    x_s' ~ N((1 - s') x0, s'^2) and x_s = a x_s' + w with a = (1 - s) / (1 - s') and
    Var w = s^2 - a^2 s'^2, so Var(x_s' | x_s, x0) = s'^2 Var w / s^2."""
    a = (1 - s) / (1 - s_next)
    return math.sqrt(s_next**2 * (s**2 - a**2 * s_next**2)) / s


def chain_moments(eta: float, sigmas: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Exact (mean, variance) of the discrete chain's state at every step 0..T, from the
    module docstring of :mod:`diffsearch.pipelines._flow`: x' = (1 - s') x0_hat +
    sqrt(s'^2 - u^2) eps_hat + u z with the exact x0_hat = E[x0 | x], eps_hat = E[eps | x]."""
    mu = MU.numpy()
    mean, variance = np.zeros(DIM), 1.0
    out = [(mean, variance)]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v_s = (1 - s) ** 2 * S**2 + s**2
        gain_x0, gain_eps = (1 - s) * S**2 / v_s, s / v_s  # E[. | x] = m + gain (x - (1-s) mu)
        u = eta * posterior_std(s, s_next) if s_next > 0 else 0.0
        root = math.sqrt(max(s_next**2 - u**2, 0.0))
        slope = (1 - s_next) * gain_x0 + root * gain_eps
        mean = (1 - s_next) * mu + slope * (mean - (1 - s) * mu)
        variance = slope**2 * variance + u**2
        out.append((mean, variance))
    return out


def standardized(x: torch.Tensor, mean: np.ndarray, variance: float) -> np.ndarray:
    """(x - mean) / std, flattened over rows and coordinates."""
    return ((x.reshape(-1, DIM).double().numpy() - mean) / math.sqrt(variance)).ravel()


def assert_standard_normal(z: np.ndarray, what: str, *, bias: float = 0.0) -> None:
    """Mean 0 and variance 1 within Z standard errors of ``z.size`` draws (plus a known
    relative variance ``bias``), and a KS test against N(0, 1)."""
    n = z.size
    assert abs(z.mean()) < Z / math.sqrt(n), (what, z.mean())
    assert abs(z.var() - 1) < Z * math.sqrt(2 / n) + bias, (what, z.var())
    assert stats.kstest(z, "norm").pvalue > KS_P, (what, stats.kstest(z, "norm"))


def sample_states(eta: float) -> dict[int, torch.Tensor]:
    """The states at the CHECKED steps of one run 0 -> T, taken segment by segment (each
    segment resumes the last with the same generators, which is one run)."""
    x = DENOISER.initial_noise(range(ROWS))
    conds = [Conditioning("")] * ROWS
    gens = generators(10**6) if eta else None
    states, step = {0: x}, 0
    for end in CHECKED:
        x = DENOISER.denoise(x, conds, step, end, eta=eta, generators=gens).latents
        states[end], step = x, end
    return states


@pytest.fixture(scope="module", params=[0.0, 0.5, 1.0], ids=lambda eta: f"eta{eta}")
def run(request) -> tuple[float, dict[int, torch.Tensor]]:
    return request.param, sample_states(request.param)


# ---- the sampler --------------------------------------------------------------------------
def test_states_follow_the_chains_exact_law(run):
    eta, states = run
    exact = chain_moments(eta, SIGMAS)
    for step, x in states.items():
        assert_standard_normal(standardized(x, *exact[step]), f"eta {eta}, step {step}")


def test_states_have_the_flow_marginals_and_the_end_is_the_data(run):
    """Every checked step k has the marginal (1 - s_k) x0 + s_k eps; step T is N(mu, S^2)."""
    eta, states = run
    exact = chain_moments(eta, SIGMAS)
    tolerance = Z * math.sqrt(2 / (ROWS * DIM))
    for step, x in states.items():
        mean, variance = true_moments(SIGMAS[step])
        bias = abs(exact[step][1] / variance - 1)  # Euler's own, known exactly
        assert bias < tolerance / 3, (step, bias)
        assert_standard_normal(standardized(x, mean, variance), f"eta {eta}, step {step}",
                               bias=bias)
    assert SIGMAS[STEPS] == 0 and np.allclose(true_moments(0.0)[0], MU.numpy())


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_the_discretisation_bias_shrinks_as_one_over_the_steps(eta):
    """The sampler converges to the flow's marginals: doubling T halves the worst relative
    variance error over the steps (first order), on the same shifted schedule."""
    def worst(steps: int) -> float:
        sigmas = ExactFlowDenoiser(steps)._schedule.sigmas.double().numpy()
        return max(abs(var / true_moments(s)[1] - 1)
                   for s, (_, var) in zip(sigmas, chain_moments(eta, sigmas)))

    errors = [worst(steps) for steps in (125, 250, 500)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 1.8 < coarse / fine < 2.2, errors
    assert errors[-1] < 0.015, errors


def test_step_noise_std_is_the_forward_posterior_std():
    for step in (0, 1, STEPS // 2, STEPS - 2):
        expected = posterior_std(SIGMAS[step], SIGMAS[step + 1])
        assert DENOISER.step_noise_std(step) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert DENOISER.step_noise_std(0) == pytest.approx(SIGMAS[1])  # from pure noise: u = s'
    assert DENOISER.step_noise_std(STEPS - 1) == DENOISER.step_noise_std(STEPS) == 0.0


def exact_draws(step: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """x0 and the state x_k = (1 - s_k) x0 + s_k eps, drawn directly (ROWS, DIM, 1, 1)."""
    rng = np.random.default_rng(seed)
    x0 = MU.numpy() + S * rng.standard_normal((ROWS, DIM))
    x = (1 - SIGMAS[step]) * x0 + SIGMAS[step] * rng.standard_normal((ROWS, DIM))
    return x0, torch.from_numpy(x).float().reshape(ROWS, DIM, 1, 1)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("step", [0, STEPS // 2, STEPS - 2])
def test_one_steps_noise_has_std_eta_times_the_posterior_std(eta, step):
    """Two draws of the step from the same states differ by u (z1 - z2) alone."""
    _, x = exact_draws(step, seed=step)
    conds = [Conditioning("")] * ROWS
    one, two = (DENOISER.denoise(x, conds, step, step + 1, eta=eta,
                                 generators=generators(offset)).latents
                for offset in (2 * 10**6, 3 * 10**6))
    u = eta * posterior_std(SIGMAS[step], SIGMAS[step + 1])
    half_difference = ((one - two).double().numpy().ravel() / math.sqrt(2)) / u
    assert_standard_normal(half_difference, f"eta {eta}, step {step}")


# ---- renoise ------------------------------------------------------------------------------
@pytest.mark.parametrize(("k", "j"), [(STEPS, STEPS // 2), (3 * STEPS // 4, 3 * STEPS // 4 - 5),
                                      (STEPS - 1, STEPS - 20), (STEPS // 2, 1), (STEPS // 4, 0)])
def test_renoise_from_k_to_j_keeps_step_js_marginal_and_the_data(k, j):
    x0, x_k = exact_draws(k, seed=k * 1000 + j)
    moved = DENOISER.renoise(x_k, k, j, generators(4 * 10**6))
    mean, variance = true_moments(SIGMAS[j])
    assert_standard_normal(standardized(moved, mean, variance), f"renoise {k} -> {j}")
    # Cov(x0, x_j) = (1 - s_j) S^2: the coupling to the data the forward process keeps
    centred = moved.reshape(ROWS, DIM).double().numpy() - mean
    products = (x0 - MU.numpy()) * centred
    covariance, error = products.mean(), products.std() / math.sqrt(products.size)
    assert abs(covariance - (1 - SIGMAS[j]) * S**2) < Z * error + 1e-12, (covariance, error)

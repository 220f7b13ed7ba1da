"""A diffusion model on a Gaussian mixture whose denoiser is exact: the testbed's model.

For data x0 ~ sum_j w_j N(mu_j, S_j) under the variance-preserving forward process
x_t = sqrt(a) x0 + sqrt(1 - a) eps (a = alpha-bar), every quantity a sampler needs is closed
form. Given component j, x_t ~ N(sqrt(a) mu_j, C_j) with C_j = a S_j + (1 - a) I, and

    E[x0 | x_t, j] = mu_j + sqrt(a) S_j C_j^-1 (x_t - sqrt(a) mu_j),
    P(j | x_t)     = softmax_j(log w_j - log det(C_j) / 2 - (x_t - sqrt(a) mu_j)' C_j^-1 (...) / 2),
    E[x0 | x_t]    = sum_j P(j | x_t) E[x0 | x_t, j]      (the exact denoiser, Tweedie's x0).

So a search strategy run on :class:`GmmDenoiser` is tested against the model it assumes (a
perfect denoiser), and its output can be compared with distributions known in closed form
(:meth:`GaussianMixture.tilted`), which no trained model allows.

Why DDIM (variance preserving) and not flow matching: it is the sampler of the UNet adapters the
strategies were written against (:class:`~diffsearch.pipelines._discrete.DDIMSampler`), with the
same eta step, ``step_noise_std`` (the eta = 1 posterior std) and forward-process ``renoise``, so
the testbed exercises the strategies' own arithmetic. The schedule a_k = sin^2(pi k / 2T) starts
at a_0 = 0, where the marginal is exactly N(0, I): the initial noise is the model's step-0
distribution, with no truncation error at the noisy end.

A point is a latent of shape (d, 1, 1). :meth:`GmmDenoiser.decode` maps it affinely into an
"image" (B, 3, 1, 1) whose first d channels are (x + BOX) / (2 BOX) (exact in float32 for a power
of two, and inside [0, 1] for every point within +-BOX); :func:`image_to_point` is its inverse,
which the testbed's verifiers read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffsearch.pipelines.base import Conditioning, Denoiser, DenoiseResult, stack_generators_noise

BOX = 8.0
"""Half-width of the square that :meth:`GmmDenoiser.decode` maps onto [0, 1] (a power of two,
so the map and its inverse are exact up to one rounding of ``x + BOX``)."""

LANES = 32
"""The component axis is padded (with zero-weight components) to a multiple of this. A row's
bits then do not depend on its position in a forward pass: every per-row width is a multiple of
the widest CPU vector loop (16 float32s, unrolled twice), so no row falls into a kernel's scalar
tail (see :mod:`diffsearch.pipelines.base`)."""


@dataclass(frozen=True)
class GaussianMixture:
    """sum_j weights[j] N(means[j], covariances[j]) in d dimensions (float64 numpy arrays)."""

    weights: np.ndarray
    """(K,), positive, summing to 1."""
    means: np.ndarray
    """(K, d)."""
    covariances: np.ndarray
    """(K, d, d), symmetric positive definite."""

    @classmethod
    def of(cls, weights: Sequence[float], means: Sequence[Sequence[float]],
           covariances: Sequence[Sequence[Sequence[float]]]) -> GaussianMixture:
        """A mixture from plain lists, checked; the weights are normalised."""
        w = np.asarray(weights, dtype=np.float64)
        mu = np.asarray(means, dtype=np.float64)
        cov = np.asarray(covariances, dtype=np.float64)
        k, d = mu.shape
        if w.shape != (k,) or cov.shape != (k, d, d) or (w <= 0).any():
            raise ValueError(f"a mixture needs K positive weights, (K, d) means and (K, d, d) "
                             f"covariances; got {w.shape}, {mu.shape}, {cov.shape}")
        if not np.allclose(cov, cov.transpose(0, 2, 1)) or (
                np.linalg.eigvalsh(cov) <= 0).any():
            raise ValueError("a mixture's covariances must be symmetric positive definite")
        return cls(w / w.sum(), mu, cov)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> np.ndarray:
        """E[x], (d,)."""
        return self.weights @ self.means

    def covariance(self) -> np.ndarray:
        """Cov[x], (d, d): the mean covariance plus the spread of the means."""
        centred = self.means - self.mean()
        return (np.einsum("k,kij->ij", self.weights, self.covariances)
                + np.einsum("k,ki,kj->ij", self.weights, centred, centred))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n exact draws, (n, d)."""
        components = rng.choice(len(self.weights), size=n, p=self.weights)
        chol = np.linalg.cholesky(self.covariances)[components]
        z = rng.standard_normal((n, self.dim))
        return self.means[components] + np.einsum("nij,nj->ni", chol, z)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """log density at the rows of x (n, d)."""
        return _log_mixture_density(x, self.weights, self.means, self.covariances)

    def tilted(self, direction: Sequence[float], lam: float) -> GaussianMixture:
        """p(x) exp(lam a.x) / Z for the linear reward r(x) = a.x: again a Gaussian mixture.

        Each component's exponential tilt is Gaussian with the mean moved by lam S_j a and the
        same covariance; its mass exp(lam a.mu_j + lam^2 a'S_j a / 2) reweights the modes.
        """
        a = np.asarray(direction, dtype=np.float64)
        shift = lam * self.covariances @ a
        log_w = (np.log(self.weights) + lam * self.means @ a
                 + 0.5 * lam**2 * np.einsum("i,kij,j->k", a, self.covariances, a))
        w = np.exp(log_w - log_w.max())
        return GaussianMixture(w / w.sum(), self.means + shift, self.covariances)

    def projected(self, direction: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The 1-D mixture of a.x for x from this mixture: (weights, means, standard deviations)."""
        a = np.asarray(direction, dtype=np.float64)
        variances = np.einsum("i,kij,j->k", a, self.covariances, a)
        return self.weights, self.means @ a, np.sqrt(variances)

    def noisy(self, alpha_bar: float) -> GaussianMixture:
        """The marginal of x_t = sqrt(a) x0 + sqrt(1 - a) eps (a Gaussian mixture too)."""
        eye = np.eye(self.dim)
        return GaussianMixture(self.weights, math.sqrt(alpha_bar) * self.means,
                               alpha_bar * self.covariances + (1 - alpha_bar) * eye)

    def responsibilities(self, x: np.ndarray) -> np.ndarray:
        """P(component j | x) for the rows of x: (n, K)."""
        log_joint = np.stack([_log_gaussian(x, m, c) for m, c in
                              zip(self.means, self.covariances)], axis=1) + np.log(self.weights)
        resp = np.exp(log_joint - log_joint.max(axis=1, keepdims=True))
        return resp / resp.sum(axis=1, keepdims=True)

    def posterior_mean(self, x: np.ndarray, alpha_bar: float) -> np.ndarray:
        """E[x0 | x_t = x] at noise level a (n, d): the reference for :class:`GmmDenoiser`,
        written directly from the formula in the module docstring."""
        noisy = self.noisy(alpha_bar)
        resp = noisy.responsibilities(x)
        means = [mu + math.sqrt(alpha_bar) * (s @ np.linalg.solve(c, (x - m).T)).T
                 for mu, s, m, c in zip(self.means, self.covariances, noisy.means,
                                        noisy.covariances)]
        return np.einsum("nk,knd->nd", resp, np.stack(means))


def _log_gaussian(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    diff = x - mean
    _, logdet = np.linalg.slogdet(cov)
    quad = np.einsum("ni,ni->n", diff, np.linalg.solve(cov, diff.T).T)
    return -0.5 * (quad + logdet + len(mean) * math.log(2 * math.pi))


def _log_mixture_density(x: np.ndarray, weights: np.ndarray, means: np.ndarray,
                         covariances: np.ndarray) -> np.ndarray:
    per = np.stack([_log_gaussian(x, m, c) for m, c in zip(means, covariances)], axis=1)
    per += np.log(weights)
    top = per.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(per - top).sum(axis=1, keepdims=True)))[:, 0]


def alpha_bar_schedule(num_steps: int) -> np.ndarray:
    """a_k = sin^2(pi k / 2T) for k = 0..T: pure noise at 0, clean at T (float64)."""
    k = np.arange(num_steps + 1, dtype=np.float64)
    a = np.sin(0.5 * math.pi * k / num_steps) ** 2
    a[0], a[-1] = 0.0, 1.0
    return a


def point_to_image(points: torch.Tensor) -> torch.Tensor:
    """(B, d) points to (B, 3, 1, 1) images: channel c < d is (x_c + BOX) / (2 BOX), the rest 0.5
    (d <= 3)."""
    b, d = points.shape
    image = torch.full((b, 3, 1, 1), 0.5, dtype=torch.float32)
    image[:, :d, 0, 0] = (points.float() + BOX) / (2 * BOX)
    return image


def image_to_point(images: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of :func:`point_to_image`: (B, 3, H, W) images to (B, dim) points (float64)."""
    return images[:, :dim, 0, 0].double() * (2 * BOX) - BOX


class GmmDenoiser(Denoiser):
    """DDIM on a :class:`GaussianMixture` with its exact posterior mean as the network.

    The state is float32 between steps (it is what the store keeps, so a run resumed from a
    stored state takes the very steps an uninterrupted one does); each step is computed in
    float64 from it. The model is unconditional: every prompt gets the same (empty)
    conditioning, and prompts are independent runs of the same search.
    """

    def __init__(self, mixture: GaussianMixture, num_steps: int = 50,
                 compute_batch: int = 64) -> None:
        if mixture.dim > 3:
            raise ValueError(f"GmmDenoiser decodes points of at most 3 dimensions, got "
                             f"{mixture.dim}")
        self.mixture = mixture
        self.num_steps = num_steps
        self.latent_shape = (mixture.dim, 1, 1)
        self.compute_batch = compute_batch
        self.alpha_bar = alpha_bar_schedule(num_steps)
        self._constants = [_StepConstants.at(mixture, float(a)) for a in self.alpha_bar[:-1]]

    def encode(self, prompt: str, negative_prompt: str | None = None) -> Conditioning:
        return Conditioning(prompt=prompt, negative_prompt=negative_prompt)

    def posterior_mean(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """E[x0 | x_step = x] for (B, d) float64 rows, in fixed-size forward passes."""
        return self.forward_in_fixed_batches(self._constants[step].posterior_mean, x)

    def denoise(self, latents: torch.Tensor, conds: Sequence[Conditioning], start: int, end: int,
                *, eta: float = 0.0, generators: Sequence[torch.Generator] | None = None
                ) -> DenoiseResult:
        if not 0 <= start <= end <= self.num_steps:
            raise ValueError(f"steps must satisfy 0 <= start <= end <= {self.num_steps}, got "
                             f"{start}..{end}")
        if eta > 0 and (generators is None or len(generators) != latents.shape[0]):
            raise ValueError("eta > 0 needs one generator per candidate")
        n, d = latents.shape[0], self.mixture.dim
        x = latents.reshape(n, d).float()
        x0 = x
        for step in range(start, end):
            x, x0 = self._step(x, step, eta, generators)
        if end == self.num_steps:
            x0 = x
        shape = (n, *self.latent_shape)
        return DenoiseResult(latents=x.reshape(shape), x0=x0.reshape(shape),
                             rows=(end - start) * self.padded_rows(n))

    def _step(self, x: torch.Tensor, step: int, eta: float,
              generators: Sequence[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM's eta step from ``step`` to ``step + 1``: (float32 state, float32 x0)."""
        a, a_next = float(self.alpha_bar[step]), float(self.alpha_bar[step + 1])
        x64 = x.double()
        x0 = self.posterior_mean(x64, step)
        eps = (x64 - math.sqrt(a) * x0) / math.sqrt(1 - a)
        sigma = eta * self.step_noise_std(step)
        x_next = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
        if sigma > 0:
            z = stack_generators_noise(generators, (self.mixture.dim,))  # type: ignore[arg-type]
            x_next = x_next + sigma * z.double()
        return x_next.float(), x0.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return point_to_image(latents.reshape(latents.shape[0], self.mixture.dim))

    def step_noise_std(self, step: int) -> float:
        a, a_next = float(self.alpha_bar[step]), float(self.alpha_bar[step + 1])
        return math.sqrt(max((1 - a_next) / (1 - a) * (1 - a / a_next), 0.0))

    def renoise(self, latents: torch.Tensor, from_step: int, to_step: int,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
        ratio = float(self.alpha_bar[to_step] / self.alpha_bar[from_step])
        noise = stack_generators_noise(generators, self.latent_shape)
        return (math.sqrt(ratio) * latents.double()
                + math.sqrt(max(1 - ratio, 0.0)) * noise.double()).float()


@dataclass(frozen=True)
class _StepConstants:
    """What the posterior mean at one noise level needs, per component: float64 tensors with
    the component axis K last, padded to a multiple of LANES with zero-weight components (log
    weight -inf, so their responsibility is exactly 0)."""

    log_norm: torch.Tensor
    """(K,) log w_j - log det(C_j) / 2."""
    precision: torch.Tensor
    """(d, d, K) C_j^-1."""
    gain: torch.Tensor
    """(d, d, K) sqrt(a) S_j C_j^-1."""
    offset: torch.Tensor
    """(d, K) mu_j - sqrt(a) S_j C_j^-1 sqrt(a) mu_j: E[x0 | x_t, j] = offset_j + gain_j x_t."""
    centre: torch.Tensor
    """(d, K) sqrt(a) mu_j."""

    @classmethod
    def at(cls, mixture: GaussianMixture, alpha_bar: float) -> _StepConstants:
        k, d = mixture.means.shape
        padded = -(-k // LANES) * LANES
        means = np.zeros((padded, d))
        covs = np.tile(np.eye(d), (padded, 1, 1))
        log_w = np.full(padded, -np.inf)
        means[:k], covs[:k], log_w[:k] = mixture.means, mixture.covariances, np.log(
            mixture.weights)
        noisy = alpha_bar * covs + (1 - alpha_bar) * np.eye(d)
        precision = np.linalg.inv(noisy)
        gain = math.sqrt(alpha_bar) * covs @ precision
        centre = math.sqrt(alpha_bar) * means
        offset = means - np.einsum("kij,kj->ki", gain, centre)
        log_norm = log_w - 0.5 * np.linalg.slogdet(noisy)[1]

        def lanes(values: np.ndarray) -> torch.Tensor:  # component axis last, contiguous
            return torch.from_numpy(np.ascontiguousarray(np.moveaxis(values, 0, -1)))

        return cls(torch.from_numpy(log_norm), lanes(precision),
                   lanes(gain), lanes(offset), lanes(centre))

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) float64 -> (B, d) float64. Every tensor is (B, K) or (B, d, K) with K a
        multiple of LANES, so each row is computed on the same vector lanes wherever it sits."""
        d = x.shape[1]
        diff = [x[:, i : i + 1] - self.centre[i] for i in range(d)]  # d x (B, K)
        quad = sum(diff[i] * self.precision[i, j] * diff[j] for i in range(d) for j in range(d))
        resp = torch.softmax(self.log_norm - 0.5 * quad, dim=1)
        conditional = [self.offset[i] + sum(self.gain[i, j] * x[:, j : j + 1] for j in range(d))
                       for i in range(d)]
        return torch.stack([(resp * c).sum(dim=1) for c in conditional], dim=1)

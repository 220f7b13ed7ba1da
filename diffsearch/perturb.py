"""What is done to a task's starting latent before it is denoised (``Task.perturbation``).

Workers call :func:`apply_perturbations` on the rows of a batch that carry a perturbation. Each
row draws its randomness from its own generator (``task_generator(task.seed, "perturb")``), one
standard-normal draw of the latent's shape, so a row's result depends only on its task: never on
its batch-mates, the batch size or its position in the batch.

The maths lives in small pure functions that take the noise as an argument, so tests can check
them exactly against a known draw.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from diffsearch.pipelines.base import Denoiser, stack_generators_noise
from diffsearch.tasks import Perturbation, PerturbKind


def mutate_noise(x: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor,
                 noise_scale: float = 1.0) -> torch.Tensor:
    """x' = sqrt(1 - b^2) x + b s eps, row-wise (``beta`` shape (B,)).

    With x ~ N(0, s^2 I) and eps ~ N(0, I) independent, x' ~ N(0, s^2 I) again: a mutated noise
    is as valid a starting noise as a fresh one, with correlation sqrt(1 - b^2) to its parent.
    ``s`` is the scheduler's init noise sigma, which the initial noise already carries.
    """
    b = _per_row(beta, x)
    return torch.sqrt(1 - b * b) * x + b * noise_scale * eps


def add_step_noise(x: torch.Tensor, std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x' = x + std eps, row-wise: EvoSearch's mutation of an intermediate state, with
    ``std = strength * sigma_k`` the sampler's own stochastic step size at the state's step."""
    return x + _per_row(std, x) * eps


def neighbour(x: torch.Tensor, cosine: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """y = |x| (c u + sqrt(1 - c^2) w), u = x / |x|, w the unit part of eps orthogonal to u.

    y keeps the pivot's norm and has exactly cosine c with it; w is uniform on the unit sphere
    of the orthogonal complement, so neighbours spread evenly around the pivot. Computed in
    float64 so the cosine holds to float32 precision.
    """
    flat = x.reshape(x.shape[0], -1).double()
    norm = flat.norm(dim=1, keepdim=True)
    if (norm == 0).any():
        raise ValueError("neighbour perturbation of an all-zero latent has no direction")
    u = flat / norm
    e = eps.reshape(eps.shape[0], -1).double()
    e = e - (e * u).sum(dim=1, keepdim=True) * u
    w = e / e.norm(dim=1, keepdim=True)
    c = cosine.double().reshape(-1, 1)
    y = norm * (c * u + torch.sqrt(1 - c * c) * w)
    return y.reshape(x.shape).to(x.dtype)


def apply_perturbations(
    latents: torch.Tensor,
    perturbations: Sequence[Perturbation],
    generators: Sequence[torch.Generator],
    denoiser: Denoiser,
    source_steps: Sequence[int],
) -> torch.Tensor:
    """Perturb each row of ``latents`` (at step ``source_steps[i]``) by ``perturbations[i]``.

    Rows of one kind are computed together; RENOISE rows are grouped by (from, to) step because
    the denoiser's forward process takes one step pair per call. Returns a new tensor.
    """
    n = latents.shape[0]
    if not len(perturbations) == len(generators) == len(source_steps) == n:
        raise ValueError(f"{n} latents need as many perturbations, generators and source steps, "
                         f"got {len(perturbations)}, {len(generators)}, {len(source_steps)}")
    for perturbation, step in zip(perturbations, source_steps):
        check_perturbation(perturbation, step, denoiser.num_steps)
    out = latents.clone()
    rows_by_kind: dict[PerturbKind, list[int]] = defaultdict(list)
    for row, perturbation in enumerate(perturbations):
        rows_by_kind[perturbation.kind].append(row)
    shape = tuple(latents.shape[1:])

    def noise(rows: list[int]) -> torch.Tensor:
        return stack_generators_noise([generators[i] for i in rows], shape).to(latents.dtype)

    def strengths(rows: list[int]) -> torch.Tensor:
        return torch.tensor([perturbations[i].strength for i in rows], dtype=latents.dtype)

    for kind, rows in rows_by_kind.items():
        x = latents[rows]
        if kind is PerturbKind.NOISE_MUTATION:
            out[rows] = mutate_noise(x, strengths(rows), noise(rows), denoiser.noise_scale())
        elif kind is PerturbKind.STEP_NOISE:
            sigmas = torch.tensor([denoiser.step_noise_std(source_steps[i]) for i in rows],
                                  dtype=latents.dtype)
            out[rows] = add_step_noise(x, strengths(rows) * sigmas, noise(rows))
        elif kind is PerturbKind.NEIGHBOUR:
            out[rows] = neighbour(x, strengths(rows), noise(rows))
        else:
            pairs: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i in rows:
                pairs[(source_steps[i], perturbations[i].to_step)].append(i)  # type: ignore[index]
            for (from_step, to_step), group in pairs.items():
                out[group] = denoiser.renoise(latents[group], from_step, to_step,
                                              [generators[i] for i in group]).to(latents.dtype)
    return out


def check_perturbation(perturbation: Perturbation, source_step: int, num_steps: int) -> None:
    """Refuse a perturbation that does not fit the latent it is applied to (a strategy bug)."""
    kind, strength = perturbation.kind, perturbation.strength
    if not math.isfinite(strength):
        raise ValueError(f"{kind.value} strength must be finite, got {strength}")
    if kind is PerturbKind.NOISE_MUTATION:
        if source_step != 0:
            raise ValueError(f"noise_mutation applies to step-0 noise, got a latent at step "
                             f"{source_step}; use step_noise for intermediate states")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"noise_mutation strength (beta) must be in [0, 1], got {strength}")
    elif kind is PerturbKind.STEP_NOISE:
        if not 0 <= source_step < num_steps:
            raise ValueError(f"step_noise needs a latent at a step in 0..{num_steps - 1}, "
                             f"got {source_step}")
        if strength < 0:
            raise ValueError(f"step_noise strength must be >= 0, got {strength}")
    elif kind is PerturbKind.NEIGHBOUR:
        if not -1.0 <= strength <= 1.0:
            raise ValueError(f"neighbour strength (cosine) must be in [-1, 1], got {strength}")
    else:
        to_step = perturbation.to_step
        if to_step is None or not 0 <= to_step < source_step:
            raise ValueError(f"renoise needs 0 <= to_step < the source's step {source_step}, "
                             f"got to_step={to_step}")


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped to broadcast over the rows of ``like``."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

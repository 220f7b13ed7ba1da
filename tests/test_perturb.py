"""Perturbations of starting latents: their statistics, exact maths, row independence, checks."""

from __future__ import annotations

import math

import pytest
import torch

from diffsearch.perturb import apply_perturbations, check_perturbation, neighbour
from diffsearch.seeding import task_generator, torch_generator
from diffsearch.tasks import Perturbation, PerturbKind
from fake_denoiser import FakeDenoiser

SHAPE = (3, 4, 4)


class ScaledNoiseDenoiser(FakeDenoiser):
    """A sampler whose initial noise is N(0, s^2 I), like Euler's init_noise_sigma."""

    def noise_scale(self) -> float:
        return 3.0


def gens(seeds: range | list[int]) -> list[torch.Generator]:
    return [task_generator(seed, "perturb") for seed in seeds]


def draws(seeds: range | list[int]) -> torch.Tensor:
    """The standard-normal draw each row's generator gives (what the perturbation must use)."""
    return torch.stack([torch.randn(SHAPE, generator=g) for g in gens(seeds)])


def noise(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn((n, *SHAPE), generator=torch_generator(seed)) * scale


def test_noise_mutation_keeps_the_noise_distribution() -> None:
    d, n, beta = FakeDenoiser(), 3000, 0.3
    x = noise(n)
    y = apply_perturbations(x, [Perturbation(PerturbKind.NOISE_MUTATION, beta)] * n,
                            gens(range(n)), d, [0] * n)
    assert abs(y.mean().item()) < 0.01
    assert y.var().item() == pytest.approx(1.0, abs=0.02)
    correlation = (x * y).mean().item() / (x.std() * y.std()).item()
    assert correlation == pytest.approx(math.sqrt(1 - beta**2), abs=0.01)
    # exactly the formula, with each row's own generator draw
    expected = math.sqrt(1 - beta**2) * x + beta * draws(range(n))
    torch.testing.assert_close(y, expected)


def test_noise_mutation_uses_the_samplers_noise_scale() -> None:
    d, n = ScaledNoiseDenoiser(), 3000
    x = noise(n, scale=3.0)
    y = apply_perturbations(x, [Perturbation(PerturbKind.NOISE_MUTATION, 0.5)] * n,
                            gens(range(n)), d, [0] * n)
    assert y.std().item() == pytest.approx(3.0, rel=0.02)


def test_step_noise_adds_the_samplers_step_std_at_the_source_step() -> None:
    d = FakeDenoiser(num_steps=10)
    x = noise(3)
    steps = [2, 5, 9]
    y = apply_perturbations(x, [Perturbation(PerturbKind.STEP_NOISE, 0.8)] * 3, gens([4, 5, 6]),
                            d, steps)
    sigmas = torch.tensor([d.step_noise_std(k) for k in steps]).view(-1, 1, 1, 1)
    torch.testing.assert_close(y, x + 0.8 * sigmas * draws([4, 5, 6]))
    assert len(set(sigmas.flatten().tolist())) == 3  # each row took its own step's std


def test_neighbour_has_the_exact_cosine_and_norm() -> None:
    d, n = FakeDenoiser(), 50
    x = noise(n)
    for c in (0.95, 0.5, 0.0, -0.3):
        y = apply_perturbations(x, [Perturbation(PerturbKind.NEIGHBOUR, c)] * n,
                                gens(range(n)), d, [0] * n)
        cosine = torch.nn.functional.cosine_similarity(x.flatten(1), y.flatten(1))
        torch.testing.assert_close(cosine, torch.full((n,), c), atol=1e-6, rtol=0)
        torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))


def test_neighbours_spread_evenly_around_the_pivot() -> None:
    """w is uniform on the sphere orthogonal to the pivot: the mean neighbour is c * pivot."""
    n, c = 4000, 0.95
    pivot = noise(1).expand(n, *SHAPE)
    y = neighbour(pivot, torch.full((n,), c), draws(range(n)))
    torch.testing.assert_close(y.mean(0), c * pivot[0], atol=0.02, rtol=0)
    # the orthogonal parts are not all alike: they spread over the whole complement
    orthogonal = (y - c * pivot).flatten(1)
    assert orthogonal.std(dim=0).min().item() > 0.05


def test_renoise_is_the_denoisers_forward_process_per_source_step() -> None:
    d = FakeDenoiser(num_steps=10)
    x = noise(4)
    perturbations = [Perturbation(PerturbKind.RENOISE, to_step=to) for to in (2, 2, 5, 0)]
    sources = [6, 6, 8, 10]
    y = apply_perturbations(x, perturbations, gens(range(4)), d, sources)
    for row, (p, source) in enumerate(zip(perturbations, sources)):
        alone = d.renoise(x[row:row + 1], source, p.to_step, gens([row]))
        torch.testing.assert_close(y[row:row + 1], alone)


def test_rows_do_not_depend_on_their_batch() -> None:
    """A mixed batch gives every row what it gets alone; equal seeds repeat, others differ."""
    d = FakeDenoiser(num_steps=10)
    x = noise(4, seed=3)
    perturbations = [Perturbation(PerturbKind.NOISE_MUTATION, 0.25),
                     Perturbation(PerturbKind.STEP_NOISE, 1.0),
                     Perturbation(PerturbKind.NEIGHBOUR, 0.9),
                     Perturbation(PerturbKind.RENOISE, to_step=1)]
    sources = [0, 4, 0, 7]
    batch = apply_perturbations(x, perturbations, gens([10, 11, 12, 13]), d, sources)
    for row in (3, 0, 2, 1):
        alone = apply_perturbations(x[row:row + 1], perturbations[row:row + 1],
                                    gens([10 + row]), d, sources[row:row + 1])
        assert torch.equal(batch[row:row + 1], alone)
    again = apply_perturbations(x, perturbations, gens([10, 11, 12, 13]), d, sources)
    assert torch.equal(batch, again)
    other = apply_perturbations(x, perturbations, gens([20, 21, 22, 23]), d, sources)
    assert all(not torch.equal(a, b) for a, b in zip(batch, other))
    assert torch.equal(x, noise(4, seed=3))  # the input is not modified


@pytest.mark.parametrize(("perturbation", "step", "message"), [
    (Perturbation(PerturbKind.NOISE_MUTATION, 0.2), 3, "step-0 noise"),
    (Perturbation(PerturbKind.NOISE_MUTATION, 1.5), 0, "beta"),
    (Perturbation(PerturbKind.STEP_NOISE, -1.0), 2, ">= 0"),
    (Perturbation(PerturbKind.STEP_NOISE, 1.0), 10, "step in 0..9"),
    (Perturbation(PerturbKind.NEIGHBOUR, 1.2), 0, "cosine"),
    (Perturbation(PerturbKind.NEIGHBOUR, math.nan), 0, "finite"),
    (Perturbation(PerturbKind.RENOISE), 5, "to_step=None"),
    (Perturbation(PerturbKind.RENOISE, to_step=5), 5, "to_step=5"),
])
def test_perturbations_that_do_not_fit_are_refused(perturbation: Perturbation, step: int,
                                                   message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_perturbation(perturbation, step, num_steps=10)
    with pytest.raises(ValueError, match=message):
        apply_perturbations(noise(1), [perturbation], gens([0]), FakeDenoiser(), [step])


def test_mismatched_rows_and_zero_latents_are_refused() -> None:
    d = FakeDenoiser()
    mutation = Perturbation(PerturbKind.NOISE_MUTATION, 0.2)
    with pytest.raises(ValueError, match="2 latents need as many"):
        apply_perturbations(noise(2), [mutation], gens([0]), d, [0])
    with pytest.raises(ValueError, match="all-zero latent"):
        apply_perturbations(torch.zeros(1, *SHAPE), [Perturbation(PerturbKind.NEIGHBOUR, 0.9)],
                            gens([0]), d, [0])

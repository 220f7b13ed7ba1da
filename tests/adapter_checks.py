"""The behaviour every denoiser adapter must show, written once and run for each family.

Each check takes an adapter built over a tiny pipeline; ``reference`` (where needed) runs the
diffusers pipeline itself from the same initial noise, so the adapter is compared with
diffusers' own loop rather than with numbers written down here.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from diffusers import DiffusionPipeline

from diffsearch.pipelines.base import Denoiser
from diffsearch.seeding import torch_generator

PROMPTS = ["a red circle", "two blue squares", "a red circle", "a green triangle at the top"]
SEEDS = [11, 22, 33, 44]

PipelineT = TypeVar("PipelineT", bound=DiffusionPipeline)
Reference = Callable[[torch.Tensor, list[str]], torch.Tensor]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Pin torch to one intra-op thread: the test machine's cores are shared, and
    oversubscribed OpenMP threads make tiny models a hundred times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_module() -> Iterator[None]:
    """``one_thread`` for a whole test module, its module-scoped pipelines included. A module
    takes it with ``_one_thread = checks.one_thread_per_module``: pytest finds fixtures among a
    module's attributes, so no import that lint would call unused is needed."""
    with one_thread():
        yield


def load_pipeline(pipeline_class: type[PipelineT], folder: Path, **kwargs: Any) -> PipelineT:
    """The tiny pipeline in ``folder`` with its progress bar off: every reference run would
    print one."""
    pipe = pipeline_class.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_reference(pipe: DiffusionPipeline, steps: int, guidance: float,
                       **call_options: Any) -> Reference:
    """The pipeline's own 0 -> T loop as the ``reference`` of ``check_matches_pipeline``, for
    pipelines whose ``latents`` are laid out as the adapter's (Flux packs them: its test
    writes its own). ``call_options`` go to the pipeline call (``negative_prompt``, ``height``,
    ``width``, ``generator``)."""

    def reference(noise: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=noise,
                    output_type="latent", **call_options).images

    return reference


def conds_for(denoiser: Denoiser, prompts: list[str] = PROMPTS) -> list:
    return [denoiser.encode(p) for p in prompts]


def step_generators(denoiser: Denoiser, seeds: list[int], eta: float = 0.0
                    ) -> list[torch.Generator] | None:
    """One generator per candidate where the steps draw noise (eta > 0, or an ancestral
    sampler at every step), else None."""
    if eta > 0 or not denoiser.deterministic:
        return [torch_generator(s) for s in seeds]
    return None


def check_matches_pipeline(denoiser: Denoiser, reference: Reference, atol: float = 1e-4) -> None:
    """0 -> T through the adapter equals the pipeline's own output from the same noise.

    ``reference(noise, prompts)`` gets the unscaled standard-normal noise (the pipeline scales
    it by ``init_noise_sigma`` itself) and returns the pipeline's final latents.
    """
    noise = denoiser.initial_noise(SEEDS) / denoiser.noise_scale()
    ours = denoiser.denoise(noise * denoiser.noise_scale(), conds_for(denoiser), 0,
                            denoiser.num_steps, generators=step_generators(denoiser, SEEDS))
    theirs = reference(noise, PROMPTS).float()
    assert ours.latents.shape == theirs.shape
    assert ours.latents.abs().max() > 0.1  # a real result, not a degenerate zero
    torch.testing.assert_close(ours.latents, theirs, atol=atol, rtol=1e-4)
    assert torch.equal(ours.x0, ours.latents)  # at T the state is its own clean estimate


def check_resume_is_exact(denoiser: Denoiser, k: int) -> None:
    """0 -> k then k -> T gives the same bits as 0 -> T; x0 at k is a real estimate. (A
    sampler that draws noise every step continues its generators' streams in the tail.)"""
    conds = conds_for(denoiser)
    x = denoiser.initial_noise(SEEDS)
    full = denoiser.denoise(x, conds, 0, denoiser.num_steps,
                            generators=step_generators(denoiser, SEEDS))
    generators = step_generators(denoiser, SEEDS)
    head = denoiser.denoise(x, conds, 0, k, generators=generators)
    tail = denoiser.denoise(head.latents, conds, k, denoiser.num_steps, generators=generators)
    assert torch.equal(tail.latents, full.latents)
    assert not torch.equal(head.x0, head.latents)
    assert head.x0.shape == head.latents.shape == x.shape
    assert head.latents.dtype == head.x0.dtype == torch.float32
    assert head.latents.device.type == "cpu"


def check_resume_is_refused(denoiser: Denoiser, k: int) -> None:
    """A multistep sampler runs 0 -> k (its x0 a real estimate) but refuses to start at k:
    the latent alone is not its state."""
    conds = conds_for(denoiser)
    head = denoiser.denoise(denoiser.initial_noise(SEEDS), conds, 0, k)
    assert not torch.equal(head.x0, head.latents)
    with pytest.raises(ValueError,
                       match=re.escape(f"{denoiser.sampler.name} keeps the model outputs")):
        denoiser.denoise(head.latents, conds, k, denoiser.num_steps)
    with pytest.raises(ValueError, match="no stochastic step"):
        denoiser.denoise(head.latents, conds, 0, k, eta=1.0,
                         generators=[torch_generator(s) for s in SEEDS])


def check_batch_invariance(denoiser: Denoiser, eta: float = 0.0,
                           conds: list | None = None) -> None:
    """A batch of 4 candidates (mixed prompts, or the given ``conds``) equals 4 single runs,
    bit for bit."""
    conds = conds or conds_for(denoiser)
    x = denoiser.initial_noise(SEEDS)

    def gens(seeds: list[int]) -> list[torch.Generator] | None:
        return step_generators(denoiser, seeds, eta)

    batch = denoiser.denoise(x, conds, 0, denoiser.num_steps, eta=eta, generators=gens(SEEDS))
    for i, seed in enumerate(SEEDS):
        single = denoiser.denoise(x[i : i + 1], conds[i : i + 1], 0, denoiser.num_steps,
                                  eta=eta, generators=gens([seed]))
        assert torch.equal(single.latents[0], batch.latents[i]), f"candidate {i} differs"


def check_stochastic_steps(denoiser: Denoiser) -> None:
    """eta > 0: each candidate's noise comes from its own generator, runs repeat exactly, and
    the noise actually changes the result."""
    conds = conds_for(denoiser)
    x = denoiser.initial_noise(SEEDS)
    T = denoiser.num_steps

    def run(seeds: list[int], rows: slice = slice(None)) -> torch.Tensor:
        gens = [torch_generator(s) for s in seeds]
        return denoiser.denoise(x[rows], conds[rows], 0, T, eta=1.0, generators=gens).latents

    first = run([1, 2, 3, 4])
    assert torch.equal(first, run([1, 2, 3, 4]))
    # Candidate 2 with its own seed is unchanged whatever its batch-mates' seeds are.
    other_mates = run([9, 8, 3, 7])
    assert torch.equal(other_mates[2], first[2])
    assert not torch.equal(other_mates[0], first[0])
    deterministic = denoiser.denoise(x, conds, 0, T).latents
    assert not torch.allclose(first, deterministic)


def check_step_noise_std(denoiser: Denoiser, step: int) -> None:
    """The eta = 1 step from ``step`` adds exactly ``step_noise_std(step)`` times its draw: two
    runs that differ only in their generators differ by std * (z_a - z_b)."""
    conds = conds_for(denoiser)[:1]
    x = denoiser.initial_noise(SEEDS[:1])
    if step > 0:
        x = denoiser.denoise(x, conds, 0, step).latents
    a = denoiser.denoise(x, conds, step, step + 1, eta=1.0, generators=[torch_generator(5)])
    b = denoiser.denoise(x, conds, step, step + 1, eta=1.0, generators=[torch_generator(6)])
    shape = denoiser.latent_shape
    z_a = torch.randn(shape, generator=torch_generator(5))
    z_b = torch.randn(shape, generator=torch_generator(6))
    std = denoiser.step_noise_std(step)
    assert std > 0
    torch.testing.assert_close(a.latents[0] - b.latents[0], std * (z_a - z_b),
                               atol=1e-5, rtol=1e-4)
    assert denoiser.step_noise_std(denoiser.num_steps) == 0.0


def check_decode(denoiser: Denoiser, height: int, width: int) -> None:
    """Decoded images are float32 (B, 3, H, W) in [0, 1], and each row is decoded alone."""
    conds = conds_for(denoiser)
    final = denoiser.denoise(denoiser.initial_noise(SEEDS), conds, 0, denoiser.num_steps,
                             generators=step_generators(denoiser, SEEDS)).latents
    images = denoiser.decode(final)
    assert images.shape == (4, 3, height, width)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert images.std() > 0
    assert torch.equal(denoiser.decode(final[1:2])[0], images[1])

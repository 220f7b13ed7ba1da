"""Every (family x sampler) pair against diffusers' own pipeline, at a size other than the tiny
models' native 16x16 and with a negative prompt, on tiny random pipelines.

The reference schedulers are built here from diffusers' classes, independently of the adapters'
table, so a wrong class or config key in the adapters shows as a mismatch with the pipeline.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import adapter_checks as checks
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TextToVideoSDPipeline,
    UniPCMultistepScheduler,
)

from diffsearch.pipelines.flux import FluxDenoiser
from diffsearch.pipelines.samplers import SAMPLERS, sampler_names
from diffsearch.pipelines.sd3 import StableDiffusion3Denoiser
from diffsearch.pipelines.sdxl import StableDiffusionXLDenoiser
from diffsearch.pipelines.stable_diffusion import StableDiffusionDenoiser
from diffsearch.pipelines.video import TextToVideoDenoiser
from diffsearch.seeding import torch_generator
from tiny_pipelines import (
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_video_pipeline,
)

STEPS = 5
GUIDANCE = 4.0
HEIGHT, WIDTH = 24, 16
"""Not the tiny models' native 16x16, and not square: latents (4, 12, 8)."""
NEGATIVE = "blurry, low quality"

REFERENCE_SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpm++-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++",
                                               "solver_order": 2}),
    "dpm++-2m-karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++",
                                                      "solver_order": 2,
                                                      "use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}
UNET_FAMILIES = {"sd": (StableDiffusionPipeline, StableDiffusionDenoiser, tiny_sd_pipeline),
                 "sdxl": (StableDiffusionXLPipeline, StableDiffusionXLDenoiser,
                          tiny_sdxl_pipeline)}

_one_thread = checks.one_thread_per_module


def test_every_unet_sampler_has_a_reference_here():
    assert set(REFERENCE_SCHEDULERS) == set(sampler_names(flow=False))


@pytest.fixture(scope="module", params=list(UNET_FAMILIES))
def unet_family(request, tmp_path_factory):
    pipeline_class, adapter_class, build = UNET_FAMILIES[request.param]
    pipe = checks.load_pipeline(pipeline_class, build(tmp_path_factory.mktemp(request.param)))
    return pipe, adapter_class


@pytest.fixture(scope="module", params=sampler_names(flow=False))
def unet_case(request, unet_family):
    """(adapter, the pipeline on the reference scheduler, sampler name)."""
    pipe, adapter_class = unet_family
    scheduler_class, overrides = REFERENCE_SCHEDULERS[request.param]
    if "clip_sample" not in pipe.scheduler.config:  # Euler (SDXL) says nothing of clipping:
        overrides = {**overrides, "clip_sample": False}  # a latent x0 is not clipped to [-1, 1]
    scheduler = scheduler_class.from_config({**pipe.scheduler.config, **overrides})
    reference_pipe = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    reference_pipe.set_progress_bar_config(disable=True)
    denoiser = adapter_class(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3,
                             height=HEIGHT, width=WIDTH, sampler=request.param,
                             negative_prompt=NEGATIVE)
    return denoiser, reference_pipe, request.param


def test_unet_sampler_matches_the_pipeline(unet_case):
    denoiser, reference_pipe, name = unet_case
    assert denoiser.latent_shape == (4, HEIGHT // 2, WIDTH // 2)
    assert denoiser.sampler.name == name
    generators = checks.step_generators(denoiser, checks.SEEDS)
    reference = checks.pipeline_reference(
        reference_pipe, STEPS, GUIDANCE, negative_prompt=[NEGATIVE] * 4, height=HEIGHT, width=WIDTH,
        **({"generator": generators} if generators else {}))
    checks.check_matches_pipeline(denoiser, reference)


def test_unet_sampler_resumes_exactly_or_refuses_to(unet_case):
    denoiser, _, name = unet_case
    if SAMPLERS[name].resume:
        checks.check_resume_is_exact(denoiser, k=2)
    else:
        checks.check_resume_is_refused(denoiser, k=2)


def test_unet_sampler_batch_equals_its_singles(unet_case):
    checks.check_batch_invariance(unet_case[0])


def test_unet_family_decodes_at_the_asked_size(unet_family):
    pipe, adapter_class = unet_family
    denoiser = adapter_class(pipe, num_steps=2, guidance_scale=GUIDANCE, height=HEIGHT,
                             width=WIDTH)
    checks.check_decode(denoiser, HEIGHT, WIDTH)


def test_euler_ancestral_needs_generators_at_eta_zero(unet_family):
    pipe, adapter_class = unet_family
    denoiser = adapter_class(pipe, num_steps=STEPS, guidance_scale=GUIDANCE,
                             sampler="euler-ancestral")
    assert not denoiser.deterministic
    x = denoiser.initial_noise([1])
    with pytest.raises(ValueError, match="euler-ancestral .* one generator per candidate"):
        denoiser.denoise(x, [denoiser.encode("a red circle")], 0, 1)


def test_negative_prompts_travel_per_row(unet_family):
    """Rows of one batch may carry different negative prompts (the per-prompt setting's seam):
    the batch equals its singles, and the negative prompt changes the result."""
    pipe, adapter_class = unet_family
    denoiser = adapter_class(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3)
    negatives = [None, NEGATIVE, "dark", NEGATIVE]
    conds = [denoiser.encode(p, negative_prompt=n) for p, n in zip(checks.PROMPTS, negatives)]
    assert [c.negative_prompt for c in conds] == negatives
    checks.check_batch_invariance(denoiser, conds=conds)
    x = denoiser.initial_noise(checks.SEEDS[:1])
    plain = denoiser.denoise(x, conds[:1], 0, STEPS).latents
    negative = denoiser.denoise(x, [denoiser.encode(checks.PROMPTS[0], NEGATIVE)], 0,
                                STEPS).latents
    assert not torch.allclose(plain, negative)


# ---- whole-clip video (SD's components, a 3-D UNet) ---------------------------------------------
FRAMES = 2
VIDEO_STEPS = 3
"""Fewer than the image tests' steps: a 3-D UNet pass costs several 2-D ones on a CPU."""


@pytest.fixture(scope="module")
def video_pipe(tmp_path_factory) -> TextToVideoSDPipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the pipeline is marked deprecated
        return checks.load_pipeline(TextToVideoSDPipeline,
                                    tiny_video_pipeline(tmp_path_factory.mktemp("t2v")))


@pytest.mark.parametrize("sampler", sampler_names(flow=False))
def test_video_sampler_matches_the_pipeline_resumes_or_refuses_and_batches(video_pipe, sampler):
    """As for images; but euler-ancestral is not compared with the pipeline, which folds the
    frames into its batch and so cannot give each clip its own generator."""
    scheduler_class, overrides = REFERENCE_SCHEDULERS[sampler]
    scheduler = scheduler_class.from_config({**video_pipe.scheduler.config, **overrides})
    reference_pipe = TextToVideoSDPipeline(**{**video_pipe.components, "scheduler": scheduler})
    reference_pipe.set_progress_bar_config(disable=True)
    denoiser = TextToVideoDenoiser(video_pipe, num_steps=VIDEO_STEPS, guidance_scale=GUIDANCE,
                                   num_frames=FRAMES, compute_batch=2, height=HEIGHT,
                                   width=WIDTH, sampler=sampler, negative_prompt=NEGATIVE)
    assert denoiser.latent_shape == (4, FRAMES, HEIGHT // 2, WIDTH // 2)

    def reference(noise: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return reference_pipe(prompts, num_frames=FRAMES, num_inference_steps=VIDEO_STEPS,
                              guidance_scale=GUIDANCE, negative_prompt=[NEGATIVE] * len(prompts),
                              height=HEIGHT, width=WIDTH, latents=noise,
                              output_type="latent").frames

    if SAMPLERS[sampler].deterministic:
        checks.check_matches_pipeline(denoiser, reference)
    if SAMPLERS[sampler].resume:
        checks.check_resume_is_exact(denoiser, k=1)
    else:
        checks.check_resume_is_refused(denoiser, k=1)
    checks.check_batch_invariance(denoiser)


# ---- flow-matching families ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory) -> StableDiffusion3Pipeline:
    return checks.load_pipeline(StableDiffusion3Pipeline,
                                tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3")))


@pytest.fixture(scope="module")
def sd3(sd3_pipe) -> StableDiffusion3Denoiser:
    return StableDiffusion3Denoiser(sd3_pipe, num_steps=STEPS, guidance_scale=GUIDANCE,
                                    compute_batch=3, height=HEIGHT, width=WIDTH,
                                    sampler="flow-euler", negative_prompt=NEGATIVE)


def test_sd3_flow_euler_matches_the_pipeline_with_size_and_negative_prompt(sd3_pipe, sd3):
    assert sd3.latent_shape == (4, HEIGHT // 2, WIDTH // 2)
    checks.check_matches_pipeline(sd3, checks.pipeline_reference(
        sd3_pipe, STEPS, GUIDANCE, negative_prompt=[NEGATIVE] * 4, height=HEIGHT, width=WIDTH))


def test_sd3_flow_euler_resumes_and_batches_exactly(sd3):
    checks.check_resume_is_exact(sd3, k=2)
    checks.check_batch_invariance(sd3)
    checks.check_batch_invariance(sd3, eta=1.0)
    checks.check_decode(sd3, HEIGHT, WIDTH)


FLUX_HEIGHT, FLUX_WIDTH = 32, 16
"""Multiples of 4 (the tiny VAE's factor 2, times 2 for the 2x2 packing), not native."""


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory) -> FluxPipeline:
    return checks.load_pipeline(FluxPipeline, tiny_flux_pipeline(tmp_path_factory.mktemp("flux")))


@pytest.fixture(scope="module")
def flux(flux_pipe) -> FluxDenoiser:
    return FluxDenoiser(flux_pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3,
                        height=FLUX_HEIGHT, width=FLUX_WIDTH, sampler="flow-euler")


def test_flux_flow_euler_matches_the_pipeline_at_another_size(flux_pipe, flux):
    assert flux.latent_shape == (4, FLUX_HEIGHT // 2, FLUX_WIDTH // 2)

    def reference(noise: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        n, c, h, w = noise.shape
        packed = flux_pipe._pack_latents(noise, n, c, h, w)
        out = flux_pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        latents=packed, height=FLUX_HEIGHT, width=FLUX_WIDTH,
                        output_type="latent").images
        return flux_pipe._unpack_latents(out, FLUX_HEIGHT, FLUX_WIDTH, flux_pipe.vae_scale_factor)

    checks.check_matches_pipeline(flux, reference)


def test_flux_flow_euler_resumes_and_batches_exactly(flux):
    checks.check_resume_is_exact(flux, k=3)
    checks.check_batch_invariance(flux, eta=1.0)
    checks.check_decode(flux, FLUX_HEIGHT, FLUX_WIDTH)


def test_flux_refuses_a_negative_prompt(flux_pipe, flux):
    with pytest.raises(ValueError, match="FLUX takes no negative prompt"):
        FluxDenoiser(flux_pipe, num_steps=STEPS, guidance_scale=GUIDANCE,
                     negative_prompt="blurry")
    with pytest.raises(ValueError, match="FLUX takes no negative prompt"):
        flux.encode("a red circle", negative_prompt="blurry")


@pytest.mark.parametrize("sampler", ["ddim", "dpm++-2m"])
def test_flow_models_refuse_unet_samplers(sd3_pipe, sampler):
    with pytest.raises(ValueError, match=re.escape(f"sampler '{sampler}' is not for flow")):
        StableDiffusion3Denoiser(sd3_pipe, num_steps=STEPS, guidance_scale=GUIDANCE,
                                 sampler=sampler)


def test_unet_models_refuse_the_flow_sampler(unet_family):
    pipe, adapter_class = unet_family
    with pytest.raises(ValueError, match="sampler 'flow-euler' is not for UNet models"):
        adapter_class(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, sampler="flow-euler")


def test_flux_stochastic_steps_stay_per_candidate(flux):
    conds = checks.conds_for(flux)
    x = flux.initial_noise(checks.SEEDS)
    a = flux.denoise(x, conds, 0, STEPS, eta=1.0,
                     generators=[torch_generator(s) for s in (1, 2, 3, 4)]).latents
    b = flux.denoise(x, conds, 0, STEPS, eta=1.0,
                     generators=[torch_generator(s) for s in (9, 2, 8, 7)]).latents
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])

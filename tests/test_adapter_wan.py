"""The Wan adapters (WanPipeline 2.1 / 2.2, WanImageToVideoPipeline) against diffusers' own loops,
on tiny random pipelines (tests/tiny_wan.py), and a Wan folder searched end to end by the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import adapter_checks as checks
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image
from tiny_wan import SIZE, WAN_DEFAULTS, tiny_wan_i2v_pipeline, tiny_wan_pipeline

from diffsearch.cli import main as cli_main
from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.sources import DEFAULTS_FILE, ModelLoadError, plan_model
from diffsearch.pipelines.wan import WanDenoiser, WanImageToVideoDenoiser
from diffsearch.run_folder import best_clip

STEPS, GUIDANCE = 4, 3.0
FRAMES, HEIGHT, WIDTH = SIZE["num_frames"], SIZE["height"], SIZE["width"]
LATENT = (4, 2, 4, 4)
"""(C, F', H/8, W/8) of a 5-frame 32x32 clip."""

_one_thread = checks.one_thread_per_module


def wan_reference(pipe, guidance: float = GUIDANCE, **call_options):
    """The pipeline's own 0 -> T loop from the same initial noise (its ``frames`` are the
    latents with ``output_type="latent"``)."""

    def reference(noise: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return pipe(prompts, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                    num_inference_steps=STEPS, guidance_scale=guidance, latents=noise.clone(),
                    output_type="latent", **call_options).frames

    return reference


def adapter(pipe, cls: type[WanDenoiser] = WanDenoiser, **options) -> WanDenoiser:
    return cls(pipe, **{"num_steps": STEPS, "guidance_scale": GUIDANCE, "compute_batch": 3,
                        **SIZE, **options})


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan")
    return {"wan2.1": tiny_wan_pipeline(root, name="wan21"),
            "wan2.2": tiny_wan_pipeline(root, two_stage=True, name="wan22"),
            "unipc": tiny_wan_pipeline(root, scheduler="unipc", name="wan21-unipc")}


@pytest.fixture(scope="module", params=["wan2.1", "wan2.2"])
def pipe(request, folders) -> WanPipeline:
    return checks.load_pipeline(WanPipeline, folders[request.param])


@pytest.fixture(scope="module")
def denoiser(pipe) -> WanDenoiser:
    return adapter(pipe)


# ---- text-to-video ------------------------------------------------------------------------------
def test_full_run_matches_the_pipeline(pipe, denoiser):
    assert denoiser.latent_shape == LATENT
    checks.check_matches_pipeline(denoiser, wan_reference(pipe))


def test_resume_from_an_intermediate_step_is_exact(denoiser):
    checks.check_resume_is_exact(denoiser, k=2)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_batching_does_not_change_any_bit(denoiser, eta):
    checks.check_batch_invariance(denoiser, eta=eta)


def test_stochastic_steps_use_each_candidates_own_generator(denoiser):
    checks.check_stochastic_steps(denoiser)


@pytest.mark.parametrize("step", [0, 2])
def test_step_noise_std_is_the_std_the_stochastic_step_adds(denoiser, step):
    checks.check_step_noise_std(denoiser, step)


def test_without_guidance_and_with_a_negative_prompt_it_matches_the_pipeline(pipe):
    checks.check_matches_pipeline(adapter(pipe, guidance_scale=1.0), wan_reference(pipe, 1.0))
    negative = adapter(pipe, negative_prompt="blurry, static")
    checks.check_matches_pipeline(negative, wan_reference(pipe, negative_prompt="blurry, static"))


def test_decode_gives_the_pipelines_frames(pipe, denoiser):
    """Wan's per-channel latent mean and std are undone before its VAE decodes; clips come
    back (B, F, 3, H, W) in [0, 1], each decoded alone."""
    noise = denoiser.initial_noise(checks.SEEDS)
    final = denoiser.denoise(noise, checks.conds_for(denoiser), 0, STEPS).latents
    frames = denoiser.decode(final)
    theirs = pipe(checks.PROMPTS, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise.clone(),
                  output_type="pt").frames
    assert frames.shape == theirs.shape == (4, FRAMES, 3, HEIGHT, WIDTH)
    torch.testing.assert_close(frames, theirs, atol=1e-4, rtol=1e-4)
    assert 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0
    assert torch.equal(denoiser.decode(final[1:2])[0], frames[1])


def test_renoise_is_the_flow_forward_process(denoiser):
    """From clean clips, renoising to step k is the scheduler's scale_noise at k's sigma."""
    clean = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    ours = denoiser.renoise(clean, STEPS, 1, gens)
    noise = torch.stack([torch.randn(LATENT, generator=torch.Generator().manual_seed(s))
                         for s in (3, 4)])
    schedule = denoiser._schedule
    theirs = schedule.scale_noise(clean, schedule.timesteps[1].expand(2), noise)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- Wan 2.2: two transformers ------------------------------------------------------------------
def test_wan22_switches_to_transformer_2_below_the_boundary(folders):
    """Steps at timesteps >= boundary_ratio * 1000 run ``transformer``, later ones
    ``transformer_2`` at ``guidance_scale_2``; the result is the pipeline's with the same
    second scale."""
    pipe = checks.load_pipeline(WanPipeline, folders["wan2.2"])
    denoiser = adapter(pipe, guidance_scale_2=1.5)
    calls = {"transformer": [], "transformer_2": []}
    hooks = [getattr(pipe, name).register_forward_pre_hook(
        lambda _, args, kwargs, name=name: calls[name].append(float(kwargs["timestep"][0])),
        with_kwargs=True) for name in calls]
    try:
        checks.check_matches_pipeline(denoiser, wan_reference(pipe, guidance_scale_2=1.5))
    finally:
        for hook in hooks:
            hook.remove()
    boundary = pipe.config.boundary_ratio * 1000
    timesteps = [float(t) for t in denoiser._schedule.timesteps]
    high = [t for t in timesteps if t >= boundary]
    assert 0 < len(high) < STEPS  # the tiny schedule crosses the boundary
    # each of ours and the pipeline's steps made a conditional and an unconditional call
    assert sorted(set(calls["transformer"])) == sorted(high)
    assert sorted(set(calls["transformer_2"])) == sorted(set(timesteps) - set(high))


def test_guidance_scale_2_needs_a_second_transformer(folders):
    pipe = checks.load_pipeline(WanPipeline, folders["wan2.1"])
    with pytest.raises(ValueError, match="guidance_scale_2 is for Wan 2.2"):
        adapter(pipe, guidance_scale_2=2.0)


def test_wan22_5b_takes_a_timestep_per_token(tmp_path):
    """``expand_timesteps`` (Wan 2.2 TI2V-5B's text-to-video): one timestep per latent token,
    the pipeline's bits exactly (one timestep per clip computes another modulation path, which
    differs in the last bits)."""
    pipe = checks.load_pipeline(WanPipeline, tiny_wan_pipeline(tmp_path), expand_timesteps=True)
    assert pipe.config.expand_timesteps
    denoiser = adapter(pipe, compute_batch=len(checks.PROMPTS))  # the pipeline's batch
    noise = denoiser.initial_noise(checks.SEEDS)
    ours = denoiser.denoise(noise, checks.conds_for(denoiser), 0, STEPS).latents
    assert torch.equal(ours, wan_reference(pipe)(noise, checks.PROMPTS))


# ---- the schedule and the sizes -----------------------------------------------------------------
@pytest.fixture(scope="module")
def unipc_pipe(folders) -> WanPipeline:
    """Wan 2.1 with the scheduler real Wan folders ship: UniPC in flow mode."""
    return checks.load_pipeline(WanPipeline, folders["unipc"])


def test_a_unipc_checkpoint_samples_flow_euler_at_its_flow_shift(unipc_pipe, folders):
    """flow-euler, the default, runs FlowMatchEulerDiscreteScheduler at UniPC's flow_shift:
    the pipeline with that scheduler swapped in."""
    denoiser = adapter(unipc_pipe)
    assert denoiser.sampler.name == "flow-euler"
    reference = checks.load_pipeline(WanPipeline, folders["unipc"])
    reference.scheduler = FlowMatchEulerDiscreteScheduler(
        shift=unipc_pipe.scheduler.config.flow_shift)
    checks.check_matches_pipeline(denoiser, wan_reference(reference))


def test_the_shipped_unipc_runs_zero_to_t_as_the_pipeline_does(unipc_pipe):
    pipe = unipc_pipe
    denoiser = adapter(pipe, sampler="flow-unipc")
    checks.check_matches_pipeline(denoiser, wan_reference(pipe))
    checks.check_resume_is_refused(denoiser, k=2)
    euler = adapter(pipe).denoise(denoiser.initial_noise([1]), checks.conds_for(denoiser)[:1],
                                  0, STEPS).latents
    unipc = denoiser.denoise(denoiser.initial_noise([1]), checks.conds_for(denoiser)[:1],
                             0, STEPS).latents
    assert not torch.allclose(euler, unipc, atol=1e-3)  # another solver, not a renamed Euler


def test_flow_unipc_is_refused_for_a_model_without_it(folders, pipe):
    with pytest.raises(ModelLoadError, match="sampler: flow-unipc runs the model's own "
                                             "UniPCMultistepScheduler; .* ships "
                                             "FlowMatchEulerDiscreteScheduler"):
        plan_model(str(folders["wan2.1"]), sampler="flow-unipc")
    with pytest.raises(ValueError, match="this model's scheduler is "
                                         "FlowMatchEulerDiscreteScheduler"):
        adapter(pipe, sampler="flow-unipc")


@pytest.mark.parametrize(("options", "message"), [
    ({"num_frames": 6}, "num_frames must be 4k\\+1"),
    ({"height": 40}, "height must be a multiple of 16"),
    ({"width": 24}, "width must be a multiple of 16"),
])
def test_sizes_the_vae_and_patches_cannot_take_are_refused(pipe, options, message):
    with pytest.raises(ValueError, match=message):
        adapter(pipe, **options)


@pytest.mark.parametrize(("defaults", "flags", "message"), [
    ({"num_frames": 8}, {}, "num_frames: wan models take 4k \\+ 1 frames"),
    ({}, {"height": 40}, "height: wan models take multiples of 16"),
])
def test_a_folder_with_a_bad_size_is_refused_from_its_configs(folders, tmp_path, defaults,
                                                              flags, message):
    """Checked before any weights load: the folder's configs, not the model, say so."""
    folder = tmp_path / "configs-only"
    folder.mkdir()
    source = folders["wan2.1"]
    for part in ("model_index.json", "vae/config.json", "transformer/config.json",
                 "scheduler/scheduler_config.json"):
        (folder / part).parent.mkdir(exist_ok=True)
        (folder / part).write_text((source / part).read_text())
    (folder / DEFAULTS_FILE).write_text(json.dumps({**WAN_DEFAULTS, **defaults}))
    with pytest.raises(ModelLoadError, match=message):
        plan_model(str(folder), **flags)


# ---- loading and the CLI ------------------------------------------------------------------------
def test_a_saved_folder_loads_as_wan_with_its_clip_size(folders):
    denoiser = load_denoiser(str(folders["wan2.2"]), device="cpu", compute_batch=2)
    assert isinstance(denoiser, WanDenoiser)
    assert denoiser.latent_shape == LATENT and denoiser.num_steps == WAN_DEFAULTS["num_steps"]
    assert denoiser.pipe.transformer_2 is not None


def generate(folder: Path, out: Path, *flags: str):
    return CliRunner().invoke(cli_main, [
        "generate", "a red circle moving from left to right", "--model", str(folder),
        "--verifier", "shapes-video-oracle", "--budget", "4x", "--batch-size", "2",
        "--executor", "local", "--threads", "1", "--quiet", "--out", str(out), *flags])


@pytest.mark.parametrize(("model", "flags"), [
    ("wan2.2", ["--strategy", "best-of-n"]),
    ("wan2.2", ["--strategy", "evosearch"]),
    ("unipc", ["--strategy", "best-of-n", "--sampler", "flow-unipc"]),
    ("unipc", ["--strategy", "ttsnap"]),
    ("unipc", ["--strategy", "particles"]),
    ("unipc", ["--strategy", "paths"]),
], ids=["best-of-n", "evosearch", "best-of-n-flow-unipc", "ttsnap", "particles", "paths"])
def test_the_cli_searches_a_wan_folder(folders, tmp_path, model, flags):
    """Every strategy on whole clips (the UniPC folder runs its default, flow-euler)."""
    out = tmp_path / "run"
    result = generate(folders[model], out, *flags)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["latent_shape"] == list(LATENT)  # the Wan adapter's clips
    assert 0 < results["nfe"] <= 4 * STEPS
    best = results["prompts"][0]["best"]
    assert "shapes-video-oracle" in best["scores"]
    with Image.open(out / best_clip(0)) as gif:
        assert gif.n_frames == FRAMES and gif.size == (WIDTH, HEIGHT)


def test_the_cli_refuses_a_resuming_strategy_with_flow_unipc(folders, tmp_path):
    result = generate(folders["unipc"], tmp_path / "run", "--strategy", "evosearch",
                      "--sampler", "flow-unipc")
    assert result.exit_code == 2
    assert "sampler: strategy evosearch continues states at later steps, which flow-unipc " \
        "cannot" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "results.json").exists()


# ---- image-to-video -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory) -> Path:
    return tiny_wan_i2v_pipeline(tmp_path_factory.mktemp("i2v"))


@pytest.fixture(scope="module")
def i2v_pipe(i2v_folder) -> WanImageToVideoPipeline:
    return checks.load_pipeline(WanImageToVideoPipeline, i2v_folder)


@pytest.fixture(scope="module")
def i2v(i2v_pipe) -> WanImageToVideoDenoiser:
    return adapter(i2v_pipe, WanImageToVideoDenoiser)


def first_frame(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_conds(denoiser: WanImageToVideoDenoiser, seeds: list[int]) -> list:
    return [denoiser.condition_on_image(denoiser.encode(p), first_frame(s))
            for p, s in zip(checks.PROMPTS, seeds, strict=True)]


def check_i2v_matches_the_pipeline(pipe: WanImageToVideoPipeline,
                                   denoiser: WanImageToVideoDenoiser) -> None:
    noise = denoiser.initial_noise(checks.SEEDS)
    ours = denoiser.denoise(noise, image_conds(denoiser, [7] * 4), 0, STEPS).latents
    theirs = pipe(image=first_frame(7), prompt=checks.PROMPTS, height=HEIGHT, width=WIDTH,
                  num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=noise.clone(), output_type="latent").frames
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_image_to_video_matches_the_pipeline_with_the_same_image(i2v_pipe, i2v):
    assert i2v.latent_shape == LATENT
    tensors = i2v.condition_on_image(i2v.encode("a red circle"), first_frame(7)).tensors
    assert {"image_condition", "image_embeds"} <= set(tensors)
    check_i2v_matches_the_pipeline(i2v_pipe, i2v)


def test_wan22_image_to_video_has_no_image_encoder_and_two_transformers(tmp_path):
    pipe = checks.load_pipeline(WanImageToVideoPipeline,
                                tiny_wan_i2v_pipeline(tmp_path, kind="wan2.2"))
    denoiser = adapter(pipe, WanImageToVideoDenoiser)
    tensors = denoiser.condition_on_image(denoiser.encode("a red circle"), first_frame(7)).tensors
    assert "image_embeds" not in tensors
    check_i2v_matches_the_pipeline(pipe, denoiser)


def test_ti2v_5b_pins_the_images_latent_frame(tmp_path):
    """Wan 2.2 TI2V-5B (expand_timesteps): the pipeline's clip from the same image; every state
    and x0 estimate starts with the image's latent frame, and resuming changes no bit."""
    pipe = checks.load_pipeline(WanImageToVideoPipeline,
                                tiny_wan_i2v_pipeline(tmp_path, kind="ti2v"))
    denoiser = adapter(pipe, WanImageToVideoDenoiser)
    assert denoiser.latent_shape == LATENT
    check_i2v_matches_the_pipeline(pipe, denoiser)
    conds = image_conds(denoiser, [1, 2, 3, 4])
    checks.check_batch_invariance(denoiser, conds=conds)
    noise = denoiser.initial_noise(checks.SEEDS)
    head = denoiser.denoise(noise, conds, 0, 2)
    first = torch.cat([c.tensors["image_condition"] for c in conds])
    assert first.shape == (4, LATENT[0], 1, *LATENT[2:])
    assert torch.equal(head.latents[:, :, :1], first) and torch.equal(head.x0[:, :, :1], first)
    assert not torch.equal(head.x0, head.latents)
    whole = denoiser.denoise(noise, conds, 0, STEPS).latents
    assert torch.equal(denoiser.denoise(head.latents, conds, 2, STEPS).latents, whole)


def test_an_image_to_video_folder_loads_as_wan_i2v(i2v_folder):
    denoiser = load_denoiser(str(i2v_folder), device="cpu", compute_batch=2)
    assert isinstance(denoiser, WanImageToVideoDenoiser) and denoiser.latent_shape == LATENT


def test_image_to_video_resumes_and_batches_clips_of_different_images_exactly(i2v):
    conds = image_conds(i2v, [1, 2, 3, 4])
    checks.check_batch_invariance(i2v, conds=conds)
    checks.check_batch_invariance(i2v, eta=1.0, conds=conds)
    noise = i2v.initial_noise(checks.SEEDS)
    whole = i2v.denoise(noise, conds, 0, STEPS).latents
    head = i2v.denoise(noise, conds, 0, 2).latents
    assert torch.equal(i2v.denoise(head, conds, 2, STEPS).latents, whole)
    other = image_conds(i2v, [5, 2, 3, 4])
    assert not torch.equal(i2v.denoise(noise, other, 0, STEPS).latents[0], whole[0])


def test_a_decoded_frame_conditions_like_its_saved_image(i2v):
    """Tree-of-Frames hands over the last decoded frame, a float tensor in [0, 1]."""
    picture = first_frame(9)
    as_tensor = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255
    cond = i2v.encode("a red circle")
    from_pil = i2v.condition_on_image(cond, picture).tensors
    from_tensor = i2v.condition_on_image(cond, as_tensor).tensors
    assert all(torch.equal(from_pil[k], from_tensor[k]) for k in from_pil)


def test_image_to_video_needs_a_first_frame(i2v, i2v_folder, tmp_path):
    """No strategy gives one yet: the CLI says so in one line."""
    with pytest.raises(ModelLoadError, match="needs a first frame for every candidate"):
        i2v.denoise(i2v.initial_noise([1]), [i2v.encode("a red circle")], 0, 1)
    result = generate(i2v_folder, tmp_path / "run", "--budget", "1x")
    assert result.exit_code == 2
    assert "error: model: image-to-video needs a first frame" in result.output
    assert "Traceback" not in result.output

"""The job-level generation settings (negative_prompt, width, height, sampler): validated per
family from config files before any model loads, refused per strategy where the sampler cannot
serve it, and applied by load_denoiser (the bundled model at sizes other than its 32x32)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import adapter_checks as checks
import pytest
import torch
from PIL import Image
from test_cli import assert_one_line_error, invoke

from diffsearch import run_folder
from diffsearch.api import run_job
from diffsearch.errors import DiffsearchError
from diffsearch.job import EXECUTION_FIELDS, Job
from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.samplers import SAMPLERS, sampler_names
from diffsearch.pipelines.sources import ModelLoadError, plan_model
from diffsearch.preflight import preflight
from diffsearch.runtime import RuntimeSpec, WorkerRuntime, register_runtime
from diffsearch.seeding import torch_generator
from diffsearch.store import RunStore
from engine_harness import create_fake_verifier

NEW_FIELDS = {"negative_prompt": "blurry", "width": 48, "height": 64, "sampler": "unipc"}


def config_only_model(tmp_path: Path, pipeline: str, *, vae_levels: int = 4,
                      patch_size: int | None = None, scheduler: str = "DDIMScheduler") -> Path:
    """A model folder with configs and no weights: planning reads nothing else, so a check
    that passes on it never loaded a model."""
    folder = tmp_path / pipeline
    for name, data in {
        "model_index.json": {"_class_name": pipeline},
        "vae/config.json": {"block_out_channels": [64] * vae_levels},
        "scheduler/scheduler_config.json": {"_class_name": scheduler},
        "transformer/config.json": {"patch_size": patch_size} if patch_size else None,
    }.items():
        if data is not None:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(data))
    return folder


# ---- the job ------------------------------------------------------------------------------------
def test_every_new_field_is_part_of_the_result_key():
    base = Job(prompts=["a"]).result_key()
    for field, value in NEW_FIELDS.items():
        assert field not in EXECUTION_FIELDS
        assert Job(prompts=["a"], **{field: value}).result_key() != base, field


@pytest.mark.parametrize(("fields", "message"), [
    ({"sampler": "dpm"}, "sampler: unknown sampler 'dpm'; choose one of: ddim, euler, "
                         "euler-ancestral, dpm++-2m, dpm++-2m-karras, unipc, flow-euler"),
    ({"negative_prompt": "  "}, "negative_prompt: is blank"),
    ({"width": 4}, "width: Input should be greater than or equal to 8"),
])
def test_bad_values_are_refused_when_the_job_is_read(tmp_path, fields, message):
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"prompts": ["a"], **fields}))
    assert_one_line_error(invoke("run", path, "--out", tmp_path / "out"), message)


# ---- what the family takes, from its configs ----------------------------------------------------
def test_the_default_sampler_is_the_models_own_scheduler(tmp_path):
    assert plan_model("shapes").sampler == "ddim"
    euler = config_only_model(tmp_path / "e", "StableDiffusionPipeline",
                              scheduler="EulerDiscreteScheduler")
    assert plan_model(str(euler)).sampler == "euler"
    pndm = config_only_model(tmp_path / "p", "StableDiffusionPipeline", scheduler="PNDMScheduler")
    assert plan_model(str(pndm)).sampler == "ddim"  # history-keeping: run as DDIM
    flux = config_only_model(tmp_path / "f", "FluxPipeline")
    assert plan_model(str(flux)).sampler == "flow-euler"


@pytest.mark.parametrize(("pipeline", "patch", "good", "bad", "message"), [
    ("StableDiffusionPipeline", None, 520, 516, "sd models take multiples of 8 (the VAE factor)"),
    ("StableDiffusionXLPipeline", None, 1016, 1020,
     "sdxl models take multiples of 8 (the VAE factor)"),
    ("FluxPipeline", None, 1008, 1000,
     "flux models take multiples of 16 (the VAE factor x 2 for its 2x2 packing)"),
    ("StableDiffusion3Pipeline", 2, 1008, 1000,
     "sd3 models take multiples of 16 (the VAE factor x the transformer's patch size)"),
])
def test_sizes_are_checked_against_the_family(tmp_path, pipeline, patch, good, bad, message):
    folder = str(config_only_model(tmp_path, pipeline, patch_size=patch))
    plan = plan_model(folder, width=good, height=good)
    assert (plan.width, plan.height) == (good, good)
    for field in ("width", "height"):
        expected = re.escape(f"{field}: {message}, got {bad}")
        with pytest.raises(ModelLoadError, match=f"^{expected}$"):
            plan_model(folder, **{field: bad})


def test_the_bundled_model_takes_multiples_of_its_vae_factor():
    assert plan_model("shapes", width=36, height=48).width == 36
    with pytest.raises(ModelLoadError, match="width: sd models take multiples of 4"):
        plan_model("shapes", width=50)


@pytest.mark.parametrize(("pipeline", "sampler"), [
    ("FluxPipeline", "ddim"), ("StableDiffusion3Pipeline", "dpm++-2m"),
    ("StableDiffusionPipeline", "flow-euler"), ("TextToVideoSDPipeline", "flow-euler"),
])
def test_a_sampler_of_another_family_is_refused(tmp_path, pipeline, sampler):
    folder = str(config_only_model(tmp_path, pipeline, patch_size=2))
    with pytest.raises(ModelLoadError, match=f"^sampler: {re.escape(repr(sampler))} is not "
                                             "for .* models; they take: "):
        plan_model(folder, sampler=sampler)


def test_negative_prompts_need_a_guidance_pass(tmp_path):
    flux = str(config_only_model(tmp_path, "FluxPipeline"))
    with pytest.raises(ModelLoadError, match="^negative_prompt: flux models take no negative"):
        plan_model(flux, negative_prompt="blurry")
    with pytest.raises(ModelLoadError, match="^negative_prompt: has no effect at "
                                             "guidance_scale 1;"):
        plan_model("shapes", negative_prompt="blurry", guidance_scale=1.0)
    assert plan_model("shapes", negative_prompt="blurry").negative_prompt == "blurry"


# ---- what the strategy needs of the sampler -----------------------------------------------------
RESUMING = ["ttsnap", "evosearch", "paths", "particles", "tree-of-frames", "linear-clips"]


@pytest.mark.parametrize("sampler", sampler_names(flow=False))
@pytest.mark.parametrize("strategy", ["best-of-n", "zero-order", *RESUMING])
def test_a_strategy_gets_a_sampler_that_can_serve_it(tmp_path, strategy, sampler):
    job = Job(prompts=["a red circle moving from left to right"], sampler=sampler,
              strategy={"name": strategy}, budget="40x",
              verifier="shapes-video" if "frames" in strategy or "clips" in strategy
              else "shapes-clip")
    refused = None
    if strategy in RESUMING and not SAMPLERS[sampler].resume:
        refused = (f"sampler: strategy {strategy} continues states at later steps, which "
                   f"{sampler} cannot (it keeps the model outputs of earlier steps")
    elif strategy == "evosearch" and sampler == "euler-ancestral":
        refused = ("sampler: strategy evosearch scores a kept state once and carries it on, "
                   "which euler-ancestral cannot (it draws noise at every step")
    if refused is None:
        assert preflight(job, tmp_path / "run", resume=False) == 20
        return
    with pytest.raises(DiffsearchError) as error:
        preflight(job, tmp_path / "run", resume=False)
    assert str(error.value).startswith(refused)
    assert "\n" not in str(error.value) and "; use " in str(error.value)


@pytest.mark.parametrize("strategy", ["best-of-n", "zero-order", *RESUMING])
def test_flow_euler_serves_every_strategy(tmp_path, strategy):
    flux = config_only_model(tmp_path, "FluxPipeline")
    video = "frames" in strategy or "clips" in strategy
    job = Job(prompts=["a red circle moving from left to right"], model=str(flux),
              strategy={"name": strategy}, budget="40x",
              verifier="shapes-video" if video else "shapes-clip")
    assert preflight(job, tmp_path / "run", resume=False) == 28


# ---- the command line ---------------------------------------------------------------------------
def test_generate_help_shows_the_settings():
    shown = invoke("generate", "--help").output
    for flag in ("--negative-prompt", "--width", "--height", "--sampler"):
        assert flag in shown
    assert "dpm++-2m-karras" in shown and "flow-euler" in shown


@pytest.mark.parametrize(("flags", "message"), [
    (["--sampler", "nope"], "--sampler: unknown sampler 'nope'"),
    (["--width", "50"], "width: sd models take multiples of 4"),
    (["--sampler", "dpm++-2m", "--strategy", "ttsnap"], "sampler: strategy ttsnap continues"),
])
def test_generate_refuses_bad_settings_before_loading(tmp_path, flags, message):
    result = invoke("generate", "a red circle", "--executor", "local", "--out",
                    tmp_path / "out", *flags)
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_a_negative_prompt_for_flux_is_refused_before_loading(tmp_path):
    """The folder has no weights: a load would fail another way."""
    flux = config_only_model(tmp_path, "FluxPipeline")
    result = invoke("generate", "a red circle", "--model", str(flux), "--negative-prompt",
                    "blurry", "--executor", "local", "--out", tmp_path / "out")
    assert_one_line_error(result, "negative_prompt: flux models take no negative prompt")


# ---- applied at load ----------------------------------------------------------------------------
@pytest.mark.parametrize(("width", "height"), [(48, 48), (64, 32)])
def test_the_bundled_model_runs_at_other_sizes(width, height):
    with checks.one_thread():
        denoiser = load_denoiser("shapes", num_steps=3, width=width, height=height,
                                 sampler="dpm++-2m-karras", negative_prompt="blurry")
        assert denoiser.latent_shape == (4, height // 4, width // 4)
        assert denoiser.sampler.name == "dpm++-2m-karras"
        assert denoiser.encode("a red circle").negative_prompt == "blurry"
        x = denoiser.initial_noise([1])
        final = denoiser.denoise(x, [denoiser.encode("a red circle")], 0, 3).latents
        assert denoiser.decode(final).shape == (1, 3, height, width)


def test_load_denoiser_applies_the_sampler_and_negative_prompt():
    with checks.one_thread():
        plain = load_denoiser("shapes", num_steps=3)
        ancestral = load_denoiser("shapes", num_steps=3, sampler="euler-ancestral",
                                  negative_prompt="blurry")
        x = plain.initial_noise([1])
        a = plain.denoise(x, [plain.encode("a red circle")], 0, 3).latents
        b = ancestral.denoise(x, [ancestral.encode("a red circle")], 0, 3,
                              generators=[torch_generator(1)]).latents
    assert plain.sampler.name == "ddim" and not ancestral.deterministic
    assert not torch.allclose(a, b)


def test_a_run_at_another_size_stores_and_shows_that_size(tmp_path):
    """Through the real engine, store and in-process executor: the store takes the latent shape
    the loaded model reports, and the best image has the asked size. (The runtime is built
    here from load_denoiser with the job's settings, as the worker's load will be.)"""
    settings = {"width": 48, "height": 32, "sampler": "dpm++-2m", "negative_prompt": "blurry"}
    job = Job(prompts=["a red circle"], model="shapes-at-48x32", verifier="redness",
              budget="2x", num_steps=3, threads=1, executor="local", **settings)
    with checks.one_thread():
        denoiser = load_denoiser("shapes", num_steps=3, **settings)
        register_runtime(WorkerRuntime(RuntimeSpec.from_job(job), denoiser,
                                       create_fake_verifier))
        result = run_job(job, tmp_path / "run")
    assert result.model.latent_shape == (4, 8, 12)
    assert RunStore.open(tmp_path / "run" / "store.zarr", writable=False).latent_shape == \
        (4, 8, 12)
    assert result.prompts[0].best is not None and result.failed_candidates == 0
    with Image.open(tmp_path / "run" / run_folder.best_image(0)) as image:
        assert image.size == (48, 32)

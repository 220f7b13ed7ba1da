"""load_denoiser: bundled model, local folders, the Hugging Face cache, defaults and errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import adapter_checks as checks
import huggingface_hub.constants
import pytest
import torch

from diffsearch.errors import DiffsearchError
from diffsearch.pipelines import loading, sources
from diffsearch.pipelines.flux import FluxDenoiser
from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.sd3 import StableDiffusion3Denoiser
from diffsearch.pipelines.sdxl import StableDiffusionXLDenoiser
from diffsearch.pipelines.sources import (
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from diffsearch.pipelines.stable_diffusion import StableDiffusionDenoiser
from tiny_pipelines import (
    SD_DEFAULTS,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with checks.one_thread():
        yield


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return tiny_sd_pipeline(tmp_path_factory.mktemp("models"))


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """HF_HUB_CACHE pointed at an empty folder (huggingface_hub reads it at import time, so
    the module constant is patched too)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_local_folder_loads_with_its_defaults_file(sd_folder):
    denoiser = load_denoiser(str(sd_folder))
    assert isinstance(denoiser, StableDiffusionDenoiser)
    assert denoiser.num_steps == SD_DEFAULTS["num_steps"]
    assert denoiser.guidance_scale == SD_DEFAULTS["guidance_scale"]
    assert denoiser.latent_shape == (4, 8, 8)
    assert denoiser.device.type == "cpu" and denoiser.dtype == torch.float32
    result = denoiser.denoise(denoiser.initial_noise([1]), [denoiser.encode("a red circle")],
                              0, denoiser.num_steps)
    assert torch.isfinite(result.latents).all()


def test_explicit_options_beat_the_defaults_file(sd_folder):
    denoiser = load_denoiser(str(sd_folder), num_steps=7, guidance_scale=1.5, compute_batch=5,
                             device="cpu", dtype="float32")
    assert (denoiser.num_steps, denoiser.guidance_scale, denoiser.compute_batch) == (7, 1.5, 5)


def test_without_a_defaults_file_the_family_defaults_apply(tmp_path):
    folder = tiny_sd_pipeline(tmp_path, defaults=None)
    denoiser = load_denoiser(str(folder))
    family = sources.FAMILIES["StableDiffusionPipeline"]
    assert (denoiser.num_steps, denoiser.guidance_scale) == (family.num_steps,
                                                             family.guidance_scale)


def test_defaults_file_can_set_the_image_size(tmp_path):
    folder = tiny_sd_pipeline(tmp_path, defaults={"num_steps": 2, "height": 24, "width": 32})
    denoiser = load_denoiser(str(folder))
    assert denoiser.latent_shape == (4, 12, 16)
    assert denoiser.decode(torch.zeros(1, 4, 12, 16)).shape == (1, 3, 24, 32)


def test_a_malformed_defaults_file_is_a_one_line_error(tmp_path):
    folder = tiny_sd_pipeline(tmp_path, defaults={"num_steps": "many"})
    with pytest.raises(ModelLoadError, match="num_steps must be a number"):
        load_denoiser(str(folder))


@pytest.mark.parametrize("build, family, adapter", [
    (tiny_sd_pipeline, "sd", StableDiffusionDenoiser),
    (tiny_sdxl_pipeline, "sdxl", StableDiffusionXLDenoiser),
    (tiny_sd3_pipeline, "sd3", StableDiffusion3Denoiser),
    (tiny_flux_pipeline, "flux", FluxDenoiser),
])
def test_family_is_detected_from_model_index(tmp_path, build, family, adapter):
    folder = build(tmp_path)
    assert sources.family_of(sources.resolve_model(str(folder))).name == family
    denoiser = load_denoiser(str(folder), num_steps=2)
    assert type(denoiser) is adapter
    assert denoiser.num_steps == 2
    x = denoiser.initial_noise([1])
    result = denoiser.denoise(x, [denoiser.encode("a red circle")], 0, 2)
    assert denoiser.decode(result.latents).shape == (1, 3, 16, 16)


def test_an_unsupported_pipeline_class_is_refused(tmp_path, sd_folder):
    folder = tmp_path / "other"
    shutil.copytree(sd_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match="KandinskyPipeline; diffsearch supports"):
        load_denoiser(str(folder))


def test_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_denoiser(str(tmp_path / "no" / "such" / "model"))


def test_a_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        load_denoiser(str(tmp_path))


def test_a_hub_id_missing_from_the_cache_says_how_to_get_it(empty_hub_cache):
    with pytest.raises(ModelNotFoundError) as raised:
        load_denoiser("some-org/some-model")
    message = str(raised.value)
    assert "\n" not in message
    assert "not in the local Hugging Face cache" in message
    assert "`hf download some-org/some-model`" in message and "--allow-download" in message
    # A user error for the CLI (one line, exit status 2) and a ValueError for library callers.
    assert isinstance(raised.value, DiffsearchError) and isinstance(raised.value, ValueError)


def test_a_hub_id_in_the_local_cache_loads_offline(empty_hub_cache, sd_folder):
    """A cache laid out the way huggingface_hub writes it (refs/main -> snapshots/<commit>)."""
    repo = empty_hub_cache / "models--tiny-org--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(sd_folder, repo / "snapshots" / commit)
    denoiser = load_denoiser("tiny-org/tiny-sd")
    assert isinstance(denoiser, StableDiffusionDenoiser)
    assert denoiser.num_steps == SD_DEFAULTS["num_steps"]  # its defaults file, from the cache


def test_the_bundled_model_loads_from_its_folder(monkeypatch, sd_folder):
    from diffsearch.pipelines import shapes

    monkeypatch.setattr(shapes, "bundled_model_path", lambda: sd_folder)
    assert isinstance(load_denoiser("shapes"), StableDiffusionDenoiser)


def test_a_missing_bundled_model_says_how_to_build_it(monkeypatch, tmp_path):
    from diffsearch.pipelines import shapes

    monkeypatch.setattr(shapes, "bundled_model_path", lambda: tmp_path / "weights" / "sd")
    with pytest.raises(ModelNotFoundError, match="train_sd"):
        load_denoiser("shapes")


def test_bad_dtype_and_unavailable_device_are_refused(sd_folder, monkeypatch):
    with pytest.raises(ModelLoadError, match="dtype 'float8' is not one of"):
        load_denoiser(str(sd_folder), dtype="float8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        load_denoiser(str(sd_folder), device="cuda")


def test_auto_device_and_dtype_follow_the_hardware(monkeypatch):
    family = sources.FAMILIES["FluxPipeline"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading._device(None).type == "cpu"
    assert loading._dtype(None, family, torch.device("cpu")) == torch.float32
    assert loading._dtype(None, family, torch.device("cuda")) == torch.bfloat16
    sd = sources.FAMILIES["StableDiffusionPipeline"]
    assert loading._dtype(None, sd, torch.device("cuda")) == torch.float16
    assert loading._dtype("float32", sd, torch.device("cuda")) == torch.float32


def test_without_xformers_cuda_pipelines_keep_pytorch_sdpa(sd_folder, monkeypatch):
    """xformers is an optional extra: when it cannot be imported nothing changes."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` fail
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    loading._choose_attention(pipe, torch.device("cuda"))
    processors = set(map(type, pipe.unet.attn_processors.values()))
    assert processors == {AttnProcessor2_0}

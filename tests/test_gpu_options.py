"""The accelerator options (compile, attention, offload, vae_tiling, vae_slicing): refused in one
line where a device cannot run them, and each really applied at load, on tiny SD pipelines.

What a CPU cannot show is left to ``benchmarks/gpu_check.py`` on a GPU: inductor's own kernels
(here a recording backend stands in, since inductor spends a minute building C++ kernels even
for the tiny UNet), xformers, and offload moving weights to and from a GPU.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import adapter_checks as checks
import pytest
import torch
import torch._dynamo
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from test_cli import assert_one_line_error, invoke, write_job

from diffsearch.errors import JobError
from diffsearch.job import EXECUTION_FIELDS, Job, job_from_mapping
from diffsearch.pipelines import loading
from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.sources import ModelLoadError
from diffsearch.pipelines.stable_diffusion import StableDiffusionDenoiser
from diffsearch.preflight import preflight
from tiny_pipelines import tiny_sd_pipeline

_one_thread = checks.one_thread_per_module
OPTIONS = {"compile": True, "attention": "sdpa", "offload": "model", "vae_tiling": True,
           "vae_slicing": True}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return tiny_sd_pipeline(tmp_path_factory.mktemp("models"))


@pytest.fixture
def no_xformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # `import xformers` fails, find_spec: None


def _job(**fields) -> Job:
    return job_from_mapping({"prompts": ["a red circle"], **fields}, source="job.yaml",
                            base_dir=Path("."))


def _run(denoiser, seeds=(1, 2, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    latents = denoiser.denoise(denoiser.initial_noise(list(seeds)),
                               checks.conds_for(denoiser, ["a red circle", "two blue squares",
                                                           "a red circle"]),
                               0, denoiser.num_steps).latents
    return latents, denoiser.decode(latents)


# ---- the job -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "message"), [
    ({"offload": "model", "device": "cpu"}, "offload: needs a CUDA device; device is 'cpu'"),
    ({"offload": "sequential", "device": "mps"}, "offload: needs a CUDA device"),
    ({"attention": "xformers", "device": "cpu"}, "attention: xformers needs a CUDA device"),
    ({"offload": "disk"}, "offload: Input should be 'none', 'model' or 'sequential'"),
    ({"attention": "flash"}, "attention: Input should be 'auto', 'sdpa' or 'xformers'"),
    ({"vae_tiling": "often"}, "vae_tiling: Input should be a valid boolean"),
])
def test_options_a_device_cannot_run_are_one_line_naming_the_field(fields, message):
    with pytest.raises(JobError) as raised:
        _job(**fields)
    assert str(raised.value).startswith(f"job.yaml: {message}")
    assert "\n" not in str(raised.value)


def test_cuda_or_an_unresolved_device_may_offload():
    for device in (None, "auto", "cuda", "cuda:1"):
        assert _job(offload="model", attention="xformers", device=device).offload == "model"


def test_every_option_is_part_of_the_results_identity():
    """They change float rounding (see the fields' docstrings), so a resume must match them."""
    base = _job().result_key()
    for field, value in OPTIONS.items():
        assert field not in EXECUTION_FIELDS
        assert _job(**{field: value}).result_key() != base, field


def test_xformers_not_installed_is_refused_before_the_model_is_looked_up(no_xformers, tmp_path):
    job = _job(attention="xformers", model=str(tmp_path / "no-such-model"))
    with pytest.raises(JobError, match=r"^attention: xformers is not installed \(pip install "
                                       r"'diffsearch\[xformers\]'\)"):
        preflight(job, tmp_path / "run", resume=False)


def test_the_cli_refuses_them_with_exit_status_2(no_xformers, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(invoke("run", write_job(tmp_path, "prompts: [a]\nattention: xformers\n"),
                                 "--out", out), "attention: xformers is not installed")
    assert_one_line_error(invoke("run", write_job(tmp_path, "prompts: [a]\ndevice: cpu\n"
                                                            "offload: model\n"), "--out", out),
                          "offload: needs a CUDA device")
    assert not out.exists()


# ---- the loader refuses before reading weights -------------------------------------------------
@pytest.fixture
def no_weights_read(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the options were checked")

    monkeypatch.setattr(loading, "_from_pretrained", refuse)


def test_offload_without_cuda_is_refused_before_loading(sd_folder, no_weights_read, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cpu", None):  # None resolves to the CPU here
        with pytest.raises(ModelLoadError, match=r"^offload: needs a CUDA device; the model "
                                                 r"would load on cpu$"):
            load_denoiser(str(sd_folder), device=device, offload="model")


def test_explicit_xformers_is_refused_before_loading(sd_folder, no_weights_read, no_xformers,
                                                     monkeypatch):
    with pytest.raises(ModelLoadError, match="^attention: xformers needs a CUDA device"):
        load_denoiser(str(sd_folder), device="cpu", attention="xformers")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nothing runs on it
    with pytest.raises(ModelLoadError, match="^attention: xformers is not installed"):
        load_denoiser(str(sd_folder), device="cuda", attention="xformers")
    with pytest.raises(ModelLoadError, match="^offload 'disk' is not one of none, model"):
        load_denoiser(str(sd_folder), device="cuda", offload="disk")


# ---- attention ---------------------------------------------------------------------------------
def test_sdpa_runs_diffusers_sdpa_processors_everywhere(sd_folder):
    denoiser = load_denoiser(str(sd_folder), attention="sdpa")
    for network in (denoiser.network, denoiser.pipe.vae):
        assert set(map(type, network.attn_processors.values())) == {AttnProcessor2_0}


class _XformersPipe:
    """What the attention choice touches of a pipeline: it records whether xformers was asked."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.enabled = error, False

    def enable_xformers_memory_efficient_attention(self) -> None:
        if self.error:
            raise self.error
        self.enabled = True


@pytest.fixture
def xformers_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))


@pytest.mark.usefixtures("xformers_importable")
@pytest.mark.parametrize(("attention", "enabled"), [("auto", True), ("xformers", True),
                                                    ("sdpa", False)])
def test_each_choice_asks_for_xformers_or_not(attention, enabled):
    pipe = _XformersPipe()
    loading._choose_attention(pipe, torch.device("cuda"), attention)
    assert pipe.enabled is enabled


@pytest.mark.usefixtures("xformers_importable")
def test_xformers_that_fails_falls_back_under_auto_and_is_an_error_when_asked_for():
    broken = RuntimeError("built for another CUDA")
    loading._choose_attention(_XformersPipe(broken), torch.device("cuda"), "auto")
    with pytest.raises(ModelLoadError, match=r"^attention: xformers could not be enabled "
                                             r"\(RuntimeError: built for another CUDA\)$"):
        loading._choose_attention(_XformersPipe(broken), torch.device("cuda"), "xformers")


# ---- compile -----------------------------------------------------------------------------------
@pytest.fixture
def recorded_graphs(monkeypatch):
    """A torch.compile backend that records what dynamo captured and runs it as traced."""
    graphs: list[torch.fx.GraphModule] = []

    def record(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    monkeypatch.setattr(loading, "COMPILE_BACKEND", record)
    yield graphs
    torch._dynamo.reset()


def test_compile_captures_the_network_once_and_keeps_its_results(sd_folder, recorded_graphs):
    eager = load_denoiser(str(sd_folder))
    compiled = load_denoiser(str(sd_folder), compile=True)
    assert compiled.network is compiled.pipe.unet  # compiled in place, still the pipeline's
    assert not recorded_graphs  # compiling is lazy: the first pass does it
    expected = _run(eager)
    first = _run(compiled)
    again = _run(compiled, seeds=(4, 5, 6))
    # The whole UNet in one graph: no graph breaks, and no recompiles for other timesteps,
    # prompts or seeds (every pass has compute_batch rows).
    assert len(recorded_graphs) == 1
    assert any(node.op == "call_function" for node in recorded_graphs[0].graph.nodes)
    for got, want in zip(first, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(again[0], first[0])


# ---- offload -----------------------------------------------------------------------------------
def _pipe(folder: Path) -> StableDiffusionPipeline:
    return checks.load_pipeline(StableDiffusionPipeline, folder, safety_checker=None,
                                requires_safety_checker=False)


def test_model_offload_runs_through_its_hooks_with_the_same_results(sd_folder):
    """The hooks run for real, computing on the CPU itself: what a CPU can check is that they
    are installed and the adapter computes through them unchanged (moving weights to a GPU is
    gpu_check's)."""
    expected = _run(StableDiffusionDenoiser(_pipe(sd_folder), num_steps=3, guidance_scale=3.0))
    pipe = _pipe(sd_folder)
    loading._offload(pipe, "model", torch.device("cpu"))
    assert all(hasattr(pipe.components[name], "_hf_hook")
               for name in ("text_encoder", "unet", "vae"))
    denoiser = StableDiffusionDenoiser(pipe, num_steps=3, guidance_scale=3.0)
    assert denoiser.device == pipe._execution_device == torch.device("cpu:0")
    for got, want in zip(_run(denoiser), expected):
        assert torch.equal(got, want)


def test_under_sequential_offload_tensors_go_to_the_execution_device(sd_folder):
    """Between layer moves the weights rest on "meta": the adapter must not take its device
    from them. (Running it needs a GPU: accelerate cannot offload the CPU onto itself.)"""
    pipe = _pipe(sd_folder)
    loading._offload(pipe, "sequential", torch.device("cpu"))
    assert pipe.unet.device.type == "meta"
    denoiser = StableDiffusionDenoiser(pipe, num_steps=3, guidance_scale=3.0)
    assert denoiser.device == pipe._execution_device == torch.device("cpu:0")
    assert denoiser.dtype == torch.float32


# ---- the VAE -----------------------------------------------------------------------------------
@pytest.fixture
def decoder_calls(monkeypatch):
    """Wraps a VAE's ``_decode`` and ``tiled_decode`` to record the latent shapes each saw."""
    def watch(vae) -> dict[str, list[tuple[int, ...]]]:
        calls: dict[str, list[tuple[int, ...]]] = {"_decode": [], "tiled_decode": []}
        for name, shapes in calls.items():
            original = getattr(vae, name)

            def spy(z, *args, _original=original, _shapes=shapes, **kwargs):
                _shapes.append(tuple(z.shape))
                return _original(z, *args, **kwargs)

            monkeypatch.setattr(vae, name, spy)
        return calls
    return watch


def test_vae_slicing_decodes_one_image_at_a_time(sd_folder, decoder_calls):
    latents, expected = _run(load_denoiser(str(sd_folder), compute_batch=4))
    denoiser = load_denoiser(str(sd_folder), compute_batch=4, vae_slicing=True)
    assert denoiser.pipe.vae.use_slicing and not denoiser.pipe.vae.use_tiling
    calls = decoder_calls(denoiser.pipe.vae)
    images = denoiser.decode(latents)
    assert calls["_decode"] == [(1, 4, 8, 8)] * 4  # one chunk of 4 rows (3 and a pad), one by one
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)  # a batch of one rounds anew


def test_vae_tiling_decodes_large_images_in_tiles(tmp_path, decoder_calls):
    """The tiny VAE's tile is 16x16 pixels (8x8 latents). Below it tiling changes nothing; above
    it the tiles are decoded apart and blended, so pixels differ from one whole decode (by a lot
    for a random VAE, whose receptive field is wider than its tile): only shape and range hold."""
    small = tiny_sd_pipeline(tmp_path, name="small")
    latents, expected = _run(load_denoiser(str(small)))
    tiled = load_denoiser(str(small), vae_tiling=True)
    assert tiled.pipe.vae.use_tiling
    assert torch.equal(tiled.decode(latents), expected)

    large = tiny_sd_pipeline(tmp_path, name="large")
    (large / "diffsearch_defaults.json").write_text(json.dumps(
        {"num_steps": 2, "height": 48, "width": 48}))
    latents, whole = _run(load_denoiser(str(large)))
    tiled = load_denoiser(str(large), vae_tiling=True)
    calls = decoder_calls(tiled.pipe.vae)
    images = tiled.decode(latents)
    assert calls["tiled_decode"] == [(8, 4, 24, 24)]  # the padded chunk of compute_batch rows
    assert images.shape == whole.shape == (3, 3, 48, 48)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert not torch.equal(images, whole)


def test_compile_takes_both_of_wan_2_2s_denoisers(tmp_path, monkeypatch):
    """Wan 2.2 denoises its low-noise steps with ``transformer_2``: compiling only the first
    network would leave half of the steps eager."""
    from tiny_wan import tiny_wan_pipeline

    compiled = []
    monkeypatch.setattr(loading, "_compile", compiled.append)
    folder = tiny_wan_pipeline(tmp_path, two_stage=True)
    denoiser = load_denoiser(str(folder), compile=True)
    assert compiled == [denoiser.pipe.transformer, denoiser.pipe.transformer_2]

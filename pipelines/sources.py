"""Where a model's files are and what its config says, read without loading any weights.

The driver calls :func:`plan_model` before it starts a cluster, so a wrong model name, a missing
folder or an uncached Hugging Face id is reported in well under a second, before anything slow
starts. This module imports neither torch nor diffusers for that reason; loading the pipeline
itself is :mod:`diffsearch.pipelines.loading`'s job.

Nothing is downloaded unless ``allow_download`` is set: a Hugging Face id is looked up in the
local cache only, so a job never stalls on the network by surprise.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from diffsearch.errors import DiffsearchError
from diffsearch.pipelines.samplers import (
    OWN_SCHEDULERS,
    SAMPLERS,
    default_sampler,
    sampler_names,
)

DEFAULTS_FILE = "diffsearch_defaults.json"
"""Optional file in a model folder with the recommended num_steps, guidance_scale, height, width."""
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
DOWNLOAD_HINT = "pass --allow-download (job field allow_download: true)"
"""How a user lets a run fetch a model from the Hub: the CLI flag and the job field."""


class ModelLoadError(DiffsearchError, ValueError):
    """A model cannot be loaded as asked; the one-line message says what to do."""


class ModelNotFoundError(ModelLoadError):
    """The model is neither the bundled one, a pipeline folder, nor in the local HF cache."""


class UnsupportedModelError(ModelLoadError):
    """The folder holds a diffusers pipeline of a family diffsearch has no adapter for."""


@dataclass(frozen=True)
class Family:
    """How to load and adapt one pipeline class, and diffusers' own sampling defaults for it."""

    name: str
    adapter: str
    """``module:Class`` of the adapter."""
    num_steps: int
    guidance_scale: float
    half_dtype: str
    """The dtype used on CUDA unless asked otherwise."""
    adapter_options: tuple[str, ...] = ()
    """Keys of the model's ``diffsearch_defaults.json`` passed on to the adapter (e.g. a video
    model's ``num_frames``)."""
    flow: bool = False
    """A flow-matching transformer (samplers: :func:`~diffsearch.pipelines.samplers
    .sampler_names` with ``flow=True``); otherwise a network on a discrete noise schedule (the
    UNets, and CogVideoX's transformer)."""
    negative_prompt: bool = True
    """Whether its classifier-free guidance takes a negative prompt (FLUX has no such pass)."""
    denoiser: str = "unet"
    """The pipeline component that denoises (its config has the ``patch_size``)."""
    samplers: tuple[str, ...] | None = None
    """The sampler names it takes (None: every sampler of its kind, flow or UNet)."""
    packing: int | None = 1
    """Latent pixels per side of one denoiser token: a size must be a multiple of the VAE factor
    times this. FLUX packs 2x2 latent pixels into a token; None: the denoiser's ``patch_size``
    (SD3)."""
    image_to_video: bool = False
    """Every candidate continues a first frame (the adapter's ``condition_on_image``): only
    strategies whose candidates are clip chunks continuing an image run on it (Tree-of-Frames
    with ``unit: chunk``), and those run on nothing else."""


FAMILIES = {
    "StableDiffusionPipeline": Family(
        "sd", "diffsearch.pipelines.stable_diffusion:StableDiffusionDenoiser",
        50, 7.5, "float16"),
    "StableDiffusionXLPipeline": Family(
        "sdxl", "diffsearch.pipelines.sdxl:StableDiffusionXLDenoiser", 50, 5.0, "float16"),
    "StableDiffusion3Pipeline": Family(
        "sd3", "diffsearch.pipelines.sd3:StableDiffusion3Denoiser", 28, 7.0, "bfloat16",
        flow=True, denoiser="transformer", packing=None),
    "FluxPipeline": Family(
        "flux", "diffsearch.pipelines.flux:FluxDenoiser", 28, 3.5, "bfloat16",
        flow=True, negative_prompt=False, denoiser="transformer", packing=2),
    "TextToVideoSDPipeline": Family(
        "video-sd", "diffsearch.pipelines.video:TextToVideoDenoiser", 50, 9.0, "float16",
        adapter_options=("num_frames",)),
    "WanPipeline": Family(
        "wan", "diffsearch.pipelines.wan:WanDenoiser", 50, 5.0, "bfloat16",
        adapter_options=("num_frames",), flow=True, denoiser="transformer", packing=None),
    "WanImageToVideoPipeline": Family(
        "wan-i2v", "diffsearch.pipelines.wan:WanImageToVideoDenoiser", 50, 5.0, "bfloat16",
        adapter_options=("num_frames",), flow=True, denoiser="transformer", packing=None,
        image_to_video=True),
    "LTXPipeline": Family(
        "ltx", "diffsearch.pipelines.ltx:LTXDenoiser", 50, 3.0, "bfloat16",
        adapter_options=("num_frames", "frame_rate"), flow=True, denoiser="transformer",
        packing=None),
    "CogVideoXPipeline": Family(
        "cogvideox", "diffsearch.pipelines.cogvideox:CogVideoXDenoiser", 50, 6.0, "bfloat16",
        adapter_options=("num_frames",), denoiser="transformer", samplers=("ddim",),
        packing=None),
    "PixArtSigmaPipeline": Family(
        "pixart-sigma", "diffsearch.pipelines.pixart:PixArtSigmaDenoiser", 20, 4.5, "float16",
        denoiser="transformer", packing=None),
    "SanaPipeline": Family(
        "sana", "diffsearch.pipelines.sana:SanaDenoiser", 20, 4.5, "bfloat16",
        flow=True, denoiser="transformer", packing=None),
    "HunyuanVideoPipeline": Family(
        "hunyuan-video", "diffsearch.pipelines.hunyuan_video:HunyuanVideoDenoiser", 50, 6.0,
        "bfloat16", adapter_options=("num_frames",), flow=True, negative_prompt=False,
        denoiser="transformer", packing=None),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: ``location`` is what ``from_pretrained`` is given."""

    name: str
    location: str
    index: dict
    defaults: dict
    hub: bool
    """A Hugging Face id (``location`` is the repo id) rather than a folder."""
    local_files_only: bool


def resolve_model(model: str, *, allow_download: bool = False) -> ModelSource:
    """Find ``model``'s files and read its ``model_index.json`` and defaults (no weights)."""
    if model == "shapes":
        from diffsearch.pipelines.shapes import bundled_model_path

        folder = bundled_model_path()
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the bundled 'shapes' model is not installed at {folder}; train it with "
                f"`python -m diffsearch.pipelines.shapes.train_sd --out {folder}`")
        return _local_source(model, folder)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"model folder {model!r} has no model_index.json: it is not "
                                     "a diffusers pipeline folder")
        return _local_source(model, path)
    if path.exists():
        raise ModelNotFoundError(f"model {model!r} is a file; give a diffusers pipeline folder "
                                 "or a Hugging Face id")
    if not _REPO_ID.match(model):
        raise ModelNotFoundError(f"model folder {model!r} does not exist")
    return _hub_source(model, allow_download)


def family_of(source: ModelSource) -> Family:
    class_name = source.index.get("_class_name")
    if class_name not in FAMILIES:
        raise UnsupportedModelError(
            f"model {source.name!r} is a {class_name or 'pipeline without _class_name'}; "
            f"diffsearch supports {', '.join(FAMILIES)}")
    return FAMILIES[class_name]


# ---- sources ----------------------------------------------------------------------------------
def _local_source(name: str, folder: Path) -> ModelSource:
    return ModelSource(name=name, location=str(folder),
                       index=_read_json(folder / "model_index.json"),
                       defaults=_read_defaults(folder / DEFAULTS_FILE), hub=False,
                       local_files_only=True)


def _hub_source(repo_id: str, allow_download: bool) -> ModelSource:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if not allow_download:
        # Read the cache straight from disk: huggingface_hub 2.x may still ask the Hub for
        # metadata under local_files_only=True unless HF_HUB_OFFLINE is set, and a job must
        # never touch the network unless asked to. The snapshot folder then loads like a path.
        cached_index = try_to_load_from_cache(repo_id, "model_index.json")
        if not isinstance(cached_index, str):
            raise ModelNotFoundError(
                f"model {repo_id!r} is not a folder and not in the local Hugging Face cache; "
                f"download it with `hf download {repo_id}` or {DOWNLOAD_HINT}")
        snapshot = _local_source(repo_id, Path(cached_index).parent)
        return ModelSource(name=repo_id, location=snapshot.location, index=snapshot.index,
                           defaults=snapshot.defaults, hub=True, local_files_only=True)
    try:
        index = hf_hub_download(repo_id, "model_index.json")
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise ModelNotFoundError(
            f"model {repo_id!r} could not be downloaded ({type(error).__name__}); check the "
            "network and that HF_HUB_OFFLINE is not set") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"model {repo_id!r} is not a folder and no Hugging Face "
                                 "repository of that name can be read (gated or private ones "
                                 "need `hf auth login`)") from None
    except EntryNotFoundError:
        raise UnsupportedModelError(f"model {repo_id!r} has no model_index.json: it is not a "
                                    "diffusers pipeline") from None
    cached_defaults = try_to_load_from_cache(repo_id, DEFAULTS_FILE)
    defaults = _read_defaults(Path(cached_defaults)) if isinstance(cached_defaults, str) else {}
    return ModelSource(name=repo_id, location=repo_id, index=_read_json(Path(index)),
                       defaults=defaults, hub=True, local_files_only=False)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _read_defaults(path: Path) -> dict:
    """The defaults file's known keys, type-checked (a missing file means no defaults)."""
    if not path.is_file():
        return {}
    data = _read_json(path)
    types = {"num_steps": int, "guidance_scale": (int, float), "height": int, "width": int,
             "num_frames": int, "frame_rate": (int, float)}
    for key, expected in types.items():
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, expected)):
            raise ModelLoadError(f"{path}: {key} must be a number, got {value!r}")
    return {key: data[key] for key in types if data.get(key) is not None}


@dataclass(frozen=True)
class ModelPlan:
    """What a model is and how it samples, known from its config files alone."""

    source: ModelSource
    family: Family
    num_steps: int
    guidance_scale: float
    sampler: str
    """A name of :data:`~diffsearch.pipelines.samplers.SAMPLERS`, the job's or the model's."""
    height: int | None = None
    """The image size asked for or the model's defaults file's (None: the pipeline's own)."""
    width: int | None = None
    negative_prompt: str | None = None


def plan_model(model: str, *, num_steps: int | None = None, guidance_scale: float | None = None,
               allow_download: bool = False, sampler: str | None = None,
               height: int | None = None, width: int | None = None,
               negative_prompt: str | None = None) -> ModelPlan:
    """Resolve ``model`` and its sampling settings: explicit options first, then the model's
    ``diffsearch_defaults.json``, then the family's diffusers defaults.

    The generation settings are checked against the family here, from config files only: a
    sampler of another family, a size the VAE (and the denoiser's patches) cannot take, a
    negative prompt the model has no use for. Each error names its field.
    """
    source = resolve_model(model, allow_download=allow_download)
    family = family_of(source)
    plan = ModelPlan(
        source=source, family=family,
        num_steps=int(_first(num_steps, source.defaults.get("num_steps"), family.num_steps)),
        guidance_scale=float(_first(guidance_scale, source.defaults.get("guidance_scale"),
                                    family.guidance_scale)),
        sampler=sampler or default_sampler(
            _component_config(source, "scheduler", "scheduler_config.json").get("_class_name"),
            flow=family.flow),
        height=height or source.defaults.get("height"),
        width=width or source.defaults.get("width"),
        negative_prompt=negative_prompt)
    _check_sampler(plan)
    _check_size(plan)
    _check_frames(plan)
    _check_negative_prompt(plan)
    return plan


def _first(*values: float | None) -> float:
    return next(v for v in values if v is not None)


# ---- generation settings against the family ---------------------------------------------------
def _component_config(source: ModelSource, component: str, name: str = "config.json") -> dict:
    """A component's config from a model folder ({} for a Hub model not downloaded yet: its
    adapter checks the same things when it loads)."""
    path = Path(source.location) / component / name
    return _read_json(path) if path.is_file() else {}


def _check_sampler(plan: ModelPlan) -> None:
    allowed = list(plan.family.samplers or sampler_names(flow=plan.family.flow))
    if plan.sampler not in SAMPLERS:
        raise ModelLoadError(f"sampler: unknown sampler {plan.sampler!r}; choose one of: "
                             f"{', '.join(allowed)}")
    if plan.sampler not in allowed:
        raise ModelLoadError(f"sampler: {plan.sampler!r} is not for {plan.family.name} models; "
                             f"they take: {', '.join(allowed)}")
    own = OWN_SCHEDULERS.get(plan.sampler)
    shipped = _component_config(plan.source, "scheduler", "scheduler_config.json").get(
        "_class_name")
    if own and shipped and shipped != own:
        raise ModelLoadError(f"sampler: {plan.sampler} runs the model's own {own}; "
                             f"{plan.source.name!r} ships {shipped}")


def size_multiple(source: ModelSource, family: Family) -> int | None:
    """What height and width must be multiples of: the VAE's downsampling factor (2 per VAE
    level after the first) times the latent pixels per denoiser token (:attr:`Family.packing`).
    None when the configs are not on disk."""
    factor = _vae_compression(_component_config(source, "vae"))[0]
    if factor is None:
        return None
    packing = family.packing
    if packing is None:
        packing = _component_config(source, family.denoiser).get("patch_size")
        if packing is None:
            return None
        if isinstance(packing, list):  # a video transformer's (frames, height, width) patch
            packing = max(packing[1:])
    return factor * int(packing)


def _vae_compression(vae: dict) -> tuple[int | None, int | None]:
    """(spatial, temporal) downsampling of a VAE config, as the VAE class computes it: the
    config's compression ratios where it states them (HunyuanVideo, LTX-Video 0.9.5), an
    LTX-Video VAE's patch sizes times 2 per spatio-temporal level, else 2 per level after the
    first. None: what the config does not state (temporal: an image VAE)."""
    if "scale_factor_spatial" in vae:  # AutoencoderKLWan names its factors
        return vae["scale_factor_spatial"], vae.get("scale_factor_temporal")
    if "spatio_temporal_scaling" in vae:  # AutoencoderKLLTXVideo
        levels = 2 ** sum(vae["spatio_temporal_scaling"])
        return (vae.get("spatial_compression_ratio") or vae.get("patch_size", 4) * levels,
                vae.get("temporal_compression_ratio") or vae.get("patch_size_t", 1) * levels)
    blocks = vae.get("block_out_channels") or vae.get("encoder_block_out_channels")  # DC-AE
    return (vae.get("spatial_compression_ratio") or (2 ** (len(blocks) - 1) if blocks else None),
            vae.get("temporal_compression_ratio"))


def _check_frames(plan: ModelPlan) -> None:
    """A clip model's frame count (its defaults file's ``num_frames``) against the VAE's
    temporal compression r: r k + 1 frames, the first frame encoded alone."""
    frames = plan.source.defaults.get("num_frames")
    if frames is None or "num_frames" not in plan.family.adapter_options:
        return
    temporal = _vae_compression(_component_config(plan.source, "vae"))[1]
    if temporal and (frames < 1 or (frames - 1) % temporal):
        raise ModelLoadError(f"num_frames: {plan.family.name} models take {temporal}k + 1 frames "
                             f"(the VAE's temporal compression is {temporal}), got {frames}")


def _check_size(plan: ModelPlan) -> None:
    multiple = size_multiple(plan.source, plan.family)
    if multiple is None:
        return
    why = {1: "the VAE factor", 2: "the VAE factor x 2 for its 2x2 packing"}.get(
        plan.family.packing or 0, "the VAE factor x the transformer's patch size")
    for field, value in (("height", plan.height), ("width", plan.width)):
        if value is not None and value % multiple:
            raise ModelLoadError(f"{field}: {plan.family.name} models take multiples of "
                                 f"{multiple} ({why}), got {value}")


def _check_negative_prompt(plan: ModelPlan) -> None:
    if plan.negative_prompt is None:
        return
    if not plan.family.negative_prompt:
        raise ModelLoadError(f"negative_prompt: {plan.family.name} models take no negative "
                             "prompt (no classifier-free guidance pass: the guidance scale is "
                             "an input of the model)")
    if plan.guidance_scale <= 1.0:
        raise ModelLoadError(f"negative_prompt: has no effect at guidance_scale "
                             f"{plan.guidance_scale:g}; classifier-free guidance, which uses "
                             "it, runs only above 1")


# ---- accelerator options: checked from their names, before any weights load --------------------
Attention = Literal["auto", "sdpa", "xformers"]
"""Attention kernels: ``auto`` is xformers on CUDA when it is installed, else PyTorch SDPA;
``sdpa`` keeps diffusers' default processors (``scaled_dot_product_attention``); ``xformers``
is xformers' memory-efficient attention or an error."""
Offload = Literal["none", "model", "sequential"]
"""Weights kept in CPU memory and moved to the GPU as needed: ``model`` moves one whole model
(text encoder, denoiser, VAE) at a time, ``sequential`` one layer at a time."""
NEEDS_CUDA = "needs a CUDA device"


def names_non_cuda_device(device: str | None) -> bool:
    """Whether ``device`` names a device other than CUDA. None and "auto" may turn out to be CUDA:
    the loader checks those once it has resolved them."""
    return device not in (None, "auto") and device.split(":")[0] != "cuda"


def xformers_missing() -> str | None:
    """Why ``attention: xformers`` cannot load here, or None. Looked up without importing it
    (xformers imports torch), so the driver can refuse the job before anything slow."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install 'diffsearch[xformers]'); or use sdpa"
    return None

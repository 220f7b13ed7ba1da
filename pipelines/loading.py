"""``load_denoiser``: a model name to a ready adapter (bundled, local folder, or Hugging Face id).

Loading is pure: every call reads the model again. The worker runtime keeps what it loaded, so a
cache here would only hold a second copy of the weights.

Nothing is downloaded unless ``allow_download`` is set: a Hugging Face id is looked up in the
local cache only (``local_files_only=True``), so a job never stalls on the network by surprise.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffsearch.errors import DiffsearchError
from diffsearch.pipelines.base import Denoiser

log = logging.getLogger(__name__)

DEFAULTS_FILE = "diffsearch_defaults.json"
"""Optional file in a model folder with the recommended num_steps, guidance_scale, height, width."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


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
    half_dtype: torch.dtype
    """The dtype used on CUDA unless asked otherwise."""
    adapter_options: tuple[str, ...] = ()
    """Keys of the model's ``diffsearch_defaults.json`` passed on to the adapter (e.g. a video
    model's ``num_frames``)."""


FAMILIES = {
    "StableDiffusionPipeline": Family(
        "sd", "diffsearch.pipelines.stable_diffusion:StableDiffusionDenoiser",
        50, 7.5, torch.float16),
    "StableDiffusionXLPipeline": Family(
        "sdxl", "diffsearch.pipelines.sdxl:StableDiffusionXLDenoiser", 50, 5.0, torch.float16),
    "StableDiffusion3Pipeline": Family(
        "sd3", "diffsearch.pipelines.sd3:StableDiffusion3Denoiser", 28, 7.0, torch.bfloat16),
    "FluxPipeline": Family(
        "flux", "diffsearch.pipelines.flux:FluxDenoiser", 28, 3.5, torch.bfloat16),
    "TextToVideoSDPipeline": Family(
        "video-sd", "diffsearch.pipelines.video:TextToVideoDenoiser", 50, 9.0, torch.float16,
        adapter_options=("num_frames",)),
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


def load_denoiser(
    model: str,
    *,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    device: str | None = None,
    dtype: str | None = None,
    compute_batch: int | None = None,
    allow_download: bool = False,
) -> Denoiser:
    """Load ``model`` ("shapes", a pipeline folder, or a Hugging Face id) as a Denoiser.

    Unset sampling options come from the model's ``diffsearch_defaults.json`` if it has one,
    else from the family's diffusers defaults. ``device`` None means CUDA when available;
    ``dtype`` None means float16 (SD, SDXL) or bfloat16 (SD3, FLUX) on CUDA, float32 on CPU.
    """
    source = resolve_model(model, allow_download=allow_download)
    family = family_of(source)
    torch_device = _device(device)
    torch_dtype = _dtype(dtype, family, torch_device)
    pipe = _from_pretrained(source, family, torch_dtype)
    pipe.to(torch_device)
    if family.name == "sdxl" and torch_dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16 (diffusers upcasts too)
    _choose_attention(pipe, torch_device)
    module, _, cls = family.adapter.partition(":")
    adapter = getattr(importlib.import_module(module), cls)
    return adapter(
        pipe,
        num_steps=int(_first(num_steps, source.defaults.get("num_steps"), family.num_steps)),
        guidance_scale=float(_first(guidance_scale, source.defaults.get("guidance_scale"),
                                    family.guidance_scale)),
        compute_batch=compute_batch,
        height=source.defaults.get("height"),
        width=source.defaults.get("width"),
        **{key: source.defaults[key] for key in family.adapter_options
           if key in source.defaults},
    )


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
                f"download it with `hf download {repo_id}` or pass --allow-download")
        snapshot = _local_source(repo_id, Path(cached_index).parent)
        return ModelSource(name=repo_id, location=snapshot.location, index=snapshot.index,
                           defaults=snapshot.defaults, hub=True, local_files_only=True)
    try:
        index = hf_hub_download(repo_id, "model_index.json")
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        if allow_download:
            raise ModelNotFoundError(
                f"model {repo_id!r} could not be downloaded ({type(error).__name__}); check the "
                "network and that HF_HUB_OFFLINE is not set") from None
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a folder and not in the local Hugging Face cache; "
            f"download it with `hf download {repo_id}` or pass --allow-download") from None
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
             "num_frames": int}
    for key, expected in types.items():
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, expected)):
            raise ModelLoadError(f"{path}: {key} must be a number, got {value!r}")
    return {key: data[key] for key in types if data.get(key) is not None}


# ---- options ----------------------------------------------------------------------------------
def _device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
                             ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for but torch sees no CUDA device; "
                             "use --device cpu")
    return resolved


def _dtype(dtype: str | None, family: Family, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return family.half_dtype if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _first(*values: float | None) -> float:
    """The first value that is set: explicit option, then the model's defaults file, then the
    family's."""
    return next(v for v in values if v is not None)


# ---- the pipeline -----------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No per-component loading bars: a search shows one progress bar, over its NFE budget,
    and workers load models in the background."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = [(m.enable_progress_bar, m.is_progress_bar_enabled())
               for m in (diffusers_logging, transformers_logging)]
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for enable, was_enabled in restore:
            if was_enabled:
                enable()


def _from_pretrained(source: ModelSource, family: Family, dtype: torch.dtype) -> Any:
    import diffusers

    pipeline_class = getattr(diffusers, source.index["_class_name"])
    extra: dict[str, Any] = {}
    if family.name == "sd":
        extra = {"safety_checker": None, "requires_safety_checker": False}
    try:
        with _quiet_loading():
            pipe = pipeline_class.from_pretrained(
                source.location, dtype=dtype, local_files_only=source.local_files_only, **extra)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        hint = (f"; download it with `hf download {source.name}` or pass --allow-download"
                if source.hub and source.local_files_only else "")
        raise ModelNotFoundError(f"model {source.name!r} is incomplete: {first_line}{hint}"
                                 ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _choose_attention(pipe: Any, device: torch.device) -> None:
    """xformers' memory-efficient attention on CUDA when installed, else PyTorch SDPA (the
    diffusers default). xformers is an optional extra: any failure falls back to SDPA."""
    if device.type != "cuda":
        return
    try:
        import xformers  # noqa: F401

        pipe.enable_xformers_memory_efficient_attention()
    except Exception as error:  # not installed, or built for another torch/CUDA
        log.info("xformers not used (%s: %s); using PyTorch SDPA", type(error).__name__, error)
    else:
        log.info("using xformers memory-efficient attention")

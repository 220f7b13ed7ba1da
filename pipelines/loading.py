"""``load_denoiser``: a model name to a ready adapter (bundled, local folder, or Hugging Face id).

Loading is pure: every call reads the model again. The worker runtime keeps what it loaded, so a
cache here would only hold a second copy of the weights. Finding the model's files and reading
its config (no weights, no torch) is :mod:`diffsearch.pipelines.sources`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from diffsearch.pipelines.base import Denoiser
from diffsearch.pipelines.sources import (
    DOWNLOAD_HINT,
    Family,
    ModelLoadError,
    ModelNotFoundError,
    ModelSource,
    plan_model,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    plan = plan_model(model, num_steps=num_steps, guidance_scale=guidance_scale,
                      allow_download=allow_download)
    source, family = plan.source, plan.family
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
        num_steps=plan.num_steps,
        guidance_scale=plan.guidance_scale,
        compute_batch=compute_batch,
        height=source.defaults.get("height"),
        width=source.defaults.get("width"),
        **{key: source.defaults[key] for key in family.adapter_options
           if key in source.defaults},
    )


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
        return DTYPES[family.half_dtype] if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]



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
        hint = (f"; download it with `hf download {source.name}` or {DOWNLOAD_HINT}"
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

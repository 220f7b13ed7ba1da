"""``load_denoiser``: a model name to a ready adapter (bundled, local folder, or Hugging Face id).

Loading is pure: every call reads the model again. The worker runtime keeps what it loaded
(:mod:`diffsearch.model_cache`), one :class:`LoadedModel` per model and device, with an adapter
per sampling setting over it. Finding the model's files and reading
its config (no weights, no torch) is :mod:`diffsearch.pipelines.sources`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, get_args

import torch

from diffsearch.pipelines.base import Denoiser
from diffsearch.pipelines.sources import (
    DOWNLOAD_HINT,
    NEEDS_CUDA,
    Attention,
    Family,
    ModelLoadError,
    ModelNotFoundError,
    ModelSource,
    Offload,
    plan_model,
    xformers_missing,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPILE_BACKEND: str | Callable[..., Any] = "inductor"
"""What ``compile`` hands torch.compile: torch's own default code generator. A test may swap in
a backend that records the captured graphs, since inductor takes a minute to build C++ kernels
for even a tiny UNet on a CPU."""


def load_denoiser(
    model: str,
    *,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    device: str | None = None,
    dtype: str | None = None,
    compute_batch: int | None = None,
    allow_download: bool = False,
    compile: bool = False,
    attention: Attention = "auto",
    offload: Offload = "none",
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    sampler: str | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
) -> Denoiser:
    """Load ``model`` ("shapes", a pipeline folder, or a Hugging Face id) as a Denoiser:
    :func:`load_model` and then :meth:`LoadedModel.adapter` (see both for the options)."""
    plan_model(model, num_steps=num_steps, guidance_scale=guidance_scale,
               allow_download=allow_download, sampler=sampler, height=height, width=width,
               negative_prompt=negative_prompt)  # the settings are refused before any weights load
    loaded = load_model(model, device=device, dtype=dtype, compute_batch=compute_batch,
                        allow_download=allow_download, compile=compile, attention=attention,
                        offload=offload, vae_tiling=vae_tiling, vae_slicing=vae_slicing)
    return loaded.adapter(num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler,
                          height=height, width=width, negative_prompt=negative_prompt)


@dataclass
class LoadedModel:
    """One loaded pipeline. Every sampling setting (steps, guidance, sampler, size, negative
    prompt) is an adapter over it (:meth:`adapter`), and adapters are cheap: they share the
    pipeline's weights, so a process serving many settings holds one copy of the model."""

    name: str
    pipe: Any
    family: Family
    compute_batch: int | None
    allow_download: bool
    adapter_options: dict[str, Any]
    """The model's ``diffsearch_defaults.json`` entries the family's adapter takes."""

    def adapter(self, *, num_steps: int | None = None, guidance_scale: float | None = None,
                sampler: str | None = None, height: int | None = None,
                width: int | None = None, negative_prompt: str | None = None) -> Denoiser:
        """A Denoiser with these sampling settings over the loaded weights.

        Unset options come from the model's ``diffsearch_defaults.json`` if it has one, else from
        the family's diffusers defaults. ``sampler`` is a name of
        :data:`~diffsearch.pipelines.samplers.SAMPLERS` (None: the model's own scheduler);
        ``height`` / ``width`` set the image size (the latent shape follows); ``negative_prompt``
        is the unconditional prompt of classifier-free guidance. All are checked against the
        model's family from its config files first, each error naming its field.
        """
        plan = plan_model(self.name, num_steps=num_steps, guidance_scale=guidance_scale,
                          allow_download=self.allow_download, sampler=sampler, height=height,
                          width=width, negative_prompt=negative_prompt)
        module, _, cls = self.family.adapter.partition(":")
        adapter = getattr(importlib.import_module(module), cls)
        return adapter(
            self.pipe,
            num_steps=plan.num_steps,
            guidance_scale=plan.guidance_scale,
            compute_batch=self.compute_batch,
            height=plan.height,
            width=plan.width,
            sampler=sampler,  # None: the adapter keeps the model's own scheduler, saying so
            negative_prompt=plan.negative_prompt,
            **self.adapter_options,
        )


def load_model(
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    compute_batch: int | None = None,
    allow_download: bool = False,
    compile: bool = False,
    attention: Attention = "auto",
    offload: Offload = "none",
    vae_tiling: bool = False,
    vae_slicing: bool = False,
) -> LoadedModel:
    """Load ``model``'s weights once, for adapters of any sampling settings.

    ``device`` None means CUDA when available; ``dtype`` None means float16 (SD, SDXL) or
    bfloat16 (SD3, FLUX) on CUDA, float32 on CPU. For large models and fast GPUs: ``compile``
    runs ``torch.compile`` on the denoiser network (its first forward pass compiles);
    ``attention`` picks the kernels (:data:`Attention`); ``offload`` keeps weights in CPU memory
    (:data:`Offload`); ``vae_tiling`` decodes images in overlapping tiles and ``vae_slicing``
    one image at a time, to bound the VAE's memory. Options a device cannot run are refused
    before any weights are read.
    """
    plan = plan_model(model, allow_download=allow_download)
    source, family = plan.source, plan.family
    torch_device = _device(device)
    torch_dtype = _dtype(dtype, family, torch_device)
    _check_accelerator_options(torch_device, attention, offload)
    pipe = _from_pretrained(source, family, torch_dtype)
    if offload == "none":
        pipe.to(torch_device)
    if family.name == "sdxl" and torch_dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16 (diffusers upcasts too)
    _choose_attention(pipe, torch_device, attention)
    _offload(pipe, offload, torch_device)
    _bound_vae_memory(pipe.vae, tiling=vae_tiling, slicing=vae_slicing)
    if compile:  # Wan 2.2 has a second denoiser for the low-noise steps
        second = getattr(pipe, f"{family.denoiser}_2", None)
        for network in (getattr(pipe, family.denoiser), second):
            if network is not None:
                _compile(network)
    return LoadedModel(
        name=model, pipe=pipe, family=family, compute_batch=compute_batch,
        allow_download=allow_download,
        adapter_options={key: source.defaults[key] for key in family.adapter_options
                         if key in source.defaults})


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


def _check_accelerator_options(device: torch.device, attention: str, offload: str) -> None:
    """Refuse what ``device`` cannot run while nothing is loaded yet (the job refuses a device
    it names; here "auto" has been resolved)."""
    if attention not in get_args(Attention):
        raise ModelLoadError(f"attention {attention!r} is not one of "
                             f"{', '.join(get_args(Attention))}")
    if offload not in get_args(Offload):
        raise ModelLoadError(f"offload {offload!r} is not one of {', '.join(get_args(Offload))}")
    if offload != "none" and device.type != "cuda":
        raise ModelLoadError(f"offload: {NEEDS_CUDA}; the model would load on {device}")
    if attention == "xformers":
        if device.type != "cuda":
            raise ModelLoadError(f"attention: xformers {NEEDS_CUDA}; the model would load on "
                                 f"{device}")
        if problem := xformers_missing():
            raise ModelLoadError(f"attention: {problem}")


def _choose_attention(pipe: Any, device: torch.device, attention: Attention = "auto") -> None:
    """Set the attention kernels (:data:`Attention`). A freshly loaded pipeline already runs
    diffusers' SDPA processors, so ``sdpa`` keeps them. ``auto`` tries xformers on CUDA and keeps
    SDPA on any failure (it is an optional extra); an explicit ``xformers`` that fails is an
    error instead, since the user asked for it."""
    if attention == "sdpa" or device.type != "cuda":
        return
    try:
        import xformers  # noqa: F401

        pipe.enable_xformers_memory_efficient_attention()
    except Exception as error:  # not installed, or built for another torch/CUDA
        if attention == "xformers":
            raise ModelLoadError(f"attention: xformers could not be enabled "
                                 f"({type(error).__name__}: {error})") from None
        log.info("xformers not used (%s: %s); using PyTorch SDPA", type(error).__name__, error)
    else:
        log.info("using xformers memory-efficient attention")


def _offload(pipe: Any, offload: Offload, device: torch.device) -> None:
    """Install diffusers' CPU offload hooks (:data:`Offload`), computing on ``device``.

    The adapters put their tensors on the pipeline's execution device, which these hooks
    define, not on the network's parameters' device (CPU, or "meta" between layer moves).
    """
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)


def _bound_vae_memory(vae: Any, *, tiling: bool, slicing: bool) -> None:
    """Tiling decodes a large image in overlapping tiles, blended at the seams (the pixels near
    them change); slicing decodes one image of a chunk at a time (the same image, rounded as a
    batch of one). Both trade speed for VAE memory."""
    for wanted, method, field in ((tiling, "enable_tiling", "vae_tiling"),
                                  (slicing, "enable_slicing", "vae_slicing")):
        if not wanted:
            continue
        if not hasattr(vae, method):
            raise ModelLoadError(f"{field}: the model's VAE ({type(vae).__name__}) has no "
                                 f"{method.removeprefix('enable_')}")
        getattr(vae, method)()


def _compile(network: torch.nn.Module) -> None:
    """torch.compile the network in place (it stays the pipeline's module, under any offload
    hooks). Every pass has the one shape of ``compute_batch`` rows, so it compiles once."""
    network.compile(backend=COMPILE_BACKEND)

"""What every diffusers adapter shares: prompt caching, the resumable loop, fixed-batch decoding.

The loop is written once here and each family fills in four hooks: how a prompt is encoded, how
a fresh scheduler is set up, how the network (with guidance) predicts, and how one sampler step
and the forward process look in that scheduler's state space.

A fresh scheduler is built for every ``denoise`` call and told where to begin
(``set_begin_index``): diffusers schedulers keep a step counter, so one shared instance would make
a call depend on the previous one (and on other threads of the same worker).

What a call may ask of the sampler (start past step 0, stochastic steps) follows its entry in
:data:`~diffsearch.pipelines.samplers.SAMPLERS`; a call it cannot serve is refused by name.

Negative prompts travel in the :class:`~diffsearch.pipelines.base.Conditioning`: the adapter's
``negative_prompt`` (the job's) is the default of :meth:`DiffusersDenoiser.encode`, which caches
by (prompt, negative prompt), so rows of one batch may carry different ones.
"""

from __future__ import annotations

import copy
import threading
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from diffsearch.pipelines.base import Conditioning, Denoiser, DenoiseResult, stack_generators_noise
from diffsearch.pipelines.samplers import SAMPLERS

NEGATIVE = "negative_"
"""Prefix of the unconditional counterpart of a conditioning tensor (``negative_prompt_embeds``)."""
PROMPT_CACHE_SIZE = 256
"""Encoded prompts kept per adapter. Bounded: a job may have thousands of prompts, and SDXL/SD3/
FLUX encodings are megabytes each on the accelerator."""


class DiffusersDenoiser(Denoiser):
    """Base of the adapters over a loaded diffusers pipeline (see module docstring)."""

    def __init__(
        self,
        pipe: Any,
        network: torch.nn.Module,
        *,
        num_steps: int,
        guidance_scale: float,
        latent_shape: tuple[int, int, int],
        sampler: str,
        compute_batch: int | None = None,
        negative_prompt: str | None = None,
    ) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if compute_batch is not None:
            if compute_batch < 1:
                raise ValueError(f"compute_batch must be >= 1, got {compute_batch}")
            self.compute_batch = compute_batch
        self.pipe = pipe
        self.network = network
        self.num_steps = num_steps
        self.guidance_scale = float(guidance_scale)
        self.latent_shape = latent_shape
        self.sampler = SAMPLERS[sampler]
        """The sampler's name and what it can do (resume, stochastic steps)."""
        self.deterministic = self.sampler.deterministic
        self.negative_prompt = negative_prompt
        """The default negative prompt (None: the family's own unconditional input)."""
        self.device = pipe._execution_device
        """Where tensors go: the network's device, or under CPU offload the GPU the hooks
        move each model to (its parameters then rest on the CPU or on "meta")."""
        self.dtype = network.dtype
        self._prompts: OrderedDict[tuple[str, str | None], Conditioning] = OrderedDict()
        self._prompts_lock = threading.Lock()  # Dask workers may run tasks in threads
        self._schedule = self._new_scheduler()
        """A scheduler never stepped: read-only source of timesteps and noise levels."""

    # ---- hooks ------------------------------------------------------------------------------
    @abstractmethod
    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        """The prompt's tensors (batch dimension 1) that :meth:`_predict_rows` takes per row,
        the unconditional ones from ``negative_prompt`` (None: the family's default)."""

    @abstractmethod
    def _new_scheduler(self) -> Any:
        """A scheduler of the pipeline's config with its timesteps set for ``num_steps``."""

    @abstractmethod
    def _predict_rows(self, x: torch.Tensor, t: torch.Tensor, **rows: torch.Tensor
                      ) -> torch.Tensor:
        """The guided network output for exactly ``compute_batch`` rows (float32)."""

    @abstractmethod
    def _model_input(self, scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The sampler state as the network sees it (e.g. Euler's input scaling)."""

    @abstractmethod
    def _step(self, scheduler: Any, step: int, x: torch.Tensor, output: torch.Tensor,
              eta: float, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampler step from ``step`` to ``step + 1``: (next state, x0 estimate)."""

    @abstractmethod
    def _to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the latent scaling (and shift) before the VAE decoder."""

    @abstractmethod
    def _noise_std(self, step: int) -> float:
        """The eta = 1 std of the stochastic step from ``step`` (0 <= step < num_steps)."""

    @abstractmethod
    def _forward_process(self, x: torch.Tensor, from_step: int, to_step: int,
                         noise: torch.Tensor) -> torch.Tensor:
        """A draw of q(x_to | x_from) built from the standard-normal ``noise``."""

    # ---- prompts ----------------------------------------------------------------------------
    def encode(self, prompt: str, negative_prompt: str | None = None) -> Conditioning:
        negative = self.negative_prompt if negative_prompt is None else negative_prompt
        key = (prompt, negative)
        with self._prompts_lock:
            if key in self._prompts:
                self._prompts.move_to_end(key)
                return self._prompts[key]
        with torch.no_grad():
            cond = Conditioning(prompt=prompt, tensors=self._encode(prompt, negative),
                                negative_prompt=negative)
        with self._prompts_lock:
            self._prompts[key] = cond
            if len(self._prompts) > PROMPT_CACHE_SIZE:
                self._prompts.popitem(last=False)
        return cond

    # ---- the loop ---------------------------------------------------------------------------
    def denoise(
        self,
        latents: torch.Tensor,
        conds: Sequence[Conditioning],
        start: int,
        end: int,
        *,
        eta: float = 0.0,
        generators: Sequence[torch.Generator] | None = None,
    ) -> DenoiseResult:
        self._check_call(latents, conds, start, end, eta, generators)
        if not self.deterministic and eta == 0:
            eta = 1.0  # an ancestral sampler's own step
        x = latents.to(self.device, torch.float32)
        x0 = x  # start == end takes no step: the state stands for its own estimate
        rows = {key: torch.cat([c.tensors[key] for c in conds]) for key in conds[0].tensors}
        # a copy of the never-stepped one: 0.3 ms against 2 ms for from_config, per unit
        scheduler = copy.deepcopy(self._schedule)
        rows_per_step = self.padded_rows(x.shape[0])
        if hasattr(scheduler, "set_begin_index"):  # stateful schedulers count their steps
            scheduler.set_begin_index(start)
        with torch.no_grad():
            for step in range(start, end):
                t = scheduler.timesteps[step]
                model_in = self._model_input(scheduler, x, t)
                output = self.forward_in_fixed_batches(
                    # called at once, inside this iteration: binding the current t is intended
                    lambda xs, *values: self._predict_rows(xs, t, **dict(zip(rows, values))),  # noqa: B023
                    model_in, *rows.values())
                noise = None
                if eta > 0:
                    assert generators is not None  # checked in _check_call
                    noise = stack_generators_noise(generators, self.latent_shape).to(self.device)
                x, x0 = self._step(scheduler, step, x, output, eta, noise)
        if end == self.num_steps:
            x0 = x  # the clean sample is its own estimate (Denoiser contract)
        return DenoiseResult(latents=x.to("cpu", torch.float32),
                             x0=x0.to("cpu", torch.float32), rows=(end - start) * rows_per_step)

    def _check_call(self, latents: torch.Tensor, conds: Sequence[Conditioning], start: int,
                    end: int, eta: float, generators: Sequence[torch.Generator] | None) -> None:
        if not 0 <= start <= end <= self.num_steps:
            raise ValueError(f"denoise needs 0 <= start <= end <= {self.num_steps}, "
                             f"got {start} -> {end}")
        if tuple(latents.shape[1:]) != tuple(self.latent_shape):  # also whole clips' (C, F, H, W)
            expected = ", ".join(map(str, self.latent_shape))
            raise ValueError(f"latents must have shape (B, {expected}), "
                             f"got {tuple(latents.shape)}")
        if latents.shape[0] == 0:
            raise ValueError("denoise needs at least one candidate")
        if len(conds) != latents.shape[0]:
            raise ValueError(f"got {len(conds)} conditionings for {latents.shape[0]} latents")
        self._check_sampler_call(latents, start, eta, generators)

    def _check_sampler_call(self, latents: torch.Tensor, start: int, eta: float,
                            generators: Sequence[torch.Generator] | None) -> None:
        """What the call asks of the sampler (eta, generators, a start past 0) it can do."""
        name = self.sampler.name
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if eta > 0 and not self.sampler.stochastic:
            stochastic = [n for n, s in SAMPLERS.items()
                          if s.stochastic and s.flow == self.sampler.flow]
            raise ValueError(f"sampler {name} has no stochastic step (eta {eta:g}); use "
                             f"{' or '.join(stochastic)}")
        if start > 0 and not self.sampler.resume:
            raise ValueError(f"sampler {name} keeps the model outputs of earlier steps, so it "
                             f"cannot start at step {start}: it runs 0 -> T in one call")
        noisy = eta > 0 or not self.deterministic
        if noisy and (generators is None or len(generators) != latents.shape[0]):
            why = "eta > 0" if eta > 0 else f"sampler {name} (noise at every step)"
            raise ValueError(f"{why} needs one generator per candidate")

    # ---- images -----------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae

        def decode_rows(rows: torch.Tensor) -> torch.Tensor:
            images = vae.decode(self._to_vae(rows).to(vae.dtype), return_dict=False)[0]
            return (images.float() / 2 + 0.5).clamp(0, 1)

        with torch.no_grad():
            images = self.forward_in_fixed_batches(decode_rows, latents.to(self.device))
        return images.to("cpu", torch.float32)

    # ---- noise levels -----------------------------------------------------------------------
    def step_noise_std(self, step: int) -> float:
        if not 0 <= step <= self.num_steps:
            raise ValueError(f"step must be in 0..{self.num_steps}, got {step}")
        return 0.0 if step == self.num_steps else self._noise_std(step)

    def renoise(
        self,
        latents: torch.Tensor,
        from_step: int,
        to_step: int,
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        if not 0 <= to_step < from_step <= self.num_steps:
            raise ValueError(f"renoise needs 0 <= to_step < from_step <= {self.num_steps}, "
                             f"got {from_step} -> {to_step}")
        if len(generators) != latents.shape[0]:
            raise ValueError(f"got {len(generators)} generators for {latents.shape[0]} latents")
        noise = stack_generators_noise(generators, self.latent_shape)
        return self._forward_process(latents.to("cpu", torch.float32), from_step, to_step, noise)

    # ---- classifier-free guidance -----------------------------------------------------------
    @property
    def do_guidance(self) -> bool:
        """Whether the unconditional branch runs (diffusers: ``guidance_scale > 1``)."""
        return self.guidance_scale > 1.0

    def _with_unconditional(self, x: torch.Tensor, rows: dict[str, torch.Tensor]
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rows stacked [unconditional; conditional] for one guided forward pass, pairing each
        tensor ``k`` with its ``negative_k``."""
        if not self.do_guidance:
            return x, rows
        paired = {key: torch.cat([rows[NEGATIVE + key], value])
                  for key, value in rows.items() if not key.startswith(NEGATIVE)}
        return torch.cat([x, x]), paired

    def _guided(self, both: torch.Tensor) -> torch.Tensor:
        """The guided prediction from :meth:`_with_unconditional`'s rows (as is without CFG)."""
        if not self.do_guidance:
            return both.float()
        uncond, cond = both.float().chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

"""The UNet families' samplers in the Denoiser's step convention: steps, stochastic steps, noise
levels. Each sampler name (:mod:`diffsearch.pipelines.samplers`) is a diffusers scheduler class
built from the model's own scheduler config (:func:`discrete_scheduler`), so the noise schedule,
prediction type and timestep spacing are the model's.

DDIM and Euler keep their state in different spaces, so the stochastic step and the forward
process are written per scheduler:

- DDIM (variance preserving): x_k = sqrt(a_k) x0 + sqrt(1 - a_k) eps, a_k = alpha-bar of step k.
  Stochastic steps are DDIM's own eta step; the noise is handed to ``DDIMScheduler.step`` as
  ``variance_noise`` so each candidate's draw comes from its own generator.
- Euler (variance exploding, k-diffusion): x_k = x0 + s_k eps, s_k = ``scheduler.sigmas[k]``.
  The scheduler's own step is deterministic; for eta > 0 the step is the ancestral one,
  x_{k+1} = x0 + sqrt(s_{k+1}^2 - u^2) eps_hat + u z with u = eta s_{k+1} sqrt(1 - s_{k+1}^2/s_k^2),
  which is DDIM's eta step rewritten in the Euler state space (the same posterior std).
- Euler ancestral is Euler's state space and schedule with the ancestral step at every step:
  eta = 1 unless the call asks for another eta, the noise from each candidate's generator. The
  formula above at eta = 1 is ``EulerAncestralDiscreteScheduler.step`` (checked against that
  pipeline in the tests); it is computed here so the noise comes from the caller's generators.

The multistep solvers (DPM-Solver++ 2M, with or without Karras sigmas, and UniPC) keep the model
outputs of earlier steps in the scheduler, so the latent alone is not their state: a call runs
them from step 0 with a fresh scheduler, exactly as the pipeline does; the adapter refuses a
call that starts later and a stochastic one (they have no stochastic step here). Carrying the
history in the stored latent was the alternative; it would make every stored state, perturbation
and re-noising know about solver internals, for strategies (resuming ones) that the one-step
samplers already serve exactly.

With no sampler named, a model keeps its own DDIM or Euler scheduler; any other scheduler in a
model folder (PNDM, DPM-Solver, ...) is run as DDIM with the same noise schedule, so that every
strategy can resume (:func:`discrete_scheduler`).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffsearch.pipelines.samplers import DISCRETE_DEFAULTS, sampler_names

log = logging.getLogger(__name__)

_DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerDiscreteScheduler, {}),
    "dpm++-2m": (DPMSolverMultistepScheduler, {**_DPM_2M, "use_karras_sigmas": False}),
    "dpm++-2m-karras": (DPMSolverMultistepScheduler, {**_DPM_2M, "use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {"predict_x0": True}),
}
"""Each UNet sampler's scheduler class and the config keys that make it that sampler; every
other key (betas, prediction type, spacing, offset) comes from the model's scheduler."""


def discrete_scheduler(scheduler: Any, sampler: str | None) -> tuple[str, type, dict]:
    """(sampler name, scheduler class, config) an adapter builds fresh schedulers from: the
    named ``sampler`` over the config of the model's ``scheduler``, or with None the model's
    own (see the module docstring)."""
    config = dict(scheduler.config)
    if sampler is None:
        sampler = DISCRETE_DEFAULTS.get(type(scheduler).__name__)
        if sampler is None:
            log.warning("%s keeps a history across steps and cannot resume from a latent; "
                        "using DDIMScheduler with the same noise schedule (name a sampler to "
                        "choose another)", type(scheduler).__name__)
            sampler = "ddim"
    if sampler not in SCHEDULERS:
        raise ValueError(f"sampler {sampler!r} is not for UNet models; they take: "
                         f"{', '.join(sampler_names(flow=False))}")
    cls, overrides = SCHEDULERS[sampler]
    built = dict(cls.from_config({**config, **overrides}).config)
    if "clip_sample" in built and "clip_sample" not in config:
        # A model that ships another scheduler (Euler for SDXL, DPM-Solver for PixArt) says
        # nothing of clipping; DDIM's default (True) would clip the x0 estimate to [-1, 1],
        # which suits pixels, not latents.
        built = dict(cls.from_config(built, clip_sample=False).config)
    return sampler, cls, built


class DiscreteHooks:
    """The sampler hooks of :class:`~diffsearch.pipelines._adapter.DiffusersDenoiser` for every
    adapter on a discrete noise schedule (SD, SDXL, PixArt-Sigma, CogVideoX), delegated to its
    :class:`DiscreteSampler` (``self._sampler``, built over the never-stepped ``self._schedule``).
    Listed before the adapter base: ``class X(DiscreteHooks, DiffusersDenoiser)``."""

    _sampler: DiscreteSampler
    _schedule: Any

    def _model_input(self, scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._sampler.model_input(scheduler, x, t)

    def _step(self, scheduler: Any, step: int, x: torch.Tensor, output: torch.Tensor,
              eta: float, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sampler.step(scheduler, step, x, output, eta, noise)

    def _noise_std(self, step: int) -> float:
        return self._sampler.step_noise_std(step)

    def _forward_process(self, x: torch.Tensor, from_step: int, to_step: int,
                         noise: torch.Tensor) -> torch.Tensor:
        return self._sampler.renoise(x, from_step, to_step, noise)

    def noise_scale(self) -> float:
        return float(self._schedule.init_noise_sigma)


class DiscreteSampler(ABC):
    """Step, stochastic step and forward process of one discrete-time scheduler.

    ``schedule`` is a scheduler with its timesteps set that is never stepped; the noise levels
    are read from it.
    """

    def __init__(self, schedule: Any) -> None:
        self.schedule = schedule

    @abstractmethod
    def model_input(self, scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The state scaled as the network expects it."""

    @abstractmethod
    def step(self, scheduler: Any, step: int, x: torch.Tensor, output: torch.Tensor, eta: float,
             noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(state at step + 1, x0 estimate at step)."""

    @abstractmethod
    def step_noise_std(self, step: int) -> float:
        """The eta = 1 noise std of the step from ``step`` to ``step + 1`` (step < T)."""

    @abstractmethod
    def renoise(self, x: torch.Tensor, from_step: int, to_step: int, noise: torch.Tensor
                ) -> torch.Tensor:
        """A draw of q(x_to | x_from) using the standard-normal ``noise``."""


class DDIMSampler(DiscreteSampler):
    def _alpha_bar(self, step: int) -> float:
        """alpha-bar of the state at ``step``: where the DDIM step ``step - 1`` lands."""
        s = self.schedule
        if step == 0:
            return float(s.alphas_cumprod[int(s.timesteps[0])])
        prev = int(s.timesteps[step - 1]) - s.config.num_train_timesteps // s.num_inference_steps
        return float(s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod)

    def model_input(self, scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x

    def step(self, scheduler: Any, step: int, x: torch.Tensor, output: torch.Tensor, eta: float,
             noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        t = scheduler.timesteps[step]
        if eta > 0:
            return tuple(scheduler.step(output, t, x, eta=eta, variance_noise=noise,
                                        return_dict=False))  # type: ignore[return-value]
        return tuple(scheduler.step(output, t, x, return_dict=False))  # type: ignore[return-value]

    def step_noise_std(self, step: int) -> float:
        # DDIM's step takes its input to be at its own timestep's alpha-bar; where the previous
        # step landed is the same level only for "leading"/"trailing" spacing ("linspace",
        # PixArt's, lands between timesteps), so the step's variance is read from the former.
        s = self.schedule
        a_t, a_next = float(s.alphas_cumprod[int(s.timesteps[step])]), self._alpha_bar(step + 1)
        return math.sqrt(max((1 - a_next) / (1 - a_t) * (1 - a_t / a_next), 0.0))

    def renoise(self, x: torch.Tensor, from_step: int, to_step: int, noise: torch.Tensor
                ) -> torch.Tensor:
        ratio = self._alpha_bar(to_step) / self._alpha_bar(from_step)
        return math.sqrt(ratio) * x + math.sqrt(max(1 - ratio, 0.0)) * noise


class EulerSampler(DiscreteSampler):
    def _sigma(self, step: int) -> float:
        return float(self.schedule.sigmas[step])

    def model_input(self, scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(x, t)

    def step(self, scheduler: Any, step: int, x: torch.Tensor, output: torch.Tensor, eta: float,
             noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        t = scheduler.timesteps[step]
        x_next, x0 = scheduler.step(output, t, x, return_dict=False)
        if eta > 0:
            sigma, sigma_next = self._sigma(step), self._sigma(step + 1)
            up = eta * self.step_noise_std(step)
            down = math.sqrt(max(sigma_next**2 - up**2, 0.0))
            x_next = x0 + down * (x - x0) / sigma + up * noise
        return x_next, x0

    def step_noise_std(self, step: int) -> float:
        sigma, sigma_next = self._sigma(step), self._sigma(step + 1)
        return sigma_next * math.sqrt(max(1 - sigma_next**2 / sigma**2, 0.0))

    def renoise(self, x: torch.Tensor, from_step: int, to_step: int, noise: torch.Tensor
                ) -> torch.Tensor:
        extra = self._sigma(to_step) ** 2 - self._sigma(from_step) ** 2
        return x + math.sqrt(max(extra, 0.0)) * noise


class MultistepSampler(DiscreteSampler):
    """DPM-Solver++ and UniPC: the scheduler's own steps, from step 0 in one call only (their
    earlier model outputs live in the scheduler). The x0 estimate is the data prediction the
    solver stored for the step it took."""

    def model_input(self, scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(x, t)

    def step(self, scheduler: Any, step: int, x: torch.Tensor, output: torch.Tensor, eta: float,
             noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x_next = scheduler.step(output, scheduler.timesteps[step], x, return_dict=False)[0]
        return x_next, scheduler.model_outputs[-1].float()

    def step_noise_std(self, step: int) -> float:
        raise ValueError(f"{type(self.schedule).__name__} has no stochastic step")

    def renoise(self, x: torch.Tensor, from_step: int, to_step: int, noise: torch.Tensor
                ) -> torch.Tensor:
        raise ValueError(f"{type(self.schedule).__name__} cannot restart at a step: it keeps "
                         "the model outputs of earlier steps")


_SAMPLER_CLASSES: dict[str, type[DiscreteSampler]] = {
    "ddim": DDIMSampler, "euler": EulerSampler, "euler-ancestral": EulerSampler,
    "dpm++-2m": MultistepSampler, "dpm++-2m-karras": MultistepSampler, "unipc": MultistepSampler,
}


def sampler_for(name: str, schedule: Any) -> DiscreteSampler:
    """The step math of sampler ``name`` over ``schedule`` (a scheduler never stepped).
    Euler ancestral is Euler's: the adapter asks every step for noise (``Denoiser
    .deterministic`` is False)."""
    return _SAMPLER_CLASSES[name](schedule)

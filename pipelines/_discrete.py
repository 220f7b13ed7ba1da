"""DDIM and Euler in the Denoiser's step convention: steps, stochastic steps, noise levels.

The two schedulers keep their state in different spaces, so the stochastic step and the forward
process are written per scheduler:

- DDIM (variance preserving): x_k = sqrt(a_k) x0 + sqrt(1 - a_k) eps, a_k = alpha-bar of step k.
  Stochastic steps are DDIM's own eta step; the noise is handed to ``DDIMScheduler.step`` as
  ``variance_noise`` so each candidate's draw comes from its own generator.
- Euler (variance exploding, k-diffusion): x_k = x0 + s_k eps, s_k = ``scheduler.sigmas[k]``.
  The scheduler's own step is deterministic; for eta > 0 the step is the ancestral one,
  x_{k+1} = x0 + sqrt(s_{k+1}^2 - u^2) eps_hat + u z with u = eta s_{k+1} sqrt(1 - s_{k+1}^2/s_k^2),
  which is DDIM's eta step rewritten in the Euler state space (the same posterior std).

Other schedulers (PNDM, DPM-Solver multistep, ...) keep a history of model outputs, so a latent
alone is not the sampler state and a run cannot resume from it; adapters swap them for DDIM
with the same noise schedule (:func:`resumable_scheduler`).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

log = logging.getLogger(__name__)


def resumable_scheduler(scheduler: Any) -> tuple[type, dict]:
    """The scheduler class and config an adapter builds fresh schedulers from."""
    config = dict(scheduler.config)
    if isinstance(scheduler, (DDIMScheduler, EulerDiscreteScheduler)):
        return type(scheduler), config
    log.warning("%s keeps a history across steps and cannot resume from a latent; using "
                "DDIMScheduler with the same noise schedule", type(scheduler).__name__)
    return DDIMScheduler, dict(DDIMScheduler.from_config(config).config)


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
        a_t, a_next = self._alpha_bar(step), self._alpha_bar(step + 1)
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


def sampler_for(schedule: Any) -> DiscreteSampler:
    if isinstance(schedule, DDIMScheduler):
        return DDIMSampler(schedule)
    if isinstance(schedule, EulerDiscreteScheduler):
        return EulerSampler(schedule)
    raise TypeError(f"no discrete sampler for {type(schedule).__name__}")

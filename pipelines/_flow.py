"""Flow-matching sampling shared by the SD3 and FLUX adapters.

Rectified flow: x_s = (1 - s) x0 + s eps for noise level s in [0, 1] (s = 1 pure noise); the
network predicts the velocity v = eps - x0, so x0_hat = x_s - s v and eps_hat = x_s + (1 - s) v.
The deterministic step is ``FlowMatchEulerDiscreteScheduler.step`` (x' = x + (s' - s) v).

Stochastic step (eta > 0), from s to s' < s: DDIM's eta step written for the flow path,

    x' = (1 - s') x0_hat + sqrt(s'^2 - u^2) eps_hat + u z,
    u  = eta * s' * sqrt(1 - (s' (1 - s) / (s (1 - s')))^2),

which keeps x' on the marginal (1 - s') x0 + s' eps. At eta = 1 u is the std of the posterior
q(x_s' | x_s, x0) of the forward process below (the DDPM step; flow matching is a
reparameterised Gaussian diffusion: x_s / (1 - s) = x0 + s / (1 - s) eps), at eta = 0 it is the
Euler step. ``step_noise_std`` is u at eta = 1.

Forward process from s to a noisier r > s (``renoise``): the Markov chain with those marginals,

    x_r = (1 - r) / (1 - s) x_s + sqrt(r^2 - ((1 - r) s / (1 - s))^2) z.

The scheduler's own ``stochastic_sampling`` option (a fresh, un-seeded draw each step) is turned
off: all randomness comes from the per-candidate generators. The sampler of these families is
this flow-matching Euler step (``flow-euler``), with the schedule the pipeline sets. A model
that ships a multistep flow solver may also run it, as ``flow-unipc`` (Wan: UniPC in flow mode)
or ``flow-dpm++`` (Sana: DPM-Solver++ in flow mode): its own scheduler and config, 0 -> T in one
call (its earlier model outputs live in the scheduler, as for the UNet families' multistep
samplers in :mod:`~diffsearch.pipelines._discrete`), its x0 estimate the data prediction it
stored for the step.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffsearch.pipelines._adapter import DiffusersDenoiser
from diffsearch.pipelines.samplers import OWN_SCHEDULERS, sampler_names

MULTISTEP: dict[str, type] = {"flow-unipc": UniPCMultistepScheduler,
                              "flow-dpm++": DPMSolverMultistepScheduler}
"""The multistep flow samplers' scheduler classes (see :data:`~diffsearch.pipelines.samplers
.OWN_SCHEDULERS`: each is built from the model's own config)."""


class FlowDenoiser(DiffusersDenoiser):
    """Base of the flow-matching adapters: the sampler math of the module docstring.

    Subclasses set the timesteps the way their pipeline does (:meth:`_set_timesteps`).
    """

    def __init__(self, pipe: Any, network: torch.nn.Module, *, sampler: str | None = None,
                 **options: Any) -> None:
        allowed = sampler_names(flow=True)
        sampler = sampler or allowed[0]
        if sampler not in allowed:
            raise ValueError(f"sampler {sampler!r} is not for flow-matching models; they take: "
                             f"{', '.join(allowed)}")
        shipped = type(pipe.scheduler).__name__
        if sampler in OWN_SCHEDULERS and shipped != OWN_SCHEDULERS[sampler]:
            raise ValueError(f"sampler {sampler} runs the model's own "
                             f"{OWN_SCHEDULERS[sampler]}; this model's scheduler is {shipped}")
        self._scheduler_config = self._euler_config(pipe.scheduler)
        super().__init__(pipe, network, sampler=sampler, **options)

    @staticmethod
    def _euler_config(scheduler: Any) -> dict[str, Any]:
        """The ``FlowMatchEulerDiscreteScheduler`` config of the model's ``scheduler``. A
        multistep solver in flow mode (Wan's UniPC, Sana's DPM-Solver++) names its shift
        ``flow_shift``; only that and the training length carry over (its other keys configure
        the solver)."""
        config = dict(scheduler.config)
        if "flow_shift" in config:
            config = {"num_train_timesteps": config["num_train_timesteps"],
                      "shift": config["flow_shift"]}
        return {**config, "stochastic_sampling": False}

    @abstractmethod
    def _set_timesteps(self, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        """Set ``num_steps`` timesteps (sigmas, shift) exactly as the pipeline's ``__call__``."""

    def _new_scheduler(self) -> Any:
        multistep = MULTISTEP.get(self.sampler.name)
        scheduler = (multistep.from_config(self.pipe.scheduler.config) if multistep else
                     FlowMatchEulerDiscreteScheduler.from_config(self._scheduler_config))
        self._set_timesteps(scheduler)
        if len(scheduler.timesteps) != self.num_steps:
            raise ValueError(f"the schedule has {len(scheduler.timesteps)} steps, "
                             f"expected {self.num_steps}")
        return scheduler

    def _sigma(self, step: int) -> float:
        return float(self._schedule.sigmas[step])

    def _model_input(self, scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x

    def _step(self, scheduler: Any, step: int, x: torch.Tensor, output: torch.Tensor,
              eta: float, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x_next = scheduler.step(output, scheduler.timesteps[step], x, return_dict=False)[0]
        if self.sampler.name in MULTISTEP:  # no stochastic step: refused in _check_call
            return x_next, scheduler.model_outputs[-1].float()
        sigma = self._sigma(step)
        x0 = x - sigma * output
        if eta > 0:
            sigma_next = self._sigma(step + 1)
            eps = x + (1 - sigma) * output
            up = eta * self._noise_std(step)
            x_next = ((1 - sigma_next) * x0 + math.sqrt(max(sigma_next**2 - up**2, 0.0)) * eps
                      + up * noise)
        return x_next, x0

    def _noise_std(self, step: int) -> float:
        sigma, sigma_next = self._sigma(step), self._sigma(step + 1)
        if sigma_next <= 0:
            return 0.0
        kept = sigma_next * (1 - sigma) / (sigma * (1 - sigma_next))
        return sigma_next * math.sqrt(max(1 - kept**2, 0.0))

    def _forward_process(self, x: torch.Tensor, from_step: int, to_step: int,
                         noise: torch.Tensor) -> torch.Tensor:
        s, r = self._sigma(from_step), self._sigma(to_step)
        keep = (1 - r) / (1 - s)
        return keep * x + math.sqrt(max(r**2 - (keep * s) ** 2, 0.0)) * noise

    def _to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        return latents / config.scaling_factor + (config.shift_factor or 0.0)

"""The samplers a job can name (``sampler``), what each can do, and which families take it.

Torch-free, so a job's ``sampler`` is checked against the model's family and the strategy before
anything loads (:mod:`diffsearch.preflight`). Each name is built from the model's own scheduler
config with a diffusers scheduler class (:mod:`diffsearch.pipelines._discrete` for the UNet
families, :mod:`diffsearch.pipelines._flow` for the flow-matching ones).

What a strategy may need of a sampler (``Strategy.sampler_needs``):

- ``resume``: a state stored at step k continues exactly in a later call (0 -> k -> T gives the
  bits of 0 -> T), or a run starts at k > 0 at all (img2img from a re-noised state). True for the
  one-step samplers, whose state is the latent alone. The multistep solvers (DPM++ 2M, UniPC)
  also keep the model outputs of earlier steps: the latent alone does not resume them, so they
  run 0 -> T in one call only, and strategies that resume or re-noise are refused with them.
- ``stochastic``: an ``eta > 0`` step whose noise comes from each candidate's own generator
  (DDIM's eta, Euler's ancestral step, the flow SDE step).
- ``deterministic``: with ``eta = 0`` a state always continues to the same image (EvoSearch
  scores a kept elite once and then carries it on). Not so for an ancestral sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SamplerNeed = Literal["resume", "stochastic", "deterministic"]


@dataclass(frozen=True)
class Sampler:
    """One sampler name and what it can do (see the module docstring)."""

    name: str
    flow: bool
    """For the flow-matching families (SD3, FLUX); otherwise for the UNet ones."""
    resume: bool
    stochastic: bool
    deterministic: bool
    summary: str

    def can(self, need: SamplerNeed) -> bool:
        return bool(getattr(self, need))


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", False, True, True, True, "DDIM; eta > 0 is DDIM's own stochastic step"),
    Sampler("euler", False, True, True, True,
            "Euler (k-diffusion); eta > 0 takes the ancestral step"),
    Sampler("euler-ancestral", False, True, True, False,
            "Euler ancestral: every step draws noise (eta 1 unless a strategy sets it)"),
    Sampler("dpm++-2m", False, False, False, True,
            "DPM-Solver++ 2M (multistep: runs 0 -> T in one call only)"),
    Sampler("dpm++-2m-karras", False, False, False, True,
            "DPM-Solver++ 2M on Karras sigmas (multistep: 0 -> T in one call only)"),
    Sampler("unipc", False, False, False, True,
            "UniPC (multistep: runs 0 -> T in one call only)"),
    Sampler("flow-euler", True, True, True, True,
            "flow-matching Euler; eta > 0 takes the flow SDE step"),
    Sampler("flow-unipc", True, False, False, True,
            "the model's own UniPC in flow mode, as Wan ships it (multistep: 0 -> T in one call "
            "only)"),
    Sampler("flow-dpm++", True, False, False, True,
            "the model's own DPM-Solver++ in flow mode, as Sana ships it (multistep: 0 -> T in "
            "one call only)"),
)}
"""Every sampler name, in the order help texts list them."""

OWN_SCHEDULERS = {"flow-unipc": "UniPCMultistepScheduler",
                  "flow-dpm++": "DPMSolverMultistepScheduler"}
"""Samplers that run the model's own scheduler, with its config as shipped: only a model whose
scheduler config names that class takes them."""

DISCRETE_DEFAULTS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler"}
"""The sampler a UNet model runs when the job names none: its own scheduler's. Any other class
(PNDM, DPM-Solver, ...) is run as DDIM with the same noise schedule, as before samplers could be
chosen (see :func:`default_sampler`)."""


def sampler_names(*, flow: bool | None = None) -> list[str]:
    """The sampler names, all of them or those of the flow (True) or UNet (False) families."""
    return [name for name, s in SAMPLERS.items() if flow is None or s.flow == flow]


def default_sampler(scheduler_class: str | None, *, flow: bool) -> str:
    """What a model runs with no ``sampler`` set, from its scheduler config's class name."""
    if flow:
        return "flow-euler"
    return DISCRETE_DEFAULTS.get(scheduler_class or "", "ddim")

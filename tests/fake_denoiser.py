"""A model-free Denoiser for testing strategies and the engine exactly and fast.

Each step pulls the latent a fixed fraction towards zero-mean "content" (its own sign pattern),
so trajectories depend on the starting noise, and the x0 estimate is an affine function of the
state. Its "network" runs through ``forward_in_fixed_batches`` like the real adapters', so it
reports the rows they would compute. It records every call so tests can check which steps were
asked and batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffsearch.pipelines.base import Conditioning, Denoiser, DenoiseResult, stack_generators_noise


@dataclass
class DenoiseCall:
    start: int
    end: int
    batch: int
    eta: float
    prompts: tuple[str, ...] = ()


class FakeDenoiser(Denoiser):
    def __init__(self, num_steps: int = 10, latent_shape: tuple[int, int, int] = (3, 4, 4),
                 compute_batch: int = 4) -> None:
        self.num_steps = num_steps
        self.latent_shape = latent_shape
        self.compute_batch = compute_batch
        self.calls: list[DenoiseCall] = []
        self.encoded: list[str] = []

    def encode(self, prompt: str, negative_prompt: str | None = None) -> Conditioning:
        """The prompt's length sets its content; a negative prompt pushes away from its own
        length's, as guidance would, so rows with other negative prompts differ."""
        self.encoded.append(prompt)
        bias = len(prompt) % 7 / 10.0
        if negative_prompt is not None:
            bias -= len(negative_prompt) % 5 / 20.0
        return Conditioning(prompt=prompt, tensors={"bias": torch.tensor([bias])},
                            negative_prompt=negative_prompt)

    def _alpha(self, step: int) -> float:
        return (step + 1) / self.num_steps

    def denoise(self, latents, conds, start, end, *, eta=0.0, generators=None) -> DenoiseResult:
        self.calls.append(DenoiseCall(start, end, latents.shape[0], eta,
                                      tuple(c.prompt for c in conds)))
        x = latents.clone()
        bias = torch.stack([c.tensors["bias"] for c in conds]).view(-1, 1, 1, 1)
        x0 = x
        for step in range(start, end):
            x0 = self.forward_in_fixed_batches(lambda xs, bs: torch.tanh(xs) + bs, x, bias)
            a = self._alpha(step)
            x = (1 - a) * x + a * x0
            if eta > 0:
                x = x + eta * self.step_noise_std(step) * stack_generators_noise(
                    generators, self.latent_shape)
        if end == self.num_steps:
            x0 = x
        return DenoiseResult(latents=x, x0=x0,
                             rows=(end - start) * self.padded_rows(latents.shape[0]))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Each row alone, so its pixels do not depend on the batch size, as with the real
        adapters' fixed-batch decoding: torch.sigmoid's CPU kernel rounds the elements past the
        last full SIMD block differently, and in one call over the batch where those fall
        depends on the number of rows."""
        images = torch.cat([torch.sigmoid(row) for row in latents[:, :3].split(1)])
        return torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")

    def step_noise_std(self, step: int) -> float:
        return 0.5 * (1 - step / self.num_steps)

    def renoise(self, latents, from_step, to_step, generators: Sequence[torch.Generator]):
        keep = (to_step + 1) / (from_step + 1)
        noise = stack_generators_noise(generators, self.latent_shape)
        return keep * latents + (1 - keep ** 2) ** 0.5 * noise

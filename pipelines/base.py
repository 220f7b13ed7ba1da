"""The one denoiser interface every strategy and worker uses.

Step indices (docs/strategies.md): k = 0 is pure noise, k = T (``num_steps``) is clean.
A latent "at step k" is the sampler state before the k-th denoising step has been taken, so
``denoise(x, start=k, end=m)`` runs the steps k, k+1, ..., m-1 (m - k NFEs per candidate).

Bit-exact reproducibility across batch sizes and worker counts: on CPU (and for some CUDA
kernels) a row's result depends on the shape of the batch it was computed in and on the number
of intra-op threads, but not on the other rows' contents. So every model forward pass goes
through :meth:`Denoiser.forward_in_fixed_batches`, which cuts the rows into chunks of exactly
``compute_batch`` rows (padding the last one), and workers pin the thread count. Task grouping
then never changes a single bit of any candidate.

One caveat, measured: a row's result can also depend on its position in the chunk when a
per-row width is not a multiple of the CPU's SIMD width (e.g. 16 floats with AVX-512: the last
rows fall into the scalar tail of the kernel). Real models' widths are multiples of 32; tiny
test models must keep theirs so too (see tests/tiny_pipelines.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from diffsearch.seeding import torch_generator


@dataclass
class Conditioning:
    """The encoded prompt for one prompt (batch dimension 1), opaque to callers.

    ``tensors`` holds whatever the family needs (prompt embeddings, pooled embeddings,
    negative-prompt embeddings, text ids, ...). Adapters concatenate per-candidate
    conditionings themselves, so one batch may mix prompts, and with them negative prompts.
    """

    prompt: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    negative_prompt: str | None = None
    """The negative prompt encoded in ``tensors`` (None: the adapter's default)."""


@dataclass
class DenoiseResult:
    latents: torch.Tensor
    """Sampler state at ``end``, float32, shape (B, C, H, W), on the CPU."""
    x0: torch.Tensor
    """The model's clean estimate (Tweedie / ``pred_original_sample``) at the last step taken,
    float32, (B, C, H, W), on the CPU. At ``end == num_steps`` it equals ``latents``."""
    rows: int
    """Rows the model computed for this call, padding included, counted like NFEs (one per row
    per network evaluation; classifier-free guidance's doubled rows count once): what the
    call really cost, where NFEs count only the candidates' own steps."""


class Denoiser(ABC):
    """A diffusion model seen as a resumable, batched, seeded sampler.

    Adapters own the denoising loop (diffusers has no general "resume from step k") and are built
    from a pipeline's own components. Subclasses set ``num_steps``, ``latent_shape``,
    ``compute_batch``, ``device`` and ``dtype`` in ``__init__``.
    """

    num_steps: int
    """T: the number of denoising steps of the schedule."""
    latent_shape: tuple[int, int, int]
    """(C, H, W) of one candidate's latent."""
    compute_batch: int = 8
    """Rows per model forward pass (see module docstring); CFG doubles the rows internally."""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    nfe_per_step: int = 1
    """NFEs one candidate costs per step. Classifier-free guidance counts once (its two branches
    share one forward pass; docs/strategies.md, "NFE accounting")."""
    deterministic: bool = True
    """Whether ``eta = 0`` steps draw no noise. False for an ancestral sampler: its every step
    draws noise, so every ``denoise`` call needs one generator per candidate."""
    continues_from_image: bool = False
    """Whether a candidate continues an image (image-to-video: each conditioning gets its first
    frame from ``condition_on_image(cond, image)``), so Tree-of-Frames can chain whole chunks."""

    # ---- prompts -------------------------------------------------------------------------
    @abstractmethod
    def encode(self, prompt: str, negative_prompt: str | None = None) -> Conditioning:
        """Encode one prompt and its unconditional counterpart: ``negative_prompt``, or with
        None the adapter's default (the job's). Adapters cache it."""

    # ---- noise ---------------------------------------------------------------------------
    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Initial latents x_0, one CPU generator per candidate, float32 on the CPU.

        Drawn on the CPU so a seed gives the same noise on every device and machine, then
        scaled by the scheduler's ``init_noise_sigma`` (see :meth:`noise_scale`).
        """
        rows = [
            torch.randn(self.latent_shape, generator=torch_generator(seed), dtype=torch.float32)
            for seed in seeds
        ]
        return torch.stack(rows) * self.noise_scale()

    def noise_scale(self) -> float:
        """The scheduler's ``init_noise_sigma`` (1 for DDIM and flow matching)."""
        return 1.0

    # ---- the loop ------------------------------------------------------------------------
    @abstractmethod
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
        """Run steps ``start .. end-1`` on a batch of candidates.

        ``conds[i]`` is candidate i's conditioning. ``eta > 0`` makes steps stochastic (DDIM eta,
        an SDE step for flow models); its noise is drawn from ``generators[i]`` (CPU generators,
        one per candidate), so candidate i's trajectory does not depend on its batch-mates.
        A sampler that is not :attr:`deterministic` draws from them at every step.
        """

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (clean or x0 estimates) to images: float32 (B, 3, H, W) in [0, 1], CPU."""

    # ---- noise levels, for mutation and re-noising ----------------------------------------
    @abstractmethod
    def step_noise_std(self, step: int) -> float:
        """The sampler's own stochastic step size at ``step`` (EvoSearch's sigma_k).

        For DDIM this is the eta = 1 posterior std of the step from ``step`` to ``step + 1``; for
        flow models the matching SDE step's std.
        """

    @abstractmethod
    def renoise(
        self,
        latents: torch.Tensor,
        from_step: int,
        to_step: int,
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        """Move latents from ``from_step`` back to the noisier ``to_step`` (< from_step) by the
        forward process q(x_to | x_from), one generator per candidate (search over paths)."""

    # ---- helpers for adapters --------------------------------------------------------------
    def forward_in_fixed_batches(
        self, fn: Callable[..., torch.Tensor], *row_tensors: torch.Tensor
    ) -> torch.Tensor:
        """Apply ``fn`` to the rows of ``row_tensors`` in chunks of exactly ``compute_batch``.

        The last chunk is padded by repeating its final row, and padding rows are dropped from
        the result. Every row is thus computed in a forward pass of the same shape, which makes
        its value independent of how many candidates were batched together.
        """
        n = row_tensors[0].shape[0]
        size = self.compute_batch
        outputs = []
        # A smaller shape for the last chunk (the "tail") would save its padding, but a row's
        # bits depend on the shape of the pass it is computed in: which rows end up in the tail
        # depends on how tasks were grouped (batch_size, workers, completion order), so a
        # tail shape would make a candidate's result depend on them. Every chunk keeps the one
        # shape; the engine packs work units to fill it instead.
        for begin in range(0, n, size):
            chunk = [t[begin : begin + size] for t in row_tensors]
            real = chunk[0].shape[0]
            if real < size:
                chunk = [_pad_rows(t, size) for t in chunk]
            outputs.append(fn(*chunk)[:real])
        return torch.cat(outputs)

    def padded_rows(self, n: int) -> int:
        """Rows :meth:`forward_in_fixed_batches` computes for ``n`` rows: whole chunks."""
        return -(-n // self.compute_batch) * self.compute_batch


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    missing = rows - tensor.shape[0]
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def stack_generators_noise(
    generators: Sequence[torch.Generator], shape: tuple[int, ...]
) -> torch.Tensor:
    """One standard-normal draw of ``shape`` per generator, stacked (float32, CPU)."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])

"""Every random draw in diffsearch comes from a seed derived from (job seed, prompt, candidate,
purpose), so a job gives the same images whatever the number of workers, the batch sizes or the
order in which tasks run. Nothing uses global RNG state.

torch is imported only by the functions that make torch generators: the strategies derive seeds
here, and a job's strategy options are checked when it is read, which must stay fast.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_SEED_BITS = 63


def derive_seed(job_seed: int, prompt: str, candidate: int, purpose: str) -> int:
    """A 63-bit seed that depends only on its arguments.

    The prompt enters by its text, not its position in the job, so reordering prompts in a job
    file does not change any prompt's results.
    """
    key = f"{job_seed}\x1f{prompt}\x1f{candidate}\x1f{purpose}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


def torch_generator(seed: int) -> torch.Generator:
    """A CPU generator: CPU draws are identical on every machine, CUDA draws are not."""
    import torch

    return torch.Generator(device="cpu").manual_seed(seed)


def numpy_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def task_generator(task_seed: int, purpose: str) -> torch.Generator:
    """A generator for one use of a task's randomness ("perturb", "steps", ...).

    Tasks carry one seed; each purpose gets an independent stream derived from it, so adding a
    perturbation never shifts the noise of the stochastic steps that follow it.
    """
    return torch_generator(derive_seed(task_seed, "", 0, purpose))

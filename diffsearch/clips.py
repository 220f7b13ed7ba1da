"""Frame-chain clips: a task scored on its clip (Tree-of-Frames) is the last frame of a chain
whose earlier frames are its finished ancestors. The driver says which latents those are
(:class:`~diffsearch.runtime.ClipFrames`); this decodes them with the task's own frame.

Kept out of the generic worker runtime: only frame-chain strategies make such tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffsearch.pipelines.base import Denoiser
from diffsearch.store import read_latent_rows

if TYPE_CHECKING:
    from diffsearch.runtime import WorkBatch


def assemble_clips(denoiser: Denoiser, batch: WorkBatch, frames: torch.Tensor
                   ) -> list[torch.Tensor]:
    """Each task's decoded clip (F, 3, H, W): its ancestors' frames, then its own (``frames``:
    the tasks' clean latents). Each distinct ancestor is read and decoded once."""
    tasks, plans = batch.tasks, batch.clips
    if len(plans) != len(tasks) or any(plan is None for plan in plans):
        raise ValueError("every task scored on its clip needs its earlier frames (ClipFrames)")
    last = denoiser.num_steps
    if any(task.end != last for task in tasks):
        raise ValueError(f"a task scored on its clip must end at the last step ({last})")
    refs = list(dict.fromkeys(ref for plan in plans for ref in plan.ancestors))  # type: ignore[union-attr]
    latents = torch.cat([read_latent_rows(batch.store_path, refs), frames]) if refs else frames
    decoded = denoiser.decode(latents)
    frame_of = dict(zip(refs, decoded))
    own = decoded[len(refs):]
    return [torch.stack([*(frame_of[ref] for ref in plan.ancestors), own[row]])  # type: ignore[union-attr]
            for row, plan in enumerate(plans)]

"""Chained clips: a clip made of candidates linked by ``parent`` (Tree-of-Frames and its linear
baseline), in one of two kinds of link:

* frames (:mod:`diffsearch.pipelines.frame_chain`): a candidate is one frame, img2img from its
  parent frame with an image model;
* chunks (image-to-video): a candidate is a whole clip of the model's F frames, from fresh noise,
  continuing the last frame of its parent chunk; the first chunk continues the user's image.

A task scored on its clip (:attr:`~diffsearch.tasks.ScoreOn.CLIP`) is the last candidate of its
chain; the driver says which latents its ancestors are (:class:`~diffsearch.runtime.ClipFrames`)
and this decodes them with the task's own. Where a chunk's first frame comes from is the
driver's :class:`~diffsearch.runtime.FirstFrame`, which this turns into the adapter's
conditioning (``condition_on_image``) on the worker, so the parent's pixels never travel.

Kept out of the generic worker runtime: only the clip strategies make such tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from diffsearch.errors import JobError
from diffsearch.pipelines.base import Conditioning, Denoiser
from diffsearch.store import LatentRef, read_latent_rows

if TYPE_CHECKING:
    from diffsearch.runtime import WorkBatch


def join_chain(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One clip (F, 3, H, W) from a chain's decoded candidates, oldest first: frames (3, H, W)
    are stacked; chunks (F_i, 3, H, W) are concatenated, each continuation without its first
    frame, which is the model's copy of the parent's last frame it was conditioned on."""
    if parts[0].ndim == 3:
        return torch.stack(list(parts))
    return torch.cat([parts[0], *(part[1:] for part in parts[1:])])


def assemble_clips(denoiser: Denoiser, batch: WorkBatch, finals: torch.Tensor
                   ) -> list[torch.Tensor]:
    """Each task's decoded clip (F, 3, H, W): its ancestors' frames or chunks, then its own
    (``finals``: the tasks' clean latents). Each distinct ancestor is read and decoded once."""
    tasks, plans = batch.tasks, batch.clips
    if len(plans) != len(tasks) or any(plan is None for plan in plans):
        raise ValueError("every task scored on its clip needs its earlier frames (ClipFrames)")
    last = denoiser.num_steps
    if any(task.end != last for task in tasks):
        raise ValueError(f"a task scored on its clip must end at the last step ({last})")
    refs = list(dict.fromkeys(ref for plan in plans for ref in plan.ancestors))  # type: ignore[union-attr]
    latents = torch.cat([read_latent_rows(batch.store_path, refs), finals]) if refs else finals
    decoded = denoiser.decode(latents)
    part_of = dict(zip(refs, decoded))
    own = decoded[len(refs):]
    return [join_chain([*(part_of[ref] for ref in plan.ancestors), own[row]])  # type: ignore[union-attr]
            for row, plan in enumerate(plans)]


def condition_on_first_frames(denoiser: Denoiser, batch: WorkBatch,
                              conds: list[Conditioning]) -> list[Conditioning]:
    """Each task's conditioning with its first frame (``batch.first_frames``): the last frame of
    its parent chunk, decoded from the parent's final latent (each parent once), or an image
    file; a task without one keeps its conditioning."""
    if not denoiser.continues_from_image:
        raise JobError("strategy.unit: chunk makes every candidate continue an image, which "
                       "this model cannot (it is not an image-to-video model); use unit: frame")
    sources = batch.first_frames
    parents = list(dict.fromkeys(source.parent for source in sources
                                 if source is not None and source.parent is not None))
    last_frames: dict[LatentRef, torch.Tensor] = {}
    if parents:
        clips = denoiser.decode(read_latent_rows(batch.store_path, parents))
        last_frames = dict(zip(parents, clips[:, -1]))
    images = {path: read_image(path)
              for path in dict.fromkeys(s.image for s in sources if s is not None and s.image)}
    condition = denoiser.condition_on_image  # type: ignore[attr-defined]
    return [cond if source is None else
            condition(cond, images[source.image] if source.parent is None
                      else last_frames[source.parent])
            for cond, source in zip(conds, sources)]


def read_image(path: str) -> Image.Image:
    """The RGB image at ``path``, or a one-line error naming the option that gave it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise JobError(f"strategy.image: cannot read an image from {path!r}: {error}") from None

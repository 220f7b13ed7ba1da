"""The layout of a run folder: every path a run writes or reads, in one place.

::

    RUN/
      job.json            the validated job (written once the pre-run checks pass)
      store.zarr/         every latent, score and lineage (diffsearch.store)
      best/pPPPPP.png     the best image per prompt, kept current while the run goes (clips:
                          its last frame, and the clip as pPPPPP.gif and pPPPPP.mp4); not
                          with images: none
      images/pPPPPP/      only with images: all: each candidate's final image, cCCCCC.png
                          (clips: also cCCCCC.gif and cCCCCC.mp4)
      results.json        the report, written when the run ends

Paths are relative to the run folder (results.json and the API hand them out that way), so a
run folder can be moved or copied as a whole. No torch here: the pre-run checks use it.
"""

from __future__ import annotations

JOB = "job.json"
STORE = "store.zarr"
IMAGES = "images"
BEST = "best"
RESULTS = "results.json"
CLIP_FORMATS = ("gif", "mp4")
"""The files a clip is written as, beside its last frame's PNG: GIF (shown by any browser or
viewer, no codec needed) and MP4 (H.264: what video tools, players and papers expect)."""


def prompt_images(prompt_index: int) -> str:
    """The folder of one prompt's candidate images."""
    return f"{IMAGES}/p{prompt_index:05d}"


def candidate_image(prompt_index: int, candidate: int) -> str:
    """A candidate's final image."""
    return f"{prompt_images(prompt_index)}/c{candidate:05d}.png"


def candidate_clip(prompt_index: int, candidate: int, fmt: str = "gif") -> str:
    """A clip's candidate's clip (a frame chain: it and its ancestors' frames) as ``fmt``, one
    of :data:`CLIP_FORMATS`."""
    return f"{prompt_images(prompt_index)}/c{candidate:05d}.{_clip_format(fmt)}"


def best_image(prompt_index: int) -> str:
    """A prompt's best image (the best so far while the run goes)."""
    return f"{BEST}/p{prompt_index:05d}.png"


def best_clip(prompt_index: int, fmt: str = "gif") -> str:
    """A frame-chain or video search's best clip as ``fmt`` (one of :data:`CLIP_FORMATS`),
    beside its best image."""
    return f"{BEST}/p{prompt_index:05d}.{_clip_format(fmt)}"


def _clip_format(fmt: str) -> str:
    if fmt not in CLIP_FORMATS:
        raise ValueError(f"a clip is written as one of {', '.join(CLIP_FORMATS)}, not {fmt!r}")
    return fmt

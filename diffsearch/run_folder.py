"""The layout of a run folder: every path a run writes or reads, in one place.

::

    RUN/
      job.json            the validated job (written once the pre-run checks pass)
      store.zarr/         every latent, score and lineage (diffsearch.store)
      best/pPPPPP.png     the best image per prompt, kept current while the run goes (clips:
                          its last frame, and the clip as pPPPPP.gif); not with images: none
      images/pPPPPP/      only with images: all: each candidate's final image, cCCCCC.png
                          (clips: also cCCCCC.gif)
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


def prompt_images(prompt_index: int) -> str:
    """The folder of one prompt's candidate images."""
    return f"{IMAGES}/p{prompt_index:05d}"


def candidate_image(prompt_index: int, candidate: int) -> str:
    """A candidate's final image."""
    return f"{prompt_images(prompt_index)}/c{candidate:05d}.png"


def candidate_clip(prompt_index: int, candidate: int) -> str:
    """A clip-scored candidate's clip (it and its ancestors' frames), as GIF."""
    return f"{prompt_images(prompt_index)}/c{candidate:05d}.gif"


def best_image(prompt_index: int) -> str:
    """A prompt's best image (the best so far while the run goes)."""
    return f"{BEST}/p{prompt_index:05d}.png"


def best_clip(prompt_index: int) -> str:
    """A frame-chain or video search's best clip, as GIF, beside its best image."""
    return f"{BEST}/p{prompt_index:05d}.gif"

"""A run's images: which ones it writes (the job's ``images``), and writing them off the
denoiser's path.

Workers never encode or write files. They return raw pixels (uint8, (H, W, 3) for an image,
(F, H, W, 3) for a clip) for the few rows the driver may need, and the driver's
:class:`ImageOutput` encodes PNG, GIF and MP4 in one background thread while the next forward
passes run. So the accelerator never waits on an encoder, the run folder has one writer, and with
``images: best`` a 10,000-prompt job writes 10,000 images, not one per candidate. No torch
here: ``diffsearch show`` reads which candidate a best image shows.

Files are written to a temporary name and renamed, so a kill or a reader (the service, a user's
file browser) never sees half an image. A best image records its candidate in a PNG text chunk;
a resumed run reads it back to know whether the image is still its prompt's best.

A clip is written in each of :data:`~diffsearch.run_folder.CLIP_FORMATS`: GIF through Pillow and
MP4 (H.264, yuv420p) through PyAV, whose wheels bundle FFmpeg and libx264, so no system ffmpeg
is needed. PyAV is imported only when a clip is written (``diffsearch show`` never pays for it).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from diffsearch import run_folder

CLIP_FRAME_MS = 400
"""How long each frame of a written clip is shown (GIF and MP4 alike: 2.5 frames a second)."""
MP4_CRF = 18
"""libx264's constant rate factor (lower is closer to the frames; its default is 23): 18 is
the usual "visually lossless" setting, for clips that are looked at closely."""
CANDIDATE_KEY = "diffsearch:candidate"
"""The PNG text chunk that names the candidate a best image shows."""
_QUEUE_SIZE = 64
"""Images waiting to be encoded: enough to absorb a burst, few enough to bound memory (the
driver waits when the encoder falls this far behind)."""


class ImageOutput:
    """The driver's image writer for one run folder.

    ``offer`` takes the pixels a work unit returned; ``update_best`` is called when a prompt's
    best answer changes and writes its image if its pixels came with this unit. What could not
    be written that way (a resumed run's best whose image was lost) is found by
    :meth:`stale_best` and rendered at the end.
    """

    def __init__(self, run_dir: Path, mode: str) -> None:
        self.run_dir = run_dir
        self.mode = mode
        self._fresh: dict[tuple[int, int], np.ndarray] = {}
        self._best_written: dict[int, int] = {}
        self._queue: queue.Queue[tuple[Path, list[Path], np.ndarray, int | None] | None] = \
            queue.Queue(_QUEUE_SIZE)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if mode != "none":
            self._thread = threading.Thread(target=self._encode_loop, name="image-writer",
                                            daemon=True)
            self._thread.start()

    @property
    def wants_all(self) -> bool:
        return self.mode == "all"

    @property
    def wants_best(self) -> bool:
        return self.mode != "none"

    # ---- from work units --------------------------------------------------------------------
    def offer(self, images: dict[tuple[int, int], np.ndarray]) -> None:
        """The pixels of one unit, by (prompt index, candidate); with ``images: all`` each is
        written as its candidate's image at once."""
        self._fresh = dict(images)
        if self.wants_all:
            for (index, candidate), values in images.items():
                self._put(run_folder.candidate_image(index, candidate),
                          [run_folder.candidate_clip(index, candidate, fmt)
                           for fmt in run_folder.CLIP_FORMATS], values, None)

    def update_best(self, prompt_index: int, candidate: int) -> None:
        """``candidate`` is now the best answer of its prompt: write its best image if this
        unit brought its pixels and it is not written already."""
        if not self.wants_best or self._best_written.get(prompt_index) == candidate:
            return
        values = self._fresh.get((prompt_index, candidate))
        if values is not None:
            self.write_best(prompt_index, candidate, values)

    def write_best(self, prompt_index: int, candidate: int, values: np.ndarray) -> None:
        self._best_written[prompt_index] = candidate
        self._put(run_folder.best_image(prompt_index),
                  [run_folder.best_clip(prompt_index, fmt) for fmt in run_folder.CLIP_FORMATS],
                  values, candidate)

    # ---- at the end -------------------------------------------------------------------------
    def stale_best(self, best: dict[int, int]) -> list[tuple[int, int]]:
        """(prompt index, candidate) of each best answer whose image this run did not write
        and whose file on disk (from an earlier run) shows another candidate or is missing."""
        if not self.wants_best:
            return []
        stale = []
        for index, candidate in best.items():
            if self._best_written.get(index) == candidate:
                continue
            if shown_candidate(self.run_dir / run_folder.best_image(index)) != candidate:
                stale.append((index, candidate))
        return stale

    def missing_candidates(self, finished: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """With ``images: all``, the finished final candidates whose image is not on disk (a
        resumed run's, lost to a kill before the encoder got to them)."""
        if not self.wants_all:
            return []
        return [(index, candidate) for index, candidate in finished
                if not (self.run_dir / run_folder.candidate_image(index, candidate)).exists()]

    def close(self) -> None:
        """Wait until every queued image is on disk; raise the encoder's error if it had one."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_encoder_error()

    # ---- the encoder thread -----------------------------------------------------------------
    def _put(self, image: str, clips: list[str], values: np.ndarray, best_of: int | None
             ) -> None:
        """Queue ``values`` as the PNG ``image`` (a clip: its last frame, and the clip files
        ``clips``, one per format), recording ``best_of`` as the candidate it shows when it is a
        best image."""
        self._raise_encoder_error()
        self._queue.put((self.run_dir / image, [self.run_dir / clip for clip in clips], values,
                         best_of))

    def _raise_encoder_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(f"cannot write images into {self.run_dir}: {error}") from error

    def _encode_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the driver raises the first error at its next put or close
            try:
                _write(*item)
            except Exception as error:
                self._error = error


def _write(path: Path, clip_paths: list[Path], values: np.ndarray, best_of: int | None
           ) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clip = values.ndim == 4
    info = PngImagePlugin.PngInfo()
    if best_of is not None:
        info.add_text(CANDIDATE_KEY, str(best_of))
    _atomic_save(path, lambda target: Image.fromarray(values[-1] if clip else values).save(
        target, format="PNG", pnginfo=info))
    if clip:
        for clip_path in clip_paths:
            encode = _CLIP_ENCODERS[clip_path.suffix.removeprefix(".")]
            _atomic_save(clip_path, lambda target, encode=encode: encode(values, target))


def save_gif(frames: np.ndarray, target: Path) -> None:
    """uint8 (F, H, W, 3) frames as a looping GIF, :data:`CLIP_FRAME_MS` per frame."""
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(target, format="GIF", save_all=True, append_images=images[1:],
                   duration=CLIP_FRAME_MS, loop=0)


def save_mp4(frames: np.ndarray, target: Path) -> None:
    """uint8 (F, H, W, 3) frames as an H.264 MP4 (yuv420p, the pixel format every player
    decodes) at 1000 / :data:`CLIP_FRAME_MS` frames a second, with its index at the front
    (``faststart``) so a browser plays it while it loads.

    yuv420p halves the colour resolution, so its width and height must be even: an odd one is
    padded by repeating the last column or row (the file is then one pixel wider or taller).
    Generated sizes are multiples of the VAE's factor, so this is rare.
    """
    import av

    height, width = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    with av.open(str(target), "w", format="mp4", options={"movflags": "+faststart"}) as output:
        stream = output.add_stream("libx264", rate=Fraction(1000, CLIP_FRAME_MS))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(MP4_CRF)}
        for frame in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode())  # flush the frames the encoder still holds


_CLIP_ENCODERS: dict[str, Callable[[np.ndarray, Path], None]] = {"gif": save_gif,
                                                                  "mp4": save_mp4}
"""The encoder of each of run_folder.CLIP_FORMATS."""


def _atomic_save(path: Path, save: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    save(temporary)
    os.replace(temporary, path)


def shown_candidate(path: Path) -> int | None:
    """The candidate a best image records, or None (missing, unreadable, not ours)."""
    try:
        with Image.open(path) as image:
            return int(image.text[CANDIDATE_KEY])  # type: ignore[attr-defined]
    except (OSError, KeyError, ValueError, AttributeError):
        return None

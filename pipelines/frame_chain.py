"""The frame-chain video adapter: a clip made frame by frame with a text-to-image model.

Frame 0 is an ordinary sample (noise at step 0 denoised to the last step T). Frame f >= 1 is
image-to-image from frame f - 1 at a chosen ``strength``: the previous frame's clean latent is
moved back to step ``k = round(T * (1 - strength))`` by the adapter's own forward process
(``Denoiser.renoise``) and denoised k -> T under frame f's prompt. That is exactly what diffusers'
img2img pipelines do, expressed as a :class:`~diffsearch.tasks.Task` with the parent frame
as ``source_candidate`` and a RENOISE perturbation, so it runs on any adapter (the bundled SD
model included) through the ordinary engine, store and batching; a frame costs ``T - k`` NFEs.
A fresh seed per frame task drives the re-noising, which is what makes sibling branches differ.

Per-frame prompts come from the clip prompt through :func:`frame_prompts`. Every schedule is
prefix-consistent: frame f's prompt depends on f only, not on the clip's length, so a partial
clip is judged like the start of the finished one (hierarchical prompting by depth) and a
video verifier needs only the clip prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffsearch.pipelines.shapes.motion import is_motion_prompt, motion_frame_prompts
from diffsearch.tasks import Perturbation, PerturbKind, ScoreOn, Task


def frame_prompts(clip_prompt: str, num_frames: int) -> list[str]:
    """The prompt of each frame: a shapes motion prompt moves its object along its path
    (``a red circle moving from left to right`` -> on the left, in the centre, on the right);
    any other prompt conditions every frame."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if is_motion_prompt(clip_prompt):
        return motion_frame_prompts(clip_prompt, num_frames)
    return [clip_prompt] * num_frames


def renoise_step(num_steps: int, strength: float) -> int:
    """k = round(T * (1 - strength)), half up: the step a frame's img2img starts from."""
    return int(num_steps * (1.0 - strength) + 0.5)


@dataclass(frozen=True)
class FrameChain:
    """How one clip is chained: its length, the img2img strength and each frame's prompt."""

    num_frames: int
    strength: float
    frame_prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be at least 2 (one frame is an image: use "
                             f"best-of-n), got {self.num_frames}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if len(self.frame_prompts) != self.num_frames:
            raise ValueError(f"{len(self.frame_prompts)} frame prompts for "
                             f"{self.num_frames} frames")

    @classmethod
    def for_prompt(cls, clip_prompt: str, num_frames: int, strength: float) -> FrameChain:
        """The chain of a clip prompt, its frame prompts from :func:`frame_prompts`."""
        # at least one prompt, so that a bad num_frames is reported by __post_init__ by name
        return cls(num_frames, strength, tuple(frame_prompts(clip_prompt, max(num_frames, 1))))

    def start_step(self, num_steps: int) -> int:
        """The step frames f >= 1 restart from; refuses a strength that leaves no step."""
        k = renoise_step(num_steps, self.strength)
        if k >= num_steps:
            raise ValueError(f"strength {self.strength} leaves no denoising step of "
                             f"{num_steps} (k = {k}); raise it")
        return k

    def frame_nfe(self, frame: int, num_steps: int) -> int:
        """NFEs of one candidate of ``frame``: T for frame 0, T - k after it."""
        return num_steps if frame == 0 else num_steps - self.start_step(num_steps)

    def clip_nfe(self, num_steps: int) -> int:
        """NFEs of one whole clip."""
        return sum(self.frame_nfe(f, num_steps) for f in range(self.num_frames))

    def first_frame_task(
        self, *, prompt_index: int, candidate: int, seed: int, num_steps: int,
        score_on: ScoreOn, verifier: str | None = None,
    ) -> Task:
        """Frame 0 from the noise of ``seed``, denoised 0 -> T."""
        return Task(prompt_index=prompt_index, prompt=self.frame_prompts[0],
                    candidate=candidate, seed=seed, start=0, end=num_steps,
                    score_on=score_on, verifier=verifier)

    def next_frame_task(
        self, *, prompt_index: int, frame: int, candidate: int, parent: int, seed: int,
        num_steps: int, score_on: ScoreOn,
    ) -> Task:
        """Frame ``frame`` >= 1 as img2img from ``parent`` (the previous frame, at step T)."""
        if not 1 <= frame < self.num_frames:
            raise ValueError(f"frame must be in 1..{self.num_frames - 1}, got {frame}")
        k = self.start_step(num_steps)
        return Task(prompt_index=prompt_index, prompt=self.frame_prompts[frame],
                    candidate=candidate, seed=seed, start=k, end=num_steps, parent=parent,
                    source_candidate=parent,
                    perturbation=Perturbation(PerturbKind.RENOISE, to_step=k),
                    score_on=score_on)

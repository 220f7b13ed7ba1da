"""What a worker does: hold a loaded model and verifiers, run units of tasks, hand back results.

The same code runs in-process (the local executor) and inside Dask workers, so both give the
same bits. A :class:`WorkerRuntime` is built once per process and spec; the model and
verifiers under it are loaded once per process whatever the spec's steps, sizes or verifier
sets (:mod:`diffsearch.model_cache`), and each sampling setting of the job's prompts
(:class:`~diffsearch.job.Sampling`) is an adapter over the one model. A :class:`WorkBatch`
carries only ids, seeds and where its source latents are; a :class:`UnitResult` carries the
numbers, the new latents (for the driver, the store's only writer) and the few images the
driver asked for as raw pixels. Nothing is encoded or written here, so the denoiser's process
only computes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

import numpy as np
import torch

from diffsearch import model_cache
from diffsearch.clips import assemble_clips, condition_on_first_frames, join_chain
from diffsearch.job import Job, Sampling, VerifierSpec, verifier_label
from diffsearch.model_cache import ModelKey, verifier_key
from diffsearch.perturb import apply_perturbations
from diffsearch.pipelines.base import Conditioning, Denoiser
from diffsearch.scoring import same_shape_groups, score_in_chunks
from diffsearch.seeding import task_generator
from diffsearch.store import LatentRef, read_latent_rows
from diffsearch.tasks import Outcome, ScoreOn, Task
from diffsearch.verifiers.base import Verifier, VerifierError
from diffsearch.verifiers.video import VideoVerifier

T = TypeVar("T")

_RUNTIMES: dict[RuntimeSpec, WorkerRuntime] = {}
"""This process's runtimes. A loaded one is dropped when the model or a verifier it uses is
evicted from :mod:`diffsearch.model_cache` (so the memory is freed), and is rebuilt cheaply
over what is still loaded when asked again."""


@dataclass(frozen=True)
class RuntimeSpec:
    """What a worker must load: hashable, so workers keep one runtime per spec."""

    model: str
    num_steps: int | None
    guidance_scale: float | None
    device: str | None
    dtype: str | None
    compute_batch: int | None
    threads: int
    verifier: str
    """The guiding verifier spec, as canonical JSON (dict specs are not hashable)."""
    eval_verifiers: tuple[str, ...] = ()
    allow_download: bool = False
    compile: bool = False
    attention: str = "auto"
    offload: str = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False
    sampler: str | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    samplings: tuple[Sampling, ...] = ()
    """The job's prompts' own sampling settings besides the job's (:meth:`Job.samplings`)."""

    @property
    def job_sampling(self) -> Sampling:
        return Sampling(num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                        width=self.width, height=self.height)

    @property
    def model_key(self) -> ModelKey:
        """What decides the loaded weights (shared by every spec with the same key)."""
        return ModelKey(model=self.model, device=self.device, dtype=self.dtype,
                        compute_batch=self.compute_batch, allow_download=self.allow_download,
                        compile=self.compile, attention=self.attention, offload=self.offload,
                        vae_tiling=self.vae_tiling, vae_slicing=self.vae_slicing)

    @classmethod
    def from_job(cls, job: Job) -> RuntimeSpec:
        return cls(
            model=job.model, num_steps=job.num_steps, guidance_scale=job.guidance_scale,
            device=job.device, dtype=job.dtype, compute_batch=job.compute_batch,
            threads=job.threads, verifier=_canonical(job.verifier),
            eval_verifiers=tuple(_canonical(v) for v in job.eval_verifiers),
            allow_download=job.allow_download, compile=job.compile, attention=job.attention,
            offload=job.offload, vae_tiling=job.vae_tiling, vae_slicing=job.vae_slicing,
            sampler=job.sampler, width=job.width, height=job.height,
            negative_prompt=job.negative_prompt, samplings=tuple(job.samplings()[1:]),
        )


@dataclass(frozen=True)
class SamplingInfo:
    """What one sampling setting makes of the model: its schedule length and latent shape, and
    the guidance scale and size it resolved to (None where the adapter does not say)."""

    num_steps: int
    latent_shape: tuple[int, ...]
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None

    @classmethod
    def of(cls, denoiser: Denoiser) -> SamplingInfo:
        return cls(num_steps=denoiser.num_steps, latent_shape=tuple(denoiser.latent_shape),
                   guidance_scale=getattr(denoiser, "guidance_scale", None),
                   width=getattr(denoiser, "width", None),
                   height=getattr(denoiser, "height", None))


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to know about the model, reported by a worker that loaded it."""

    num_steps: int
    latent_shape: tuple[int, int, int]
    nfe_per_step: int
    device: str
    dtype: str
    compute_batch: int = Denoiser.compute_batch
    """Rows per forward pass: the engine packs work units in multiples of it."""
    samplings: dict[Sampling, SamplingInfo] = field(default_factory=dict, compare=False)
    """Each sampling setting the runtime serves, the job's included."""

    def sampling(self, sampling: Sampling | None) -> SamplingInfo:
        """What ``sampling`` resolved to (None or not served: the job's own setting)."""
        if sampling is not None and sampling in self.samplings:
            return self.samplings[sampling]
        return SamplingInfo(num_steps=self.num_steps, latent_shape=self.latent_shape)

    def to_json(self) -> dict[str, object]:
        """The model as results.json reports it (each prompt reports its own settings)."""
        return {"num_steps": self.num_steps, "latent_shape": list(self.latent_shape),
                "nfe_per_step": self.nfe_per_step, "device": self.device, "dtype": self.dtype,
                "compute_batch": self.compute_batch}


class ImageWanted(str, Enum):
    """Whether the driver wants a row's pixels back (the job's ``images``, :mod:`diffsearch
    .image_output`)."""

    NO = "no"
    IF_BEST = "if_best"
    """Only if it is its prompt's best answer in the unit and at least as good as the best the
    driver knew when it sent the unit (``WorkBatch.to_beat``): so a best-of-N unit of 8 prompts
    returns at most 8 images, and the final best always comes back."""
    ALWAYS = "always"


@dataclass(frozen=True)
class ClipFrames:
    """What a task scored on its clip needs besides its own frame."""

    ancestors: tuple[LatentRef, ...]
    """The earlier frames' clean latents, oldest first (finished before the task was asked)."""
    prompt: str
    """The clip prompt the video verifier judges against (``Task.prompt`` is the frame's)."""


@dataclass(frozen=True)
class FirstFrame:
    """The frame an image-to-video chunk continues (:mod:`diffsearch.clips`): the last frame of
    its parent chunk, decoded on the worker from the parent's final latent, or for a clip's first
    chunk an image file. Exactly one is set."""

    parent: LatentRef | None = None
    image: str | None = None

    def __post_init__(self) -> None:
        if (self.parent is None) == (self.image is None):
            raise ValueError("a first frame is either a parent chunk's or an image file's")


@dataclass(frozen=True)
class Render:
    """Decode a finished candidate again for its image (a resumed run's lost best image)."""

    prompt_index: int
    candidate: int
    frames: tuple[LatentRef, ...]
    """Its final latent; for a chained clip (frames or chunks), its ancestors' first (oldest
    first)."""


@dataclass(frozen=True)
class WorkBatch:
    """A unit of work for one worker: tasks sharing their step range, eta, scoring and verifier.

    They may belong to several prompts (each row carries its own conditioning, and each row's
    result is independent of its batch-mates), except tasks scored on clips: those belong to
    one prompt's frame chain. Everything a worker needs comes with the batch (where each
    source latent is and at which step, a clip's earlier frames): workers read latents from the
    store but never its metadata, and never write to it.
    """

    tasks: tuple[Task, ...]
    store_path: str
    sources: tuple[LatentRef | None, ...] = ()
    """Per task: where its starting latent is (None: drawn from its seed). Empty: all from
    noise."""
    clips: tuple[ClipFrames | None, ...] = ()
    """Per task scored on its clip: its earlier frames. Empty when none is."""
    first_frames: tuple[FirstFrame | None, ...] = ()
    """Per task continuing an image (an image-to-video chunk): what it continues. Empty when
    none does."""
    images: tuple[ImageWanted, ...] = ()
    """Per task: whether to return its pixels. Empty: none."""
    to_beat: tuple[float | None, ...] = ()
    """Per task: its prompt's best reward when the unit was sent (for ``IF_BEST``)."""
    renders: tuple[Render, ...] = ()
    """Decode-only work; a batch has either tasks or renders."""
    sampling: Sampling | None = None
    """The sampling setting every task (or render) of the unit runs with (None: the job's);
    prompts of other settings go in other units."""
    negative_prompts: tuple[str | None, ...] = ()
    """Per task: its prompt's negative prompt. Empty: the job's for every task."""


@dataclass(frozen=True)
class UnitResult:
    """What a worker hands back for a work unit. The latents go to the driver, the only writer
    of the store; they are a few KB to a few MB per unit, sent worker to client directly."""

    outcomes: tuple[Outcome, ...]
    states: np.ndarray | None = None
    """(n, *latent_shape) float32: each task's state at its ``end``."""
    finals: np.ndarray | None = None
    """(n, *latent_shape) float32: each task's final latent, rolled out from its state. None
    when the unit's tasks were not rolled out (not scored on their final image, or already at
    the last step, where the state is the final latent)."""
    images: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    """Pixels (:func:`pixels`) by (prompt index, candidate)."""


@dataclass
class _Timer:
    stages: dict[str, float] = field(default_factory=dict)

    def time(self, stage: str, work: Callable[..., T], *args: object) -> T:
        """``work(*args)``, its seconds added to ``stage``."""
        since = time.perf_counter()
        try:
            return work(*args)
        finally:
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - since


def get_runtime(spec: RuntimeSpec) -> WorkerRuntime:
    """This process's runtime for ``spec``, loading the model and verifiers on first use."""
    runtime = _RUNTIMES.get(spec)
    if runtime is None:
        runtime = _RUNTIMES[spec] = WorkerRuntime.load(spec)
    return runtime


def register_runtime(runtime: WorkerRuntime) -> None:
    """Make ``runtime`` this process's runtime for its spec (tests, embedding applications).

    The driver's pre-run checks then take its model as found instead of looking on disk."""
    from diffsearch.preflight import hold_in_process

    _RUNTIMES[runtime.spec] = runtime
    hold_in_process(runtime.spec.model)


def _drop_runtimes_of_model(key: object) -> None:
    for spec in [s for s, r in _RUNTIMES.items() if r.model_key == key]:
        _RUNTIMES.pop(spec, None)


def _drop_runtimes_of_verifier(key: object) -> None:
    for spec in [s for s, r in _RUNTIMES.items() if key in r.verifier_keys]:
        _RUNTIMES.pop(spec, None)


model_cache.MODELS.on_evict.append(_drop_runtimes_of_model)
model_cache.VERIFIERS.on_evict.append(_drop_runtimes_of_verifier)


class WorkerRuntime:
    """A model's adapters and the verifiers of one spec. Build with :meth:`load`; tests may
    assemble one from components (a fake denoiser) and :func:`register_runtime` it for the
    in-process executor."""

    def __init__(self, spec: RuntimeSpec, denoiser: Denoiser,
                 create_verifier: Callable[..., Verifier],
                 adapt: Callable[[Sampling], Denoiser] | None = None) -> None:
        """``denoiser`` runs the job's sampling setting; ``adapt`` builds one for each of the
        spec's other settings (None: the spec must have none)."""
        self.spec = spec
        self.denoiser = denoiser
        """The job's sampling setting's adapter."""
        self._denoisers: dict[Sampling, Denoiser] = {spec.job_sampling: denoiser}
        for sampling in spec.samplings:
            if adapt is None:
                raise ValueError(f"{spec.model}: this runtime serves only the job's own "
                                 f"sampling settings, not {sampling}")
            self._denoisers[sampling] = adapt(sampling)
        self._create_verifier = create_verifier
        self._default_device = str(denoiser.device)
        self.model_key: ModelKey | None = None
        """The cached model it adapts (None: assembled from components)."""
        self.verifier_keys: set[tuple[str, str]] = set()
        """The cached verifiers it holds."""
        self.verifiers: dict[str, Verifier] = {}
        self._guiding_label = self._add_verifier(json.loads(spec.verifier))
        self._eval_labels = [self._add_verifier(json.loads(v)) for v in spec.eval_verifiers]
        self._usage_seen: dict[str, dict[str, int]] = {}
        """Each verifier's usage() counters when the last work unit ended."""

    @classmethod
    def load(cls, spec: RuntimeSpec) -> WorkerRuntime:
        """The runtime of ``spec`` over this process's loaded model and verifiers, loading
        what is not loaded yet (pins the CPU thread count first)."""
        from diffsearch.pipelines.loading import load_model
        from diffsearch.verifiers.registry import create_verifier

        pin_threads(spec.threads)
        key = spec.model_key
        for sampling in (spec.job_sampling, *spec.samplings):  # refused before any load
            _plan(spec, sampling)
        loaded = model_cache.MODELS.get(key, lambda: load_model(
            spec.model, device=spec.device, dtype=spec.dtype, compute_batch=spec.compute_batch,
            allow_download=spec.allow_download, compile=spec.compile, attention=spec.attention,
            offload=spec.offload, vae_tiling=spec.vae_tiling, vae_slicing=spec.vae_slicing))
        keys: set[tuple[str, str]] = set()

        def cached_verifier(options: str | dict, *, device: str) -> Verifier:
            cache_key = verifier_key(options, device)
            keys.add(cache_key)
            return model_cache.VERIFIERS.get(
                cache_key, lambda: create_verifier(options, device=device))

        def adapt(sampling: Sampling) -> Denoiser:
            return loaded.adapter(num_steps=sampling.num_steps,
                                  guidance_scale=sampling.guidance_scale, sampler=spec.sampler,
                                  height=sampling.height, width=sampling.width,
                                  negative_prompt=spec.negative_prompt)

        runtime = cls(spec, adapt(spec.job_sampling), cached_verifier, adapt)
        runtime.model_key = key
        runtime.verifier_keys = keys
        return runtime

    def denoiser_for(self, sampling: Sampling | None) -> Denoiser:
        """The adapter of ``sampling`` (None: the job's)."""
        if sampling is None:
            return self.denoiser
        try:
            return self._denoisers[sampling]
        except KeyError:
            raise ValueError(f"this runtime was not built for sampling settings {sampling}; "
                             f"its spec names them in RuntimeSpec.samplings") from None

    def _add_verifier(self, spec: VerifierSpec) -> str:
        """Build a verifier once per label; a dict spec may place it on its own ``device``."""
        label = verifier_label(spec)
        if label not in self.verifiers:
            if isinstance(spec, dict):
                options = {k: v for k, v in spec.items() if k not in ("label", "device")}
                device = spec.get("device", self._default_device)
            else:
                options, device = spec, self._default_device
            self.verifiers[label] = self._create_verifier(options, device=device)
        return label

    def model_info(self) -> ModelInfo:
        d = self.denoiser
        return ModelInfo(num_steps=d.num_steps, latent_shape=tuple(d.latent_shape),
                         nfe_per_step=d.nfe_per_step, device=str(d.device), dtype=str(d.dtype),
                         compute_batch=d.compute_batch,
                         samplings={s: SamplingInfo.of(a) for s, a in self._denoisers.items()})

    # ---- one work unit --------------------------------------------------------------------
    def run(self, batch: WorkBatch) -> UnitResult:
        """Run a unit of tasks (or renders); see :class:`WorkBatch`."""
        return self.finish(self.compute(batch))

    def compute(self, batch: WorkBatch) -> ComputedUnit:
        """The denoiser's part of a unit: starting latents, then denoising (and the rollout
        of tasks scored on final images). :meth:`finish` does the rest; an executor may run
        one unit's ``finish`` while the next unit's ``compute`` runs (never two of either at
        once), so the denoiser does not idle while a verifier runs."""
        timer = _Timer()
        if batch.renders:
            return ComputedUnit(batch, None, timer)
        denoiser = self.denoiser_for(batch.sampling)
        latents = timer.time("load", self._start_latents, denoiser, batch)
        negatives = batch.negative_prompts or (self.spec.negative_prompt,) * len(batch.tasks)
        conds = [denoiser.encode(t.prompt, negative)
                 for t, negative in zip(batch.tasks, negatives)]
        if batch.first_frames:
            conds = timer.time("load", condition_on_first_frames, denoiser, batch, conds)
        return ComputedUnit(batch, timer.time("denoise", self._denoise, denoiser, batch.tasks,
                                              latents, conds), timer)

    def finish(self, unit: ComputedUnit) -> UnitResult:
        """The rest of a unit: decoding what is scored, scoring, and the pixels the driver
        asked for."""
        batch, run, timer = unit.batch, unit.denoised, unit.timer
        if run is None:
            return self._render(batch)
        tasks = batch.tasks
        denoiser = self.denoiser_for(batch.sampling)
        scored = timer.time("decode", self._to_score, denoiser, batch, run)
        scores, calls = timer.time("score", self._score_rows, scored, run.errors)
        images = self._images_wanted(batch, scored, scores, run.errors)
        share = {stage: seconds / len(tasks) for stage, seconds in timer.stages.items()}
        row_shares = _equal_shares(run.rows, len(tasks))
        spent = self._usage_since_last_unit()
        outcomes = []
        for i, task in enumerate(tasks):
            guide = self._task_verifier(task)
            reward = scores[i].get(guide) if run.errors[i] is None else None
            outcomes.append(Outcome(
                prompt_index=task.prompt_index, candidate=task.candidate, step=task.end,
                reward=reward, scores=scores[i],
                nfe=task.denoise_nfe(denoiser.num_steps, denoiser.nfe_per_step),
                rows=row_shares[i], verifier_calls=calls[i], error=run.errors[i],
                timings=share, usage=spent if i == 0 else {}))
        return UnitResult(outcomes=tuple(outcomes), states=_numpy(run.states),
                          finals=None if run.finals is None else _numpy(run.finals),
                          images=images)

    @staticmethod
    def _start_latents(denoiser: Denoiser, batch: WorkBatch) -> torch.Tensor:
        """Each task's starting latent: its seed's noise, or its source (then perturbed)."""
        tasks = batch.tasks
        sources = batch.sources or (None,) * len(tasks)
        rows: list[torch.Tensor] = [None] * len(tasks)  # type: ignore[list-item]
        from_noise = [i for i, ref in enumerate(sources) if ref is None]
        if from_noise:
            noise = denoiser.initial_noise([tasks[i].seed for i in from_noise])
            for row, i in enumerate(from_noise):
                rows[i] = noise[row]
        from_store = [i for i, ref in enumerate(sources) if ref is not None]
        if from_store:
            stored = read_latent_rows(batch.store_path, [sources[i] for i in from_store])
            for row, i in enumerate(from_store):
                rows[i] = stored[row]
        latents = torch.stack(rows)
        perturbed = [i for i, t in enumerate(tasks) if t.perturbation is not None]
        if perturbed:
            latents[perturbed] = apply_perturbations(
                latents[perturbed],
                [tasks[i].perturbation for i in perturbed],  # type: ignore[misc]
                [task_generator(tasks[i].seed, "perturb") for i in perturbed],
                denoiser,
                [0 if sources[i] is None else sources[i].step for i in perturbed],  # type: ignore[union-attr]
            )
        return latents

    @staticmethod
    def _denoise(denoiser: Denoiser, tasks: Sequence[Task], latents: torch.Tensor,
                 conds: list[Conditioning]) -> _Denoised:
        """The unit's steps; tasks scored on their final image are rolled out to the end."""
        first, last = tasks[0], denoiser.num_steps
        noisy = first.eta > 0 or not denoiser.deterministic  # e.g. euler-ancestral
        generators = [task_generator(t.seed, "steps") for t in tasks] if noisy else None
        result = denoiser.denoise(latents, conds, first.start, first.end, eta=first.eta,
                                       generators=generators)
        run = _Denoised(states=result.latents, x0=result.x0, rows=result.rows,
                        errors=[_non_finite(row, first.end) for row in result.latents])
        if first.score_on is ScoreOn.FINAL and first.end < last:
            rollout = denoiser.denoise(result.latents, conds, first.end, last,
                                            eta=first.eta, generators=generators)
            run.finals, run.rows = rollout.latents, run.rows + rollout.rows
            run.errors = [e or _non_finite(row, last) for e, row in zip(run.errors, run.finals)]
        return run

    def _to_score(self, denoiser: Denoiser, batch: WorkBatch, run: _Denoised
                  ) -> _ToScore | None:
        """Decode what the unit's verifiers judge: x0 estimates, final images, or clips."""
        first = batch.tasks[0]
        if first.score_on is ScoreOn.NONE:
            return None
        if first.score_on is ScoreOn.CLIP:
            guide = self._task_verifier(first)
            if not isinstance(self.verifiers[guide], VideoVerifier):
                raise VerifierError(f"tasks scored on clips need a video verifier (e.g. "
                                    f"shapes-video) as the job's verifier; {guide!r} scores "
                                    f"images")
            clips = assemble_clips(denoiser, batch, run.states)
            prompts = [plan.prompt for plan in batch.clips]  # type: ignore[union-attr]
            return _ToScore(clips, prompts, [guide, *self._eval_labels_for(video=True)],
                            clips)
        if first.score_on is ScoreOn.X0:
            images = denoiser.decode(run.x0)
            return _ToScore(images, [t.prompt for t in batch.tasks],
                            [self._task_verifier(first)], None)
        images = denoiser.decode(run.final_latents)
        whole_clips = images.ndim == 5  # a whole-clip video model (pipelines/video.py)
        labels = [self._task_verifier(first), *self._eval_labels_for(video=whole_clips)]
        return _ToScore(images, [t.prompt for t in batch.tasks], labels, images)

    def _score_rows(self, scored: _ToScore | None, errors: list[str | None]
                    ) -> tuple[list[dict[str, float]], list[int]]:
        """Every label's score per row (rows that already failed are not scored); a failing
        verifier fails its row, with the reason in ``errors``."""
        n = len(errors)
        scores: list[dict[str, float]] = [{} for _ in range(n)]
        calls = [0] * n
        if scored is None:
            return scores, calls
        ok_rows = [i for i, e in enumerate(errors) if e is None]
        for rows, inputs in same_shape_groups(scored.inputs, ok_rows):
            for label in dict.fromkeys(scored.labels):
                verifier = self.verifiers[label]
                values, failures = score_in_chunks(verifier, label, inputs,
                                                   [scored.prompts[i] for i in rows],
                                                   self.denoiser.compute_batch)
                for row, value, failure in zip(rows, values, failures):
                    calls[row] += verifier.calls_per_score  # a k-sample judge costs k
                    if failure:
                        errors[row] = errors[row] or failure
                    else:
                        scores[row][label] = value
        return scores, calls

    def _images_wanted(self, batch: WorkBatch, scored: _ToScore | None,
                       scores: list[dict[str, float]], errors: list[str | None]
                       ) -> dict[tuple[int, int], np.ndarray]:
        """The pixels the driver asked for (:class:`ImageWanted`)."""
        if scored is None or scored.shown is None or not batch.images:
            return {}
        tasks = batch.tasks
        chosen: list[int] = []
        best_by_prompt: dict[int, int] = {}
        for i, wanted in enumerate(batch.images):
            if errors[i] is not None or wanted is ImageWanted.NO:
                continue
            if wanted is ImageWanted.ALWAYS:
                chosen.append(i)
                continue
            reward = scores[i].get(self._task_verifier(tasks[i]))
            to_beat = batch.to_beat[i]
            if reward is None or (to_beat is not None and reward < to_beat):
                continue
            held = best_by_prompt.get(tasks[i].prompt_index)
            if held is None or (-reward, tasks[i].candidate) < (
                    -scores[held][self._task_verifier(tasks[held])], tasks[held].candidate):
                best_by_prompt[tasks[i].prompt_index] = i
        chosen.extend(i for i in best_by_prompt.values() if i not in chosen)
        return {(tasks[i].prompt_index, tasks[i].candidate): pixels(scored.shown[i])
                for i in sorted(chosen)}

    def _render(self, batch: WorkBatch) -> UnitResult:
        """Decode finished candidates again, for their images."""
        images = {}
        denoiser = self.denoiser_for(batch.sampling)
        for render in batch.renders:
            latents = read_latent_rows(batch.store_path, render.frames)
            decoded = denoiser.decode(latents)
            shown = decoded[0] if len(render.frames) == 1 else join_chain(list(decoded))
            images[(render.prompt_index, render.candidate)] = pixels(shown)
        return UnitResult(outcomes=(), images=images)

    def _usage_since_last_unit(self) -> dict[str, dict[str, int]]:
        """How much each verifier's usage() counters grew since the last unit (only those that
        report any and grew)."""
        spent: dict[str, dict[str, int]] = {}
        for label, verifier in self.verifiers.items():
            now = verifier.usage()
            before = self._usage_seen.get(label, {})
            grown = {key: value - before.get(key, 0) for key, value in now.items()
                     if value != before.get(key, 0)}
            self._usage_seen[label] = now
            if grown:
                spent[label] = grown
        return spent

    def _eval_labels_for(self, *, video: bool) -> list[str]:
        """The evaluation verifiers that judge clips (``video``) or images."""
        return [label for label in self._eval_labels
                if isinstance(self.verifiers[label], VideoVerifier) == video]

    def _task_verifier(self, task: Task) -> str:
        if task.verifier is None:
            return self._guiding_label
        return self._add_verifier(task.verifier)


@dataclass
class ComputedUnit:
    """A unit between :meth:`WorkerRuntime.compute` and :meth:`WorkerRuntime.finish`."""

    batch: WorkBatch
    denoised: _Denoised | None
    """None for a batch of renders (all its work is decoding)."""
    timer: _Timer


@dataclass
class _Denoised:
    """A unit after denoising: states at ``end``, the x0 estimates, final latents of tasks
    rolled out to the last step, rows computed and each row's failure so far."""

    states: torch.Tensor
    x0: torch.Tensor
    rows: int
    errors: list[str | None]
    finals: torch.Tensor | None = None

    @property
    def final_latents(self) -> torch.Tensor:
        """The clean latents: rolled out, or the states of tasks that ended at the last step."""
        return self.states if self.finals is None else self.finals


@dataclass
class _ToScore:
    inputs: torch.Tensor | list[torch.Tensor]
    """Images (N, 3, H, W), whole clips (N, F, 3, H, W) or chained clips (one per row)."""
    prompts: list[str]
    labels: list[str]
    """The verifiers that judge them: the guide first, then evaluation verifiers."""
    shown: torch.Tensor | list[torch.Tensor] | None
    """What the run folder shows of each row (its image or clip); None for x0 estimates."""


def pixels(images: torch.Tensor) -> np.ndarray:
    """Images (..., 3, H, W) in [0, 1] as uint8 (..., H, W, 3): what a unit returns for the
    driver's :class:`~diffsearch.image_output.ImageOutput` to encode."""
    values = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(values.movedim(-3, -1).cpu().numpy())


def _numpy(latents: torch.Tensor) -> np.ndarray:
    return latents.detach().to("cpu", torch.float32).numpy()


def _equal_shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers that differ by at most one and sum to it (the
    tasks of a batch share its steps, so each costs the same share of its rows)."""
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


def _non_finite(latent: torch.Tensor, step: int) -> str | None:
    if torch.isfinite(latent).all():
        return None
    return f"non-finite values (NaN/inf) in the latent at step {step}"


def pin_threads(threads: int) -> None:
    """Pin the calling thread's intra-op CPU threads to the job's ``threads``. Every thread
    that runs a model or a verifier calls it: a new thread starts at OpenMP's default (every
    core), whatever the process set elsewhere, and other thread counts round differently."""
    torch.set_num_threads(threads)


def _plan(spec: RuntimeSpec, sampling: Sampling) -> None:
    """Check ``sampling`` against the model's family from its config files (a size it cannot
    take, say), naming the field, before anything loads."""
    from diffsearch.pipelines.sources import plan_model

    plan_model(spec.model, num_steps=sampling.num_steps, guidance_scale=sampling.guidance_scale,
               allow_download=spec.allow_download, sampler=spec.sampler,
               height=sampling.height, width=sampling.width,
               negative_prompt=spec.negative_prompt)


def _canonical(spec: VerifierSpec) -> str:
    return json.dumps(spec, sort_keys=True)


def compute_batch(spec: RuntimeSpec, batch: WorkBatch) -> ComputedUnit:
    """The first stage of ``batch`` with this process's runtime for ``spec``."""
    return get_runtime(spec).compute(batch)


def finish_batch(spec: RuntimeSpec, unit: ComputedUnit) -> UnitResult:
    """The second stage of a unit :func:`compute_batch` returned."""
    return get_runtime(spec).finish(unit)


def run_batch(spec: RuntimeSpec, batch: WorkBatch) -> UnitResult:
    """Entry point for executors: run ``batch`` with this process's runtime for ``spec``."""
    return get_runtime(spec).run(batch)


def describe_model(spec: RuntimeSpec) -> ModelInfo:
    return get_runtime(spec).model_info()

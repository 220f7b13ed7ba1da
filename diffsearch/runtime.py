"""What a worker does: hold a loaded model and verifiers, run batches of tasks, return outcomes.

The same code runs in-process (the local executor) and inside Dask workers, so both give the
same bits. A :class:`WorkerRuntime` is built once per process and spec (models are loaded once
and kept); a :class:`WorkBatch` carries only ids, seeds and store keys, and an :class:`Outcome`
only numbers, so nothing large crosses the scheduler: latents go straight to the Zarr store.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffsearch import run_folder
from diffsearch.errors import DiffsearchError
from diffsearch.job import Job, VerifierSpec, verifier_label
from diffsearch.perturb import apply_perturbations
from diffsearch.pipelines.base import Conditioning, Denoiser
from diffsearch.seeding import task_generator
from diffsearch.store import RunStore
from diffsearch.tasks import Outcome, ScoreOn, Task
from diffsearch.verifiers.base import Verifier, VerifierError
from diffsearch.verifiers.video import VideoVerifier

_RUNTIMES: dict[RuntimeSpec, WorkerRuntime] = {}


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

    @classmethod
    def from_job(cls, job: Job) -> RuntimeSpec:
        return cls(
            model=job.model, num_steps=job.num_steps, guidance_scale=job.guidance_scale,
            device=job.device, dtype=job.dtype, compute_batch=job.compute_batch,
            threads=job.threads, verifier=_canonical(job.verifier),
            eval_verifiers=tuple(_canonical(v) for v in job.eval_verifiers),
            allow_download=job.allow_download,
        )


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


@dataclass(frozen=True)
class WorkBatch:
    """A unit of work for one worker: tasks sharing their step range, eta, scoring and verifier.

    They may belong to several prompts (each row carries its own conditioning, and each row's
    result is independent of its batch-mates), except tasks scored on clips: those assemble
    their clips from one prompt's frame chain, so their batches hold one prompt.
    """

    tasks: tuple[Task, ...]
    store_path: str
    run_dir: str | None = None
    """The run folder final images are written into (:mod:`diffsearch.run_folder`); None: none
    are written."""


@dataclass
class _Timer:
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - since
        return now


def get_runtime(spec: RuntimeSpec) -> WorkerRuntime:
    """This process's runtime for ``spec``, loading the model and verifiers on first use."""
    if spec not in _RUNTIMES:
        _RUNTIMES[spec] = WorkerRuntime.load(spec)
    return _RUNTIMES[spec]


def register_runtime(runtime: WorkerRuntime) -> None:
    """Make ``runtime`` this process's runtime for its spec (tests, embedding applications).

    The driver's pre-run checks then take its model as found instead of looking on disk."""
    from diffsearch.preflight import hold_in_process

    _RUNTIMES[runtime.spec] = runtime
    hold_in_process(runtime.spec.model)


class WorkerRuntime:
    """A loaded model and verifiers. Build with :meth:`load`; tests may assemble one from
    components (a fake denoiser) and :func:`register_runtime` it for the in-process executor."""

    def __init__(self, spec: RuntimeSpec, denoiser: Denoiser,
                 create_verifier: Callable[..., Verifier]) -> None:
        self.spec = spec
        self.denoiser = denoiser
        self._create_verifier = create_verifier
        self._default_device = str(denoiser.device)
        self.verifiers: dict[str, Verifier] = {}
        self._guiding_label = self._add_verifier(json.loads(spec.verifier))
        self._eval_labels = [self._add_verifier(json.loads(v)) for v in spec.eval_verifiers]
        self._conditionings: dict[str, Conditioning] = {}
        self._usage_seen: dict[str, dict[str, int]] = {}
        """Each verifier's usage() counters when the last work unit ended."""

    @classmethod
    def load(cls, spec: RuntimeSpec) -> WorkerRuntime:
        """Load the model and verifiers named by ``spec`` (pins the CPU thread count first)."""
        from diffsearch.pipelines.loading import load_denoiser
        from diffsearch.verifiers.registry import create_verifier

        torch.set_num_threads(spec.threads)
        denoiser = load_denoiser(
            spec.model, num_steps=spec.num_steps, guidance_scale=spec.guidance_scale,
            device=spec.device, dtype=spec.dtype, compute_batch=spec.compute_batch,
            allow_download=spec.allow_download,
        )
        return cls(spec, denoiser, create_verifier)

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
                         compute_batch=d.compute_batch)

    def conditioning(self, prompt: str) -> Conditioning:
        if prompt not in self._conditionings:
            self._conditionings[prompt] = self.denoiser.encode(prompt)
        return self._conditionings[prompt]

    # ---- one batch ------------------------------------------------------------------------
    def run(self, batch: WorkBatch) -> list[Outcome]:
        """Run a batch of tasks that share step range, eta, scoring and verifier; latents,
        final latents and images go to each task's own prompt in the store and run folder."""
        tasks = batch.tasks
        first = tasks[0]
        by_prompt = _rows_by_prompt(tasks)
        store = RunStore.open(Path(batch.store_path))
        timer = _Timer()
        since = time.perf_counter()
        latents = self._start_latents(tasks, store)
        since = timer.add("load", since)
        conds = [self.conditioning(t.prompt) for t in tasks]
        generators = [task_generator(t.seed, "steps") for t in tasks] if first.eta > 0 else None
        result = self.denoiser.denoise(latents, conds, first.start, first.end, eta=first.eta,
                                       generators=generators)
        computed = result.rows
        since = timer.add("denoise", since)
        _write_latents(store, tasks, by_prompt, result.latents)
        since = timer.add("store", since)
        errors: list[str | None] = [_non_finite(row, first.end) for row in result.latents]

        scores: list[dict[str, float]] = [{} for _ in tasks]
        calls = [0] * len(tasks)
        if first.score_on is ScoreOn.CLIP:
            to_score, prompts, labels = self._clips(batch, store, result.latents, timer)
            since = time.perf_counter()
        elif first.score_on is not ScoreOn.NONE:
            if first.score_on is ScoreOn.X0:
                to_decode = result.x0
                labels = [self._task_verifier(first)]
            else:
                final = result.latents
                if first.end < self.denoiser.num_steps:
                    rollout = self.denoiser.denoise(
                        final, conds, first.end, self.denoiser.num_steps, eta=first.eta,
                        generators=generators)
                    final, computed = rollout.latents, computed + rollout.rows
                    since = timer.add("denoise", since)
                    errors = [e or _non_finite(row, self.denoiser.num_steps)
                              for e, row in zip(errors, final)]
                _write_latents(store, tasks, by_prompt, final, final=True)
                since = timer.add("store", since)
                to_decode = final
            images = self.denoiser.decode(to_decode)
            since = timer.add("decode", since)
            whole_clips = images.ndim == 5  # a whole-clip video model (pipelines/video.py)
            if first.score_on is ScoreOn.FINAL:
                labels = [self._task_verifier(first),
                          *self._eval_labels_for(video=whole_clips)]
                if batch.run_dir:
                    folder = Path(batch.run_dir)
                    for index, prompt_rows in by_prompt.items():
                        candidates = [tasks[r].candidate for r in prompt_rows]
                        own = images[prompt_rows]
                        _write_pngs(folder, index, candidates, own[:, -1] if whole_clips else own)
                        if whole_clips:
                            _write_gifs(folder, index, candidates, own)
                    since = timer.add("store", since)
            to_score, prompts = images, [t.prompt for t in tasks]
        if first.score_on is not ScoreOn.NONE:
            ok_rows = [i for i, e in enumerate(errors) if e is None]
            for rows, inputs in _same_shape_groups(to_score, ok_rows):
                for label in dict.fromkeys(labels):
                    values, failures = self._score(label, inputs, [prompts[i] for i in rows])
                    cost = self.verifiers[label].calls_per_score  # a k-sample judge costs k
                    for row, value, failure in zip(rows, values, failures):
                        calls[row] += cost
                        if failure:
                            errors[row] = errors[row] or failure
                        else:
                            scores[row][label] = value
            since = timer.add("score", since)

        share = {stage: seconds / len(tasks) for stage, seconds in timer.stages.items()}
        row_shares = _equal_shares(computed, len(tasks))
        spent = self._usage_since_last_unit()
        outcomes = []
        for i, task in enumerate(tasks):
            guide = self._task_verifier(task)
            reward = scores[i].get(guide) if errors[i] is None else None
            outcomes.append(Outcome(
                prompt_index=task.prompt_index, candidate=task.candidate, step=task.end,
                reward=reward, scores=scores[i],
                nfe=task.denoise_nfe(self.denoiser.num_steps, self.denoiser.nfe_per_step),
                rows=row_shares[i], verifier_calls=calls[i], error=errors[i], timings=share,
                usage=spent if i == 0 else {}))
        return outcomes

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

    # ---- frame-chain clips (ScoreOn.CLIP) ----------------------------------------------------
    def _clips(self, batch: WorkBatch, store: RunStore, latents: torch.Tensor, timer: _Timer
               ) -> tuple[list[torch.Tensor], list[str], list[str]]:
        """Each task's clip (ancestor frames by ``parent`` links, then its own), decoded
        (F, 3, H, W), with the clip prompt and the video verifiers' labels to score them.

        Also stores the tasks' clean latents as ``final`` and writes each candidate's frame
        as PNG and its clip as GIF. Ancestors are finished (their tasks were told back before
        this one was asked), so their parent links and latents are in the store.
        """
        tasks, first = batch.tasks, batch.tasks[0]
        since = time.perf_counter()
        if any(t.prompt_index != first.prompt_index for t in tasks):
            raise ValueError("a batch of tasks scored on clips must hold one prompt's tasks")
        if first.end != self.denoiser.num_steps:
            raise ValueError(f"a task scored on its clip must end at the last step "
                             f"({self.denoiser.num_steps}), not {first.end}")
        guide = self._task_verifier(first)
        if not isinstance(self.verifiers[guide], VideoVerifier):
            raise VerifierError(f"tasks scored on clips need a video verifier (e.g. "
                                f"shapes-video) as the job's verifier; {guide!r} scores images")
        index, candidates = first.prompt_index, [t.candidate for t in tasks]
        store.write_latents(index, candidates, latents, final=True)
        parents = store.read_parents(index)
        chains = [_ancestors(parents, t.parent, t.candidate) for t in tasks]
        since = timer.add("store", since)
        ancestors = sorted({a for chain in chains for a in chain})
        decoded = self.denoiser.decode(
            torch.cat([store.read_latents(index, ancestors), latents]) if ancestors else latents)
        frame_of = dict(zip(ancestors, decoded))
        own = decoded[len(ancestors):]
        clips = [torch.stack([*(frame_of[a] for a in chain), own[row]])
                 for row, chain in enumerate(chains)]
        since = timer.add("decode", since)
        if batch.run_dir:
            _write_pngs(Path(batch.run_dir), index, candidates, own)
            _write_gifs(Path(batch.run_dir), index, candidates, clips)
            timer.add("store", since)
        prompts = [store.prompt_text(index)] * len(tasks)
        return clips, prompts, [guide, *self._eval_labels_for(video=True)]

    def _task_verifier(self, task: Task) -> str:
        if task.verifier is None:
            return self._guiding_label
        return self._add_verifier(task.verifier)

    def _start_latents(self, tasks: Sequence[Task], store: RunStore) -> torch.Tensor:
        """Each task's starting latent: its seed's noise, or its source (then perturbed)."""
        rows: list[torch.Tensor] = [None] * len(tasks)  # type: ignore[list-item]
        from_noise = [i for i, t in enumerate(tasks) if t.source_candidate is None]
        if from_noise:
            noise = self.denoiser.initial_noise([tasks[i].seed for i in from_noise])
            for row, i in enumerate(from_noise):
                rows[i] = noise[row]
        steps_by_row = {i: 0 for i in from_noise}
        from_store = [i for i, t in enumerate(tasks) if t.source_candidate is not None]
        for prompt_index, prompt_rows in _rows_by_prompt([tasks[i] for i in from_store]).items():
            indices = [from_store[r] for r in prompt_rows]
            sources = [tasks[i].source_candidate for i in indices]
            stored = store.read_latents(prompt_index, sources)  # type: ignore[arg-type]
            source_steps = store.read_steps(prompt_index, sources)  # type: ignore[arg-type]
            for row, i in enumerate(indices):
                rows[i] = stored[row]
                steps_by_row[i] = source_steps[row]
        latents = torch.stack(rows)
        perturbed = [i for i, t in enumerate(tasks) if t.perturbation is not None]
        if perturbed:
            latents[perturbed] = apply_perturbations(
                latents[perturbed],
                [tasks[i].perturbation for i in perturbed],  # type: ignore[misc]
                [task_generator(tasks[i].seed, "perturb") for i in perturbed],
                self.denoiser,
                [steps_by_row[i] for i in perturbed],
            )
        return latents

    def _score(self, label: str, images: torch.Tensor, prompts: list[str]
               ) -> tuple[list[float], list[str | None]]:
        """Score in fixed-size chunks (batch-invariant, like the denoiser); a chunk that raises
        is retried row by row so one bad candidate fails alone, with its error."""
        n = images.shape[0]
        if n == 0:
            return [], []
        verifier = self.verifiers[label]
        size = self.denoiser.compute_batch
        values: list[float] = []
        failures: list[str | None] = []
        for begin in range(0, n, size):
            chunk, chunk_prompts = images[begin:begin + size], prompts[begin:begin + size]
            try:
                values.extend(_score_padded(verifier, chunk, chunk_prompts, size))
                failures.extend([None] * chunk.shape[0])
            except Exception:
                for row in range(chunk.shape[0]):
                    try:
                        values.extend(_score_padded(verifier, chunk[row:row + 1],
                                                    chunk_prompts[row:row + 1], size))
                        failures.append(None)
                    except Exception as error:  # a plugin may raise anything
                        values.append(math.nan)
                        failures.append(f"verifier {label!r} failed: "
                                        f"{type(error).__name__}: {error}")
                        if not isinstance(error, DiffsearchError):  # a bug, not the input
                            traceback.print_exc()
        return values, failures


def _score_padded(verifier: Verifier, images: torch.Tensor, prompts: list[str], size: int
                  ) -> list[float]:
    real = images.shape[0]
    if real < size:
        images = torch.cat([images, images[-1:].expand(size - real, *images.shape[1:])])
        prompts = prompts + [prompts[-1]] * (size - real)
    values = verifier.score(images, prompts).detach().to("cpu", torch.float64)[:real].tolist()
    for value in values:
        if not math.isfinite(value):
            raise ValueError(f"non-finite score {value}")
    return values


def _same_shape_groups(inputs: torch.Tensor | list[torch.Tensor], rows: list[int]
                       ) -> list[tuple[list[int], torch.Tensor]]:
    """``rows`` of ``inputs`` as stacked batches: one for an image tensor, one per clip length
    for a list of clips (a verifier scores a rectangular batch)."""
    if isinstance(inputs, torch.Tensor):
        return [(rows, inputs[rows])] if rows else []
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in rows:
        groups.setdefault(tuple(inputs[row].shape), []).append(row)
    return [(group, torch.stack([inputs[r] for r in group])) for group in groups.values()]


def _ancestors(parents: dict[int, int | None], parent: int | None, candidate: int) -> list[int]:
    """The finished ancestors of ``candidate`` whose parent is ``parent``, oldest first."""
    chain: list[int] = []
    while parent is not None:
        if parent not in parents:
            raise RuntimeError(f"candidate {candidate}: its ancestor {parent} is not finished "
                               f"in the store, so its clip cannot be assembled")
        chain.append(parent)
        parent = parents[parent]
    return chain[::-1]


def _rows_by_prompt(tasks: Sequence[Task]) -> dict[int, list[int]]:
    """The rows of ``tasks`` by prompt index, in order: each prompt's part of a batch."""
    groups: dict[int, list[int]] = {}
    for row, task in enumerate(tasks):
        groups.setdefault(task.prompt_index, []).append(row)
    return groups


def _write_latents(store: RunStore, tasks: Sequence[Task], by_prompt: dict[int, list[int]],
                   latents: torch.Tensor, *, final: bool = False) -> None:
    """Each task's row of ``latents`` into its own prompt's array."""
    for prompt_index, rows in by_prompt.items():
        store.write_latents(prompt_index, [tasks[r].candidate for r in rows], latents[rows],
                            final=final)


def _equal_shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers that differ by at most one and sum to it (the
    tasks of a batch share its steps, so each costs the same share of its rows)."""
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


def _non_finite(latent: torch.Tensor, step: int) -> str | None:
    if torch.isfinite(latent).all():
        return None
    return f"non-finite values (NaN/inf) in the latent at step {step}"


def _write_pngs(run_dir: Path, prompt_index: int, candidates: Sequence[int],
                images: torch.Tensor) -> None:
    (run_dir / run_folder.prompt_images(prompt_index)).mkdir(parents=True, exist_ok=True)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for candidate, image in zip(candidates, pixels):
        Image.fromarray(np.ascontiguousarray(image)).save(
            run_dir / run_folder.candidate_image(prompt_index, candidate))


GIF_FRAME_MS = 400
"""How long each frame of a written clip is shown."""


def _write_gifs(run_dir: Path, prompt_index: int, candidates: Sequence[int],
                clips: Sequence[torch.Tensor]) -> None:
    (run_dir / run_folder.prompt_images(prompt_index)).mkdir(parents=True, exist_ok=True)
    for candidate, clip in zip(candidates, clips):
        pixels = (clip.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        frames = [Image.fromarray(np.ascontiguousarray(frame)) for frame in pixels]
        frames[0].save(run_dir / run_folder.candidate_clip(prompt_index, candidate), save_all=True,
                       append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)


def _canonical(spec: VerifierSpec) -> str:
    return json.dumps(spec, sort_keys=True)


def run_batch(spec: RuntimeSpec, batch: WorkBatch) -> list[Outcome]:
    """Entry point for executors: run ``batch`` with this process's runtime for ``spec``."""
    return get_runtime(spec).run(batch)


def describe_model(spec: RuntimeSpec) -> ModelInfo:
    return get_runtime(spec).model_info()

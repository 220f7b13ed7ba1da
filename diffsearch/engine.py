"""The driver: runs one strategy per prompt through an executor, records everything in the store.

Each prompt advances on its own: as soon as every task of its last ``ask()`` is back, it is told
and asked again, so a slow prompt never holds the others up and the workers stay busy. Outcomes
are told in the order the tasks were asked, which (with seeded strategies) makes the whole run a
deterministic function of the job.

Work from every prompt is packed together: the ready tasks of all prompts wait in one pool,
and a work unit holds tasks of any prompts that share their step range, stochasticity, scoring
and verifier (each row carries its own conditioning, and a row's result never depends on its
batch-mates, so packing changes no bit). Full units go out at once; partial ones only when the
executor would otherwise idle (:class:`WorkPool`).

Resume is replay: the strategies are rebuilt from the job and asked again; every task whose
candidate is already finished in the store is answered from it without running, so a resumed run
ends exactly like an uninterrupted one and recomputes nothing that was finished.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from diffsearch import run_folder
from diffsearch.errors import StoreError
from diffsearch.executor import Executor
from diffsearch.image_output import ImageOutput
from diffsearch.job import Job, PromptSettings, Sampling
from diffsearch.preflight import preflight
from diffsearch.results import PromptResult, RunResult, collect_results
from diffsearch.runtime import (
    ClipFrames,
    FirstFrame,
    ImageWanted,
    ModelInfo,
    Render,
    RuntimeSpec,
    SamplingInfo,
    WorkBatch,
)
from diffsearch.store import LatentRef, PromptLayout, RunStore
from diffsearch.strategies.base import Strategy
from diffsearch.strategies.common import best_of
from diffsearch.strategies.registry import build_strategies
from diffsearch.strategies.tree_of_frames import chunks_of
from diffsearch.tasks import Outcome, ScoreOn, Task


@dataclass(frozen=True)
class ProgressEvent:
    """Sent to progress callbacks for each prompt with outcomes in a finished work batch (and
    for each replayed round)."""

    nfe_done: int
    nfe_total: int
    prompt_index: int
    outcomes: tuple[Outcome, ...]
    best: Outcome | None
    """The best answer so far for ``prompt_index``: the strategy's ``best()`` with the answers
    of its round in flight that are back (so it is ``best()`` once that round is told). Scores
    of x0 estimates or of per-task verifiers are on other scales and never count."""
    images: tuple[int, ...] = ()
    """Candidates of ``outcomes`` whose own image the run folder gets (``images: all``); it is
    being written as the event is sent (:mod:`diffsearch.image_output`)."""

    @property
    def best_reward(self) -> float | None:
        """The guiding verifier's score of :attr:`best`."""
        return None if self.best is None else self.best.reward


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class _PromptState:
    strategy: Strategy
    settings: PromptSettings
    sampling: SamplingInfo
    """What the prompt's sampling setting resolved to on the model."""
    round_tasks: list[Task] = field(default_factory=list)
    received: dict[int, Outcome] = field(default_factory=dict)
    nfe: int = 0
    finished: bool = False

    @property
    def best(self) -> Outcome | None:
        """The strategy's answer so far, and the answers of the round in flight already back."""
        arrived = (self.received.get(task.candidate) for task in self.round_tasks
                   if self.strategy.is_answer(task))
        return best_of([self.strategy.best(), *arrived])


class WorkPool:
    """Ready tasks of every prompt, waiting to be packed into work units.

    Tasks that can share denoiser calls (same start, end, eta, scoring and verifier) form a
    group whatever their prompt; tasks scored on clips also group by prompt, because a clip is
    assembled from its own prompt's frame chain. A group of ``batch_size`` tasks is a full unit
    and is sent at once (:meth:`full_units`). What is left is sent only to keep the executor's
    free slots busy (:meth:`partial_units`): waiting lets other prompts' tasks fill the units,
    and none waits forever, since with nothing in flight every slot is free.
    """

    def __init__(self, batch_size: int, compute_batch: int,
                 sampling_of: Callable[[int], Sampling] | None = None) -> None:
        self.batch_size = batch_size
        self.compute_batch = compute_batch
        self._sampling_of = sampling_of
        """Each prompt's sampling setting: prompts of different ones never share a unit."""
        self._groups: dict[tuple, list[Task]] = {}  # in order of arrival

    def __bool__(self) -> bool:
        return bool(self._groups)

    def add(self, tasks: list[Task]) -> None:
        for task in tasks:
            sampling = None if self._sampling_of is None else self._sampling_of(task.prompt_index)
            self._groups.setdefault((sampling, *_unit_key(task)), []).append(task)

    def full_units(self) -> list[list[Task]]:
        """Every full unit the pool holds, oldest tasks first."""
        units = []
        for key in list(self._groups):
            group = self._groups[key]
            while len(group) >= self.batch_size:
                units.append(group[:self.batch_size])
                del group[:self.batch_size]
            if not group:
                del self._groups[key]
        return units

    def partial_units(self, slots: int) -> list[list[Task]]:
        """At most ``slots`` units from what is left, largest groups first (the oldest among
        equals). A group is spread over several slots only in whole compute batches: a forward
        pass costs the same for 1 row as for ``compute_batch``, so a thinner split would add
        padding without finishing sooner."""
        units: list[list[Task]] = []
        while len(units) < slots and self._groups:
            key = max(self._groups, key=lambda k: len(self._groups[k]))
            group = self._groups.pop(key)
            passes = -(-len(group) // self.compute_batch)
            pieces = min(slots - len(units), passes)
            size = -(-passes // pieces) * self.compute_batch
            units.extend(group[i:i + size] for i in range(0, len(group), size))
        return units


def _unit_key(task: Task) -> tuple:
    """What tasks of one work unit share (see :class:`WorkPool`)."""
    key = (task.start, task.end, task.eta, task.score_on, task.verifier)
    return (*key, task.prompt_index) if task.score_on is ScoreOn.CLIP else key


class BudgetExceededError(RuntimeError):
    """A strategy asked for more NFEs than its budget: a bug in the strategy, not user input."""


class Engine:
    def __init__(
        self,
        job: Job,
        run_dir: Path,
        executor: Executor,
        *,
        resume: bool = False,
        progress_bar: bool = True,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.job = job
        self.run_dir = run_dir
        self.executor = executor
        self.resume = resume
        self.progress_bar = progress_bar
        self.on_progress = on_progress
        self.spec = RuntimeSpec.from_job(job)

    def run(self) -> RunResult:
        started = time.perf_counter()
        num_steps = preflight(self.job, self.run_dir, resume=self.resume)
        prepare_run_dir(self.run_dir, self.job)
        model = self.executor.start(self.spec)
        if num_steps is not None and model.num_steps != num_steps:
            raise RuntimeError(f"the loaded model runs {model.num_steps} steps, its config said "
                               f"{num_steps}: the pre-run checks read the model differently")
        states = self._build_strategies(model)
        images = ImageOutput(self.run_dir, self.job.images)
        try:
            with open_store(self.run_dir, self.job, model, states) as store:
                return self._search(store, images, states, model, started)
        finally:
            images.close()

    def _search(self, store: RunStore, images: ImageOutput, states: dict[int, _PromptState],
                model: ModelInfo, started: float) -> RunResult:
        total = sum(s.strategy.budget_nfe for s in states.values())
        bar = tqdm(total=total, unit="NFE", desc="search", disable=not self.progress_bar,
                   dynamic_ncols=True)
        stage_seconds: dict[str, float] = defaultdict(float)
        usage: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        waited = 0.0
        nfe_done = 0
        pool = WorkPool(self.job.batch_size, model.compute_batch,
                        lambda index: states[index].settings.sampling)
        units = _UnitBuilder(store, states, images, self.spec)
        in_flight = 0

        def dispatch() -> None:
            """Send the full units, then partial ones for the slots that would idle."""
            nonlocal in_flight
            ready = pool.full_units()
            free = self.executor.slots_for_partial_units(in_flight + len(ready))
            if free > 0 and pool:
                ready += pool.partial_units(free)
            for unit in ready:
                self.executor.submit(units.work_batch(unit))
            in_flight += len(ready)

        def advance(index: int) -> None:
            nonlocal nfe_done
            state = states[index]
            while not state.strategy.done:
                tasks = state.strategy.ask()
                if not tasks:
                    break
                self._check_round(state, tasks, model.nfe_per_step)
                units.asked(tasks)
                replayed = {t.candidate: store.lookup(t) for t in tasks}
                state.round_tasks = tasks
                state.received = {c: o for c, o in replayed.items() if o is not None}
                to_run = [t for t in tasks if t.candidate not in state.received]
                if state.received:
                    nfe_done += self._account(state, list(state.received.values()), bar)
                    self._report(index, state, tuple(state.received.values()), nfe_done, total)
                if to_run:
                    pool.add(to_run)
                    return
                state.strategy.tell([state.received[t.candidate] for t in tasks])
            state.finished = True

        for index in states:
            advance(index)
        dispatch()
        outcomes_iter = self.executor.as_completed()
        while True:
            wait_start = time.perf_counter()
            try:
                batch, result = next(outcomes_iter)
            except StopIteration:
                break
            waited += time.perf_counter() - wait_start
            in_flight -= 1
            recording = time.perf_counter()
            store.record(batch.tasks, result.outcomes, result.states, result.finals)
            images.offer(result.images)  # all of it, before any callback
            stage_seconds["store"] += time.perf_counter() - recording
            by_prompt: dict[int, list[Outcome]] = {}
            for outcome in result.outcomes:
                by_prompt.setdefault(outcome.prompt_index, []).append(outcome)
            for index, prompt_outcomes in by_prompt.items():
                state = states[index]
                for outcome in prompt_outcomes:
                    state.received[outcome.candidate] = outcome
                    for stage, seconds in outcome.timings.items():
                        stage_seconds[stage] += seconds
                    for label, counts in outcome.usage.items():
                        for key, amount in counts.items():
                            usage[label][key] += amount
                nfe_done += self._account(state, prompt_outcomes, bar)
                if state.best is not None:
                    images.update_best(index, state.best.candidate)
                shown = tuple(c for p, c in result.images if p == index) \
                    if images.wants_all else ()
                self._report(index, state, tuple(prompt_outcomes), nfe_done, total, shown)
                if len(state.received) == len(state.round_tasks):
                    state.strategy.tell([state.received[t.candidate] for t in state.round_tasks])
                    advance(index)
            dispatch()
        bar.close()
        unfinished = [i for i, s in states.items() if not s.finished]
        if unfinished:
            raise RuntimeError(f"executor stopped with prompts {unfinished} unfinished")
        self._render_missing(store, images, units, states)
        prompts = [
            PromptResult.from_store(store, index, state.strategy, state.nfe, self.job.images,
                                    settings=_settings_json(state))
            for index, state in states.items()
        ]
        stage_seconds["wait"] = waited
        store.flush()
        images.close()
        return collect_results(
            run_dir=self.run_dir, job=self.job, model=model, prompts=prompts,
            wall_seconds=time.perf_counter() - started, stage_seconds=dict(stage_seconds),
            verifier_usage={label: dict(counts) for label, counts in usage.items()},
            executor=self.executor.describe(),
        )

    def _render_missing(self, store: RunStore, images: ImageOutput, units: _UnitBuilder,
                        states: dict[int, _PromptState]) -> None:
        """Decode again the images a resumed run lost: its best images that an earlier run was
        killed before writing, and (``images: all``) candidates' images likewise."""
        best = {index: s.strategy.best() for index, s in states.items()}
        stale_best = images.stale_best({i: b.candidate for i, b in best.items() if b})
        missing = images.missing_candidates(units.final_candidates()) if self.resume else []
        wanted = list(dict.fromkeys([*stale_best, *missing]))
        if not wanted:
            return
        for batch in units.render_batches(wanted):
            self.executor.submit(batch)
        for _, result in self.executor.as_completed():
            images.offer(result.images)
            for index, candidate in stale_best:
                images.write_best(index, candidate, result.images[(index, candidate)])

    # ---- helpers ------------------------------------------------------------------------------
    def _build_strategies(self, model: ModelInfo) -> dict[int, _PromptState]:
        settings = [self.job.prompt_settings(i) for i in range(len(self.job.prompts))]
        sampling = [model.sampling(s.sampling) for s in settings]
        strategies = build_strategies(self.job, [s.num_steps for s in sampling],
                                      model.nfe_per_step)
        return {index: _PromptState(strategy, settings[index], sampling[index])
                for index, strategy in strategies.items()}

    def _check_round(self, state: _PromptState, tasks: list[Task], nfe_per_step: int) -> None:
        """The strategy's side of the contract, for every strategy: distinct candidates, and no
        ask past the budget in the NFEs the model actually charges (a strategy bug, never the
        user's: strategies size themselves to their budget)."""
        candidates = [t.candidate for t in tasks]
        if len(set(candidates)) != len(candidates):
            raise RuntimeError(f"strategy {state.strategy.name} asked one candidate twice")
        planned = state.nfe + sum(t.denoise_nfe(state.sampling.num_steps, nfe_per_step)
                                  for t in tasks)
        if planned > state.strategy.budget_nfe * nfe_per_step:
            raise BudgetExceededError(
                f"strategy {state.strategy.name} asked for {planned} NFE in total, over its "
                f"budget of {state.strategy.budget_nfe}")

    @staticmethod
    def _account(state: _PromptState, outcomes: list[Outcome], bar: tqdm) -> int:
        nfe = sum(o.nfe for o in outcomes)
        state.nfe += nfe
        bar.update(nfe)
        best = state.best
        if best is not None:
            # prompts run interleaved: say whose best this is
            bar.set_postfix_str(f"prompt {best.prompt_index} best {best.reward:.4g}",
                                refresh=False)
        return nfe

    def _report(self, index: int, state: _PromptState, outcomes: tuple[Outcome, ...],
                nfe_done: int, total: int, images: tuple[int, ...] = ()) -> None:
        if self.on_progress is not None:
            self.on_progress(ProgressEvent(nfe_done=nfe_done, nfe_total=total,
                                           prompt_index=index, outcomes=outcomes,
                                           best=state.best, images=images))


def prepare_run_dir(run_dir: Path, job: Job) -> None:
    """Create the output folder (checked by :func:`~diffsearch.preflight.check_run_folder`) and
    record the job in it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise StoreError(f"cannot write to output folder {run_dir}: "
                         f"{error.strerror or error}") from None
    (run_dir / run_folder.JOB).write_text(job.model_dump_json(indent=2))


def open_store(run_dir: Path, job: Job, model: ModelInfo, states: dict[int, _PromptState]
               ) -> RunStore:
    """The run's store: the existing one when resuming (its job was checked before the run
    started), else a new one, with each prompt's own steps and latent shape."""
    path = run_dir / run_folder.STORE
    if path.exists():
        return RunStore.open(path)
    return RunStore.create(
        path, job=job.model_dump(mode="json"), result_key=job.result_key(),
        latent_shape=model.latent_shape, num_steps=model.num_steps,
        prompts=[s.strategy.prompt for s in states.values()],
        prompt_layouts={index: PromptLayout(s.sampling.num_steps, s.sampling.latent_shape)
                        for index, s in states.items()})


def _settings_json(state: _PromptState) -> dict[str, object]:
    """What a prompt ran with, as results.json records it: its own settings, else the job's,
    with the model's defaults filled in where the adapter says what they resolved to."""
    settings, sampling = state.settings, state.settings.sampling
    resolved = state.sampling
    return {
        "negative_prompt": settings.negative_prompt, "seed": settings.seed,
        "num_steps": resolved.num_steps,
        "guidance_scale": (sampling.guidance_scale if resolved.guidance_scale is None
                           else resolved.guidance_scale),
        "width": sampling.width if resolved.width is None else resolved.width,
        "height": sampling.height if resolved.height is None else resolved.height,
        "latent_shape": list(resolved.latent_shape),
    }


class _UnitBuilder:
    """Turns tasks into work units: it tells each unit where its source latents and earlier
    clip frames are, and which rows' pixels to send back, from what the driver knows (the
    store's index, the strategies' answers, the best so far)."""

    def __init__(self, store: RunStore, states: dict[int, _PromptState], images: ImageOutput,
                 spec: RuntimeSpec) -> None:
        self.store = store
        self.states = states
        self.images = images
        self.spec = spec
        self._clip_candidates: set[tuple[int, int]] = set()
        self._final_candidates: list[tuple[int, int]] = []

    def asked(self, tasks: list[Task]) -> None:
        """Note what the run folder will show of each asked task (a clip or an image)."""
        for task in tasks:
            key = (task.prompt_index, task.candidate)
            if task.score_on is ScoreOn.CLIP:
                self._clip_candidates.add(key)
            if task.score_on in (ScoreOn.CLIP, ScoreOn.FINAL):
                self._final_candidates.append(key)

    def final_candidates(self) -> list[tuple[int, int]]:
        """(prompt, candidate) of every task asked that has a final image or clip."""
        return self._final_candidates

    def work_batch(self, tasks: list[Task]) -> WorkBatch:
        store = self.store
        # A task that starts at the last step (a 0-NFE re-scoring) starts from its source's
        # final latent, rolled out when the source stopped earlier; others from its state.
        sources = tuple(None if t.source_candidate is None else store.latent_ref(
            t.prompt_index, t.source_candidate,
            final=t.start == self.states[t.prompt_index].sampling.num_steps) for t in tasks)
        clips = tuple(self._clip_frames(t) for t in tasks) \
            if any(t.score_on is ScoreOn.CLIP for t in tasks) else ()
        first_frames = tuple(self._first_frame(t) for t in tasks)
        wanted = tuple(self._wanted(t) for t in tasks)
        to_beat: tuple[float | None, ...] = ()
        if ImageWanted.IF_BEST in wanted:  # each prompt's best so far, ranked once per prompt
            best = {index: self.states[index].best for index in {t.prompt_index for t in tasks}}
            to_beat = tuple(None if best[t.prompt_index] is None
                            else best[t.prompt_index].reward for t in tasks)  # type: ignore[union-attr]
        negatives = tuple(self.states[t.prompt_index].settings.negative_prompt for t in tasks)
        return WorkBatch(tasks=tuple(tasks), store_path=str(store.path),
                         sources=sources if any(sources) else (), clips=clips,
                         first_frames=first_frames if any(first_frames) else (),
                         images=wanted if any(w is not ImageWanted.NO for w in wanted) else (),
                         to_beat=to_beat, sampling=self._sampling(tasks[0].prompt_index),
                         negative_prompts=() if set(negatives) == {self.spec.negative_prompt}
                         else negatives)

    def render_batches(self, wanted: list[tuple[int, int]]) -> list[WorkBatch]:
        """Decode-only units for ``wanted`` candidates, one per sampling setting."""
        by_sampling: dict[Sampling | None, list[Render]] = {}
        for index, candidate in wanted:
            by_sampling.setdefault(self._sampling(index), []).append(Render(
                prompt_index=index, candidate=candidate, frames=self._frames(index, candidate)))
        return [WorkBatch(tasks=(), store_path=str(self.store.path), renders=tuple(renders),
                          sampling=sampling) for sampling, renders in by_sampling.items()]

    def _sampling(self, index: int) -> Sampling | None:
        """The prompt's sampling setting as a unit names it (None: the job's)."""
        sampling = self.states[index].settings.sampling
        return None if sampling == self.spec.job_sampling else sampling

    def _wanted(self, task: Task) -> ImageWanted:
        if task.score_on not in (ScoreOn.FINAL, ScoreOn.CLIP):
            return ImageWanted.NO
        if self.images.wants_all:
            return ImageWanted.ALWAYS
        if self.images.wants_best and self.states[task.prompt_index].strategy.is_answer(task):
            return ImageWanted.IF_BEST
        return ImageWanted.NO

    def _clip_frames(self, task: Task) -> ClipFrames | None:
        if task.score_on is not ScoreOn.CLIP:
            return None
        chain = _ancestors(self.store.parents(task.prompt_index), task.parent, task.candidate)
        return ClipFrames(
            ancestors=tuple(self.store.latent_ref(task.prompt_index, a, final=True)
                            for a in chain),
            prompt=self.states[task.prompt_index].strategy.prompt)

    def _first_frame(self, task: Task) -> FirstFrame | None:
        """What an image-to-video chunk continues: its parent chunk (finished: a tree asks
        children only once their parents are told), or for a first chunk the strategy's image."""
        chunks = chunks_of(self.states[task.prompt_index].strategy)
        if chunks is None:
            return None
        if task.parent is not None:
            return FirstFrame(parent=self.store.latent_ref(task.prompt_index, task.parent,
                                                           final=True))
        return None if chunks.image is None else FirstFrame(image=chunks.image)

    def _frames(self, index: int, candidate: int) -> tuple[LatentRef, ...]:
        """The latents its image is decoded from: its final latent, after its ancestors' for a
        chained clip (frames or chunks)."""
        chain = []
        if (index, candidate) in self._clip_candidates:
            parents = self.store.parents(index)
            chain = _ancestors(parents, parents[candidate], candidate)
        return tuple(self.store.latent_ref(index, c, final=True) for c in [*chain, candidate])


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

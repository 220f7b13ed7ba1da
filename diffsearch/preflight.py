"""Checks that a job can run, made before anything slow starts (a cluster, a model load).

A user who mistypes a model path or a verifier name, or resumes the wrong run folder, should
hear so in one line at once, not after a Dask cluster has started and every worker has tried to
load the model. The checks here read only small files: a model's ``model_index.json`` and
defaults, verifier names and manifests, and a store's attributes. Cheapest first: the model
check imports neither torch nor diffusers, so the CLI can make it before its heavy imports.

A model this process already holds (a runtime registered in-process by an embedding
application or a test, see :func:`diffsearch.runtime.register_runtime`) is not looked up on
disk: its runtime was built, so its model and verifiers exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from diffsearch import run_folder
from diffsearch.errors import DiffsearchError, JobError, StoreError
from diffsearch.job import Job, VerifierSpec
from diffsearch.pipelines.samplers import SAMPLERS, SamplerNeed, sampler_names
from diffsearch.pipelines.sources import (
    FAMILIES,
    Family,
    ModelPlan,
    plan_model,
    xformers_missing,
)

if TYPE_CHECKING:
    from diffsearch.strategies.base import Strategy

_IN_PROCESS_MODELS: set[str] = set()
"""Names of the models of the runtimes registered in this process."""

def hold_in_process(model: str) -> None:
    """Record that this process holds a runtime for ``model`` (called on registration)."""
    _IN_PROCESS_MODELS.add(model)


def plan_job(job: Job) -> ModelPlan | None:
    """The job's model and sampling settings, or None for a model held in-process (its runtime
    says, once started); a one-line ModelLoadError if the model cannot be found or has no
    adapter, or its family cannot take the job's sampler, size or negative prompt (the error
    names the field). Reads config files only."""
    if job.model in _IN_PROCESS_MODELS:
        return None
    return plan_model(job.model, num_steps=job.num_steps, guidance_scale=job.guidance_scale,
                      allow_download=job.allow_download, sampler=job.sampler,
                      height=job.height, width=job.width, negative_prompt=job.negative_prompt)


def prompt_steps(job: Job, plan: ModelPlan) -> list[int]:
    """Each prompt's number of denoising steps, checking the sampling settings prompts set for
    themselves (a size the family cannot take, say) from config files: the error names the
    first prompt that set it, ``prompts.3: width: ...``."""
    steps_of = {job.job_sampling: plan.num_steps}
    steps = []
    for index in range(len(job.prompts)):
        sampling = job.prompt_settings(index).sampling
        if sampling not in steps_of:
            try:
                steps_of[sampling] = plan_model(
                    job.model, num_steps=sampling.num_steps,
                    guidance_scale=sampling.guidance_scale, allow_download=job.allow_download,
                    sampler=job.sampler, height=sampling.height, width=sampling.width,
                    negative_prompt=job.negative_prompt).num_steps
            except DiffsearchError as error:
                raise JobError(f"prompts.{index}: {error}") from None
        steps.append(steps_of[sampling])
    return steps


def check_model(job: Job) -> int | None:
    """The number of denoising steps the job will run (None: see :func:`plan_job`)."""
    plan = plan_job(job)
    return None if plan is None else plan.num_steps


_NEEDS: dict[SamplerNeed, tuple[str, str]] = {
    "resume": ("continues states at later steps",
               "it keeps the model outputs of earlier steps and runs 0 -> T in one go"),
    "stochastic": ("takes stochastic steps (eta > 0)", "it has none"),
    "deterministic": ("scores a kept state once and carries it on",
                      "it draws noise at every step, so the state would not go on to that "
                      "image"),
}
"""Per need: what the strategy does, and why a sampler without it cannot serve it."""


def check_sampler(sampler_name: str, strategy: Strategy) -> None:
    """The sampler (the job's, or the model's own) can do what the strategy asks
    (``Strategy.sampler_needs``); refused in one line naming both, with the samplers of the
    same kind (UNet or flow) that can. Needs only the name, so a runtime held in-process can be
    checked with the sampler its denoiser reports (``denoiser.sampler.name``)."""
    sampler = SAMPLERS[sampler_name]
    needs = sorted(strategy.sampler_needs)
    missing = [need for need in needs if not sampler.can(need)]
    if not missing:
        return
    able = [name for name in sampler_names(flow=sampler.flow)
            if all(SAMPLERS[name].can(need) for need in needs)]
    does, why = _NEEDS[missing[0]]
    choices = ", ".join(able[:-1]) + (" or " if len(able) > 1 else "") + able[-1]
    raise JobError(f"sampler: strategy {strategy.name} {does}, which {sampler.name} cannot "
                   f"({why}); use {choices}")


def check_first_frame(family: Family, strategy: Strategy) -> None:
    """An image-to-video model (``Family.image_to_video``) takes only a strategy whose
    candidates are chunks continuing an image, given the first chunk's image; such a strategy
    runs on nothing else. From config files, so refused before the model loads."""
    from diffsearch.strategies.tree_of_frames import chunks_of

    chunks = chunks_of(strategy)
    if family.image_to_video and chunks is None:
        raise JobError(f"model: image-to-video needs a first frame for every candidate, which "
                       f"strategy {strategy.name} does not give; run tree-of-frames or "
                       f"linear-clips with unit: chunk and image: <file>, or use a "
                       f"text-to-video model")
    if chunks is None:
        return
    if not family.image_to_video:
        able = ", ".join(name for name, f in FAMILIES.items() if f.image_to_video)
        raise JobError(f"strategy.unit: chunk makes every candidate continue an image, which "
                       f"{family.name} models cannot; use an image-to-video model ({able}) or "
                       f"unit: frame")
    if chunks.image is None:
        raise JobError("strategy.image: an image-to-video model continues a first frame; give "
                       "the first chunk's as image: <file>")


def check_attention(job: Job) -> None:
    """``attention: xformers`` needs xformers installed: found without importing it, so a job
    that asks for it on a machine without it fails here and not in every worker's load."""
    if job.attention == "xformers" and (problem := xformers_missing()):
        raise JobError(f"attention: {problem}")


def check_verifiers(job: Job, strategy: Strategy | None = None) -> None:
    """Every verifier the job names exists (a built-in, a plugin or a verifier folder),
    including those its strategy's options name."""
    if job.model in _IN_PROCESS_MODELS:
        return
    from diffsearch.verifiers.registry import check_verifier_spec

    specs: dict[str, VerifierSpec] = {"verifier": job.verifier}
    specs.update({f"eval_verifiers.{i}": spec for i, spec in enumerate(job.eval_verifiers)})
    if strategy is not None:
        specs.update({f"strategy.{option}": spec
                      for option, spec in strategy.named_verifiers().items()})
    for field, spec in specs.items():
        try:
            check_verifier_spec(spec)
        except DiffsearchError as error:
            raise JobError(f"{field}: {error}") from None


def check_strategies(job: Job, num_steps: int | list[int]) -> Strategy:
    """Build the job's strategies as the engine will, to refuse options that do not fit the
    model or the budget (``n`` past the budget, a schedule past the last step).
    ``num_steps``: one number, or one per prompt (:func:`prompt_steps`).

    The NFEs a step costs are known only once the model is loaded; one per step is the least
    any adapter charges, so the budget here is the most generous one: whatever fails here
    fails for the loaded model too, and the engine's own build after loading is exact.
    Returns the first prompt's strategy (every prompt's takes the same options).
    """
    from diffsearch.strategies.registry import build_strategies

    return build_strategies(job, num_steps, nfe_per_step=1)[0]


def check_run_folder(job: Job, run_dir: Path, *, resume: bool) -> None:
    """A new run needs a folder without a store; ``--resume`` needs the store of this job.

    Only reads: a refused run leaves the folder exactly as it was.
    """
    store_path = run_dir / run_folder.STORE
    if not store_path.exists():
        return
    if not resume:
        raise StoreError(f"{run_dir} already holds a run; pass --resume to continue it or "
                         f"choose another output folder")
    from diffsearch.store import RunStore

    if RunStore.open(store_path, writable=False).attrs.get("result_key") != job.result_key():
        raise StoreError(f"{store_path} was made by a different job (model, prompts, strategy, "
                         f"budget, verifiers, seed or numerics changed); cannot resume it")


def preflight(job: Job, run_dir: Path, *, resume: bool) -> int | None:
    """Every cheap check, cheapest first; returns :func:`check_model`'s number of steps."""
    check_attention(job)
    plan = plan_job(job)
    num_steps = None if plan is None else plan.num_steps
    strategy = None if plan is None else check_strategies(job, prompt_steps(job, plan))
    if plan is not None and strategy is not None:
        check_sampler(plan.sampler, strategy)
        check_first_frame(plan.family, strategy)
    check_verifiers(job, strategy)
    check_run_folder(job, run_dir, resume=resume)
    return num_steps

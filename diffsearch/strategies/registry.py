"""Strategy names, as used by job files, the CLI and the API, and building a job's strategies.

Imported lazily so that naming one strategy does not import every other one.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from diffsearch.errors import JobError
from diffsearch.strategies.base import Strategy
from diffsearch.strategies.options import OptionError

if TYPE_CHECKING:
    from diffsearch.job import Job

_STRATEGIES: dict[str, str] = {
    "best-of-n": "diffsearch.strategies.best_of_n:BestOfN",
    "evosearch": "diffsearch.strategies.evosearch:EvoSearch",
    "ttsnap": "diffsearch.strategies.ttsnap:TTSnap",
    "zero-order": "diffsearch.strategies.zero_order:ZeroOrder",
    "paths": "diffsearch.strategies.paths:Paths",
    "particles": "diffsearch.strategies.particles:Particles",
    "tree-of-frames": "diffsearch.strategies.tree_of_frames:TreeOfFrames",
    "linear-clips": "diffsearch.strategies.tree_of_frames:LinearClips",
}


class UnknownStrategyError(JobError):
    pass


def strategy_names() -> list[str]:
    return sorted(_STRATEGIES)


def strategy_class(name: str) -> type[Strategy]:
    try:
        target = _STRATEGIES[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; choose one of: {', '.join(strategy_names())}"
        ) from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_strategies(job: Job, num_steps: int | Sequence[int], nfe_per_step: int
                     ) -> dict[int, Strategy]:
    """One strategy per prompt index, for a model of ``num_steps`` steps (one number, or one
    per prompt where prompts set their own) costing ``nfe_per_step`` NFEs each (what the engine
    runs, and what a service checks a request with before queueing it). Each prompt's text and
    seed are its own settings' (:meth:`~diffsearch.job.Job.prompt_settings`).

    The job's options were checked without the model when the job was validated; what needs the
    model or the budget is checked here, and a strategy's refusal of the user's input (its
    ``ValueError``) becomes a ``JobError`` in the job's ``strategy.<option>: reason`` form. Any
    other exception (a ``TypeError`` from a strategy's own bug, say) keeps its traceback.
    """
    cls = strategy_class(job.strategy.name)
    count = len(job.prompts)
    steps = [num_steps] * count if isinstance(num_steps, int) else list(num_steps)
    if len(steps) != count:
        raise ValueError(f"build_strategies got {len(steps)} step counts for {count} prompts")
    strategies = {}
    for index in range(count):
        settings = job.prompt_settings(index)
        try:
            strategies[index] = cls.from_options(
                job.strategy.options, prompt_index=index, prompt=settings.text,
                num_steps=steps[index], budget_nfe=job.budget_nfe(steps[index]) // nfe_per_step,
                seed=settings.seed)
        except OptionError as error:
            raise JobError(f"strategy.{error.option}: {error.reason}") from None
        except ValueError as error:
            raise JobError(f"strategy: {error}") from None
    return strategies

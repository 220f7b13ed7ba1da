"""Strategy names, as used by job files, the CLI and the API.

Imported lazily so that naming one strategy does not import every other one.
"""

from __future__ import annotations

import importlib

from diffsearch.errors import JobError
from diffsearch.strategies.base import Strategy

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

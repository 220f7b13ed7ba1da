"""Strategy names, as used by job files, the CLI and the API.

Imported lazily so that naming one strategy does not import every other one.
"""

from __future__ import annotations

import importlib

from diffsearch.errors import JobError
from diffsearch.search.base import Strategy

_STRATEGIES: dict[str, str] = {
    "best-of-n": "diffsearch.search.best_of_n:BestOfN",
    "evosearch": "diffsearch.search.evosearch:EvoSearch",
    "ttsnap": "diffsearch.search.ttsnap:TTSnap",
    "zero-order": "diffsearch.search.zero_order:ZeroOrder",
    "paths": "diffsearch.search.paths:Paths",
    "particles": "diffsearch.search.particles:Particles",
    "tree-of-frames": "diffsearch.search.tree_of_frames:TreeOfFrames",
    "linear-clips": "diffsearch.search.tree_of_frames:LinearClips",
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

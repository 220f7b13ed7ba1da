"""diffsearch: distributed test-time search for diffusion models.

``diffsearch.search(...)`` / ``diffsearch.asearch(...)`` (see :mod:`diffsearch.api`) are resolved
on first use: ``import diffsearch`` stays cheap (no torch, diffusers or Dask) for tools that only
want the version or the CLI's help. Search strategies live in :mod:`diffsearch.strategies`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "search": "diffsearch.api",
    "asearch": "diffsearch.api",
    "run_job": "diffsearch.api",
    "SearchResult": "diffsearch.api",
    "SearchCancelled": "diffsearch.api",
    "Job": "diffsearch.job",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from diffsearch.api import SearchCancelled, SearchResult, asearch, run_job, search
    from diffsearch.job import Job


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

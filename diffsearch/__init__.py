"""diffsearch: distributed test-time search for diffusion models.

``diffsearch.search(...)`` / ``diffsearch.asearch(...)`` (see :mod:`diffsearch.api`) are resolved
on first use: ``import diffsearch`` stays cheap (no torch, diffusers or Dask) for tools that only
want the version or the CLI's help.

``diffsearch.search`` is also the name of the strategies sub-package (``diffsearch.search.base``,
``diffsearch.search.registry``): the import system binds that module to the attribute whenever a
strategy module is imported, so a plain function attribute would be replaced. Instead the
sub-package's module is made callable: calling it runs :func:`diffsearch.api.search`, and its
sub-modules import as before.
"""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "asearch": "diffsearch.api",
    "run_job": "diffsearch.api",
    "SearchResult": "diffsearch.api",
    "SearchCancelled": "diffsearch.api",
    "Job": "diffsearch.job",
}

__all__ = ["__version__", "search", *_LAZY]

if TYPE_CHECKING:
    from diffsearch.api import SearchCancelled, SearchResult, asearch, run_job
    from diffsearch.job import Job


class _CallableSearchPackage(types.ModuleType):
    """The ``diffsearch.search`` package, callable as :func:`diffsearch.api.search`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from diffsearch.api import search

        return search(*args, **kwargs)


def _make_search_callable() -> None:
    package = importlib.import_module("diffsearch.search")  # a docstring only: cheap
    package.__class__ = _CallableSearchPackage


_make_search_callable()


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""What one process keeps loaded: each model once per device and dtype, each verifier once.

A service varies steps, guidance, sizes and verifiers from request to request; a worker runs
jobs one after another. None of that is a reason to load weights again: a model is loaded once
per :class:`ModelKey` (:func:`diffsearch.pipelines.loading.load_model`) and every sampling
setting is an adapter over it, and a verifier is built once per spec and device, whichever job
asks for it.

Both caches are least-recently-used with a limit (:func:`set_limits`, or the environment
variables :data:`MAX_MODELS_ENV` / :data:`MAX_VERIFIERS_ENV`, which worker processes started by
the driver inherit). Evicting drops the cache's reference; the weights are freed once no unit in
flight still uses them (whoever holds the object keeps it alive, so nothing breaks mid-unit).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

MAX_MODELS_ENV = "DIFFSEARCH_MAX_LOADED"
MAX_VERIFIERS_ENV = "DIFFSEARCH_MAX_LOADED_VERIFIERS"
DEFAULT_MAX_MODELS = 2
"""Two: a second model can load while the first one's last units finish, and a service that
alternates between two models does not reload either."""
DEFAULT_MAX_VERIFIERS = 8

V = TypeVar("V")


@dataclass(frozen=True)
class ModelKey:
    """What decides a loaded model's weights and kernels: two jobs with the same key share one
    copy, whatever their steps, guidance, sizes, samplers or verifiers."""

    model: str
    device: str | None
    dtype: str | None
    compute_batch: int | None
    allow_download: bool = False
    compile: bool = False
    attention: str = "auto"
    offload: str = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False


def verifier_key(options: str | dict[str, Any], device: str) -> tuple[str, str]:
    """A verifier's cache key: its constructor options as canonical JSON, and its device."""
    return json.dumps(options, sort_keys=True), device


class LRUCache(Generic[V]):
    """Values built on first use and kept, at most ``limit`` of them (least recently used
    goes first). Thread-safe; a value is built outside the lock, so a slow load does not stop
    other threads from using what is loaded, and two threads asking for one new key build it
    once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.on_evict: list[Callable[[Hashable], None]] = []
        """Called with each evicted key (outside the lock): whoever holds values derived from
        it drops them, so the memory is freed."""
        self._values: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Event] = {}
        self.loads = 0
        """How many values were built (a test and ``describe`` read it)."""

    def get(self, key: Hashable, build: Callable[[], V]) -> V:
        while True:
            with self._lock:
                if key in self._values:
                    self._values.move_to_end(key)
                    return self._values[key]
                waiting = self._building.get(key)
                if waiting is None:
                    self._building[key] = threading.Event()
                    break
            waiting.wait()  # another thread builds it (or fails; then this one tries)
        try:
            value = build()
        finally:
            with self._lock:
                self._building.pop(key).set()
        with self._lock:
            self._values[key] = value
            self.loads += 1
            evicted = []
            while len(self._values) > self.limit:
                evicted.append(self._values.popitem(last=False)[0])
        for old in evicted:
            for callback in self.on_evict:
                callback(old)
        return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._values

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


def _limit_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


MODELS: LRUCache[Any] = LRUCache(_limit_from_env(MAX_MODELS_ENV, DEFAULT_MAX_MODELS))
"""Loaded models (:class:`~diffsearch.pipelines.loading.LoadedModel`) by :class:`ModelKey`."""
VERIFIERS: LRUCache[Any] = LRUCache(_limit_from_env(MAX_VERIFIERS_ENV, DEFAULT_MAX_VERIFIERS))
"""Verifiers by :func:`verifier_key`."""


def set_limits(*, models: int | None = None, verifiers: int | None = None) -> None:
    """Change this process's limits (and, through the environment, those of worker processes
    it starts afterwards). Each must be >= 1."""
    for value, cache, env in ((models, MODELS, MAX_MODELS_ENV),
                              (verifiers, VERIFIERS, MAX_VERIFIERS_ENV)):
        if value is None:
            continue
        if value < 1:
            raise ValueError(f"the limit of loaded models and verifiers must be >= 1, "
                             f"got {value}")
        cache.limit = value
        os.environ[env] = str(value)

"""What the service allows and how it runs searches: models, verifiers, limits, executor.

Everything a request could use to reach beyond the service is decided here, by whoever starts
it, never by a request: which models may be loaded (names mapped to folders or hub ids), which
verifiers may be named, where runs are written, where work runs, and how big a search may be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from diffsearch.service.events import DEFAULT_MAX_EVENTS


@dataclass(frozen=True)
class Limits:
    """Request limits; each is named in the 4xx answer of a request that breaks it."""

    max_budget_nfe: int = 2000
    """NFEs per prompt (a budget of ``"Nx"`` counts N times the model's steps)."""
    max_prompts: int = 8
    """Prompts per search."""
    max_prompt_chars: int = 500
    """Characters per prompt."""
    max_queue: int = 32
    """Searches waiting to start (running ones are not counted); more are answered 429."""
    max_image_side: int = 1024
    """The largest side an image download may be resized to (``?size=``). The generated size
    is the job's ``width`` and ``height``, within what the model's family takes."""
    max_pixels: int = 1024 * 1024
    """Pixels (width x height) of a generated image: what bounds a search's memory, since a
    request may set the size."""
    max_body_bytes: int = 64 * 1024
    """Size of a request body."""
    max_event_streams: int = 8
    """Event streams (SSE clients) open at once per search; one more is answered 429. Each holds
    a connection and a follower for as long as its search runs."""

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class A1111Defaults:
    """What an A1111 ``txt2img`` request searches with when it does not say (its
    ``alwayson_scripts`` "diffsearch" entry or ``override_settings`` can; see
    :mod:`diffsearch.service.a1111`). Checked against the service's strategies and verifiers
    at start."""

    strategy: str = "best-of-n"
    budget: int | str = "8x"
    """NFEs per search, or ``"Nx"``: N samples' worth at the request's ``steps``."""
    verifier: str | None = None
    """None: the service's default verifier (a job file's default if offered, else the first
    offered)."""
    max_images: int = 16
    """The most images (``batch_size`` x ``n_iter``) one request may ask for."""


@dataclass(frozen=True)
class ServiceConfig:
    data_dir: Path
    """Runs are written to ``data_dir/runs/<search id>`` and each search's record to
    ``data_dir/searches/<search id>.json`` (reloaded at start); nothing else is written."""
    token: str | None = None
    """Bearer token every /v1 request must present (None: no auth, loopback only)."""
    models: dict[str, str] = field(default_factory=lambda: {"shapes": "shapes"})
    """Model names a request may use -> what is loaded ("shapes", a folder, a cached hub id)."""
    verifiers: tuple[str, ...] | None = None
    """Verifier names a request may use; None: every one the registry can import."""
    judge_endpoints: dict[str, str | None] = field(default_factory=dict)
    """Endpoints an ``openai`` judge in a request may call: base URL -> the environment variable
    holding its API key (None: no key). A request names only the base URL; the key's variable,
    the network opt-in and the reply cache are the service's. Empty: no API judge at all."""
    limits: Limits = field(default_factory=Limits)
    executor: Literal["local", "dask"] = "local"
    workers: int | None = None
    scheduler: str | None = None
    threads: int = 2
    """Intra-op CPU threads per worker: part of the results' identity (see Job.threads)."""
    concurrency: int = 1
    """Searches run at the same time (the in-process executor allows 1)."""
    batch_size: int = 8
    """Candidates per work unit: also how often progress arrives (one event per unit)."""
    max_records: int = 256
    """Searches kept in memory once nothing runs in them (done, failed, cancelled, interrupted),
    the most recently used; an older one is read back from its record file when asked for.
    Queued and running searches are always in memory (at most max_queue + concurrency)."""
    max_events: int = DEFAULT_MAX_EVENTS
    """Events each search's log keeps in memory, the newest (one per finished work batch, plus
    status changes); a client that needs an older one gets a ``snapshot`` event instead."""
    a1111: A1111Defaults = field(default_factory=A1111Defaults)
    """Defaults of the A1111-compatible routes (/sdapi/v1)."""

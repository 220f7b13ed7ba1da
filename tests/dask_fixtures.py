"""Fake-model runtimes inside Dask worker processes, for the Dask executor tests.

Worker processes are fresh interpreters without the tests folder on ``sys.path``, so the plugin
is pickled by value (cloudpickle) and puts the folder on the worker's path itself before
importing the fake denoiser. The scheduler keeps registered plugins and hands them to every
worker that joins later, so a worker restarted after a kill gets the fake runtime again.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cloudpickle
from distributed.diagnostics.plugin import WorkerPlugin

from diffsearch.job import Job
from fake_denoiser import FakeDenoiser

TESTS_DIR = str(Path(__file__).resolve().parent)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SlowFakeDenoiser(FakeDenoiser):
    """The fake denoiser, taking ``delay`` seconds per denoise call so a batch is still running
    when a test kills its worker."""

    def __init__(self, num_steps: int = 10, delay: float = 0.0) -> None:
        super().__init__(num_steps=num_steps)
        self.delay = delay

    def denoise(self, latents, conds, start, end, **kwargs):
        time.sleep(self.delay)
        return super().denoise(latents, conds, start, end, **kwargs)


class FakeRuntimePlugin(WorkerPlugin):
    """Registers the fake runtime for ``job`` in a worker process (what ``install_fake_runtime``
    does in the test process), so ``get_runtime`` finds it instead of loading a model."""

    def __init__(self, job: Job, delay: float = 0.0) -> None:
        self.job = job
        self.delay = delay
        # the driver holds the fake model too, so its pre-run checks do not look for it on disk
        # (imported here, not named from the module: the plugin is pickled by value, and a
        # plain `dask worker` cannot import the tests' modules until setup() puts them on its path)
        from dask_fixtures import SlowFakeDenoiser

        from engine_harness import install_fake_runtime

        install_fake_runtime(job, SlowFakeDenoiser(delay=delay))

    def setup(self, worker: object) -> None:
        if TESTS_DIR not in sys.path:
            sys.path.insert(0, TESTS_DIR)
        from dask_fixtures import SlowFakeDenoiser

        from engine_harness import install_fake_runtime

        install_fake_runtime(self.job, SlowFakeDenoiser(delay=self.delay))


class OpenClipArchPlugin(WorkerPlugin):
    """Registers the tiny open_clip architecture in a worker process (open_clip keeps its model
    configs per process), writing its config under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def setup(self, worker: object) -> None:
        if TESTS_DIR not in sys.path:
            sys.path.insert(0, TESTS_DIR)
        from verifier_fixtures import register_tiny_clip

        register_tiny_clip(Path(self.folder))

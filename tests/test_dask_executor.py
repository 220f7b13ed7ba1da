"""The Dask executor on real clusters of worker processes (kept to 1-2 workers of one thread).

The fake denoiser is registered inside the worker processes by a worker plugin
(tests/dask_fixtures.py); everything else (engine, store, scheduler, workers, plugins) is real.
One 2-worker LocalCluster is shared by the module and reached by address, like a cluster someone
else started; the tests that are about starting clusters start their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from dask_fixtures import FakeRuntimePlugin, OpenClipArchPlugin, SlowFakeDenoiser
from distributed import LocalCluster
from distributed.system import MEMORY_LIMIT
from verifier_fixtures import register_tiny_clip, write_open_clip_checkpoint

from diffsearch import runtime
from diffsearch.api import run_job
from diffsearch.dask_executor import RUNTIME_PLUGIN, ClusterError, DaskExecutor
from diffsearch.errors import DiffsearchError
from diffsearch.executor import LocalExecutor
from diffsearch.job import Job
from diffsearch.runtime import RuntimeSpec, get_runtime
from diffsearch.store import RunStore
from engine_harness import comparable, fake_job, png_bytes, run_fake
from tiny_pipelines import tiny_sd_pipeline

DASK = Path(sys.executable).with_name("dask")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as local:
        yield local


def latents(run_dir: Path, prompts: int, candidates: int) -> list[np.ndarray]:
    store = RunStore.open(run_dir / "store.zarr", writable=False)
    return [store.read_latents(p, range(candidates), final=final).numpy()
            for p in range(prompts) for final in (False, True)]


def assert_same_run(run_dir: Path, reference: Path, *, prompts: int, candidates: int) -> None:
    assert comparable(run_dir) == comparable(reference)
    assert png_bytes(run_dir) == png_bytes(reference)
    for ours, theirs in zip(latents(run_dir, prompts, candidates),
                            latents(reference, prompts, candidates), strict=True):
        assert np.array_equal(ours, theirs)


def fake_plugins(job: Job, delay: float = 0.0) -> list[FakeRuntimePlugin]:
    return [FakeRuntimePlugin(job, delay=delay)]


def run_in_process(job: Job, out: Path) -> None:
    run_fake(job, out, executor=LocalExecutor(), denoiser=SlowFakeDenoiser())


def test_same_bits_in_process_and_on_one_or_two_workers(tmp_path: Path, cluster: LocalCluster,
                                                        capsys: pytest.CaptureFixture) -> None:
    job = fake_job(prompts=["a red circle on the left", "two blue squares"], budget="8x",
                   batch_size=3)
    run_in_process(job, tmp_path / "local")

    profile = tmp_path / "dask-profile.html"
    with DaskExecutor(workers=1, threads=1, dashboard_address="127.0.0.1:0",
                      profile=str(profile), worker_plugins=fake_plugins(job)) as own:
        one = run_job(job, tmp_path / "one", executor=own)
        assert own.concurrency() == 1  # a CPU worker's two stages would share its cores
        # Ctrl-C reaches the whole process group; our own workers leave it to the driver
        pids = own.client.run(os.getpid)
        for pid in pids.values():
            os.kill(pid, signal.SIGINT)
        time.sleep(1)
        assert own.client.run(os.getpid) == pids
        assert set(own.client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
    with DaskExecutor(scheduler=cluster.scheduler_address, workers=2,
                      worker_plugins=fake_plugins(job)) as shared:
        two = run_job(job, tmp_path / "two", executor=shared)
    assert cluster.status.name == "running"  # a cluster reached by address is not ours to close

    assert one.executor.startswith("dask local cluster at tcp://127.0.0.1:")
    assert "1 worker(s)" in one.executor and "2 worker(s)" in two.executor
    assert "dashboard http://127.0.0.1:" in capsys.readouterr().err
    assert "denoise" in profile.read_text()  # the report shows our task prefix
    for run in ("one", "two"):
        assert_same_run(tmp_path / run, tmp_path / "local", prompts=2, candidates=8)


def test_a_killed_worker_does_not_change_the_results(tmp_path: Path,
                                                     cluster: LocalCluster) -> None:
    job = fake_job(budget="12x", batch_size=2, seed=3)
    run_in_process(job, tmp_path / "local")
    killed: list[tuple[int, list[str]]] = []

    with DaskExecutor(scheduler=cluster.scheduler_address, workers=2,
                      worker_plugins=fake_plugins(job, delay=0.5)) as executor:

        def kill_a_busy_worker(event: object) -> None:
            if killed:
                return
            client = executor.client
            address, keys = next((w, k) for w, k in client.processing().items() if k)
            pid = client.run(os.getpid, workers=[address])[address]
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, list(keys)))

        run_job(job, tmp_path / "dask", executor=executor, on_progress=kill_a_busy_worker)
        (pid, keys), = killed
        client = executor.client
        assert any(key.startswith("denoise-p0-") for key in keys)
        client.wait_for_workers(2, timeout=60)
        pids = client.run(os.getpid)
        assert pid not in pids.values()
        # the restarted worker got both plugins again, so it holds the runtime
        plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
        assert all(RUNTIME_PLUGIN in names for names in plugins.values())
    assert_same_run(tmp_path / "dask", tmp_path / "local", prompts=1, candidates=12)


def test_an_interrupted_run_resumes_to_the_same_results(tmp_path: Path,
                                                        cluster: LocalCluster) -> None:
    job = fake_job(budget="12x", batch_size=2, seed=4)
    run_in_process(job, tmp_path / "local")

    def interrupt(event: object) -> None:
        raise KeyboardInterrupt

    with DaskExecutor(scheduler=cluster.scheduler_address, workers=2,
                      worker_plugins=fake_plugins(job, delay=0.3)) as executor:
        with pytest.raises(KeyboardInterrupt):
            run_job(job, tmp_path / "dask", executor=executor, on_progress=interrupt)
        finished = len(RunStore.open(tmp_path / "dask" / "store.zarr", writable=False)
                       .finished_candidates(0))
        assert 0 < finished < 12
        # the same executor runs the resumed job: the stopped run's batches were dropped
        result = run_job(job, tmp_path / "dask", executor=executor, resume=True)
    assert result.nfe == 12 * 10
    assert_same_run(tmp_path / "dask", tmp_path / "local", prompts=1, candidates=12)


def test_a_raising_verifier_fails_one_candidate_not_the_run(tmp_path: Path,
                                                            cluster: LocalCluster) -> None:
    reference, _ = run_fake(fake_job(budget="8x"), tmp_path / "ref", executor=LocalExecutor())
    rewards = sorted(c.reward for c in reference.prompts[0].candidates)
    threshold = (rewards[-1] + rewards[-2]) / 2  # only the reddest candidate makes it raise

    job = fake_job(budget="8x", verifier={"name": "fails-on-bright", "threshold": threshold})
    with DaskExecutor(scheduler=cluster.scheduler_address,
                      worker_plugins=fake_plugins(job)) as executor:
        result = run_job(job, tmp_path / "run", executor=executor)
    failed = [c for c in result.prompts[0].candidates if c.error]
    assert len(failed) == 1 and "too bright" in failed[0].error
    assert result.prompts[0].best.reward == rewards[-2]


def test_a_real_pipeline_and_verifier_loaded_once_per_worker(tmp_path: Path,
                                                             cluster: LocalCluster) -> None:
    arch = register_tiny_clip(tmp_path / "clip-configs")
    checkpoint = write_open_clip_checkpoint(tmp_path / "clip.pt", seed=0)
    job = Job.model_validate({
        "prompts": ["a red circle on the left"], "model": str(tiny_sd_pipeline(tmp_path)),
        "verifier": {"name": "clip", "arch": arch, "pretrained": str(checkpoint)},
        "eval_verifiers": ["shapes-oracle"], "budget": "6x", "batch_size": 2, "threads": 1,
    })
    run_job(job, tmp_path / "local", executor=LocalExecutor())

    spec = RuntimeSpec.from_job(job)
    clip_configs = OpenClipArchPlugin(tmp_path / "worker-clip-configs")
    with DaskExecutor(scheduler=cluster.scheduler_address, workers=2,
                      worker_plugins=[clip_configs]) as executor:
        executor.start(spec)
        # the plugin loaded the model on every worker before any batch ran, and it is kept
        loaded = executor.client.run(lambda: spec in runtime._RUNTIMES)
        assert list(loaded.values()) == [True, True]
        before = executor.client.run(lambda: id(get_runtime(spec)))
        result = run_job(job, tmp_path / "dask", executor=executor)
        assert executor.client.run(lambda: id(get_runtime(spec))) == before
    assert result.prompts[0].best.scores.keys() == {"clip", "shapes-oracle"}
    assert_same_run(tmp_path / "dask", tmp_path / "local", prompts=1, candidates=6)


def test_plain_dask_workers_on_an_external_scheduler_get_the_plugin_and_gpu_tasks(
        tmp_path: Path) -> None:
    """`dask scheduler` and two `dask worker`s, one advertising GPU=1: the plugin reaches both,
    and every batch runs on the GPU worker."""
    scheduler_file = tmp_path / "scheduler.json"
    common = ["--no-dashboard"]
    processes = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                   "--scheduler-file", scheduler_file,
                                   "--dashboard-address", "127.0.0.1:0", *common])]
    try:
        deadline = time.monotonic() + 30
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for name, extra in (("gpu", ["--resources", "GPU=1"]), ("cpu", [])):
            processes.append(subprocess.Popen([DASK, "worker", address, "--nthreads", "1",
                                               "--name", name, *extra, *common]))
        job = fake_job(budget="6x", batch_size=2)
        run_in_process(job, tmp_path / "local")
        with DaskExecutor(scheduler=address, workers=2,
                          worker_plugins=fake_plugins(job)) as executor:
            result = run_job(job, tmp_path / "dask", executor=executor)
            spec = RuntimeSpec.from_job(job)
            calls = executor.client.run(lambda: len(get_runtime(spec).denoiser.calls))
            names = executor.client.run(lambda dask_worker: dask_worker.name)
        assert "GPU=0.5 per unit" in result.executor  # the GPU worker's one thread: one at a time
        by_name = {names[address]: count for address, count in calls.items()}
        assert by_name["gpu"] == 3 and by_name["cpu"] == 0
        assert_same_run(tmp_path / "dask", tmp_path / "local", prompts=1, candidates=6)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def test_one_worker_per_gpu_each_sees_only_its_own(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA machine the default cluster has one GPU=1 worker per visible device, with a task
    thread per pipeline stage; here the driver is told it sees devices 3 and 5 (the workers never
    touch CUDA: the model is fake)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    job = fake_job(budget="4x")
    with DaskExecutor(dashboard_address=None, worker_plugins=fake_plugins(job)) as executor:
        result = run_job(job, tmp_path / "run", executor=executor)
        devices = executor.client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
        trim = executor.client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_")
        workers = executor.client.scheduler_info()["workers"].values()
        slots = executor.concurrency(), [executor.slots_for_partial_units(n) for n in (0, 1, 2)]
    assert sorted(devices.values()) == ["3", "5"]
    assert set(trim.values()) == {None}  # glibc's adaptive default, not Dask's 65536
    assert [w["resources"] for w in workers] == [{"GPU": 1}, {"GPU": 1}]
    assert [w["nthreads"] for w in workers] == [2, 2]
    assert slots == (4, [2, 1, 0])  # a partial unit only for a worker that would not denoise
    assert all(w["memory_limit"] == int(MEMORY_LIMIT / 2) for w in workers)
    assert "2 worker(s), GPU=0.5 per unit" in result.executor


def test_an_unreachable_scheduler_is_one_clear_error() -> None:
    executor = DaskExecutor(scheduler="tcp://127.0.0.1:9", connect_timeout=1)
    with pytest.raises(ClusterError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0"):
        executor.start(RuntimeSpec.from_job(fake_job()))
    executor.close()
    executor.close()


def test_a_model_that_cannot_load_fails_at_start_in_one_line(
        tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """The workers' load error reaches the driver as itself, before any work is queued, and
    the workers do not print a traceback each (their output goes to this test's stderr)."""
    job = fake_job(model=str(tmp_path / "no-such-model"))
    with DaskExecutor(workers=1, threads=1, dashboard_address=None) as executor:
        with pytest.raises(DiffsearchError, match="no-such-model.*does not exist"):
            executor.start(RuntimeSpec.from_job(job))
        # and workers that join later are not left trying to load it
        assert RUNTIME_PLUGIN not in executor.client.run_on_scheduler(
            lambda dask_scheduler: list(dask_scheduler.worker_plugins))
    assert "Traceback" not in capfd.readouterr().err

"""The Python API (diffsearch.search / asearch) on the real engine with the fake runtime."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import diffsearch
from diffsearch.api import SearchCancelled, lineage, run_job
from diffsearch.engine import ProgressEvent
from diffsearch.errors import JobError
from diffsearch.store import CandidateRecord, RunStore
from engine_harness import fake_job, install_fake_runtime

FAKE = {"model": "fake", "verifier": "redness", "threads": 1, "executor": "local"}


@pytest.fixture(autouse=True)
def fake_runtime() -> None:
    install_fake_runtime(fake_job(executor="local"))


def test_import_is_light_and_search_resolves_lazily() -> None:
    code = "\n".join([
        "import sys, diffsearch",
        "heavy = [m for m in ('torch', 'diffusers', 'dask', 'zarr') if m in sys.modules]",
        "assert not heavy, heavy",
        "assert diffsearch.asearch.__module__ == 'diffsearch.api' and 'torch' in sys.modules",
        "assert diffsearch.search.__module__ == 'diffsearch.api'",
        # importing the strategies package does not shadow the API function
        "import diffsearch.strategies.best_of_n as best_of_n",
        "assert diffsearch.search.__module__ == 'diffsearch.api'",
        "assert best_of_n.BestOfN.name in diffsearch.strategies.registry.strategy_names()",
    ])
    subprocess.run([sys.executable, "-c", code], check=True)


def test_search_returns_best_images_scores_and_run_folder(tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    result = diffsearch.search(["a red circle on the left", "two blue squares"], **FAKE,
                               budget="4x", out=tmp_path / "run", batch_size=2,
                               on_progress=events.append)

    assert result.run_dir == tmp_path / "run"
    data = json.loads((result.run_dir / "results.json").read_text())
    assert result.nfe == data["nfe"] == 2 * 4 * 10
    for prompt, saved in zip(result.prompts, data["prompts"], strict=True):
        rewards = [c["reward"] for c in saved["candidates"]]
        assert prompt.best is not None
        assert prompt.best.score == max(rewards) == saved["best"]["score"]
        assert prompt.best.scores == {"redness": prompt.best.score}
        assert prompt.best.lineage == (prompt.best.candidate,)  # best-of-N has no parents
        assert len(prompt.candidates) == 4
        image = prompt.best.image
        assert isinstance(image, Image.Image) and image.size == (8, 8)  # fake: 4x4 latent x2
        assert image.tobytes() == Image.open(result.run_dir / saved["best"]["image"]).tobytes()
    assert result.scores == [p.best.score for p in result.prompts]
    assert [im.tobytes() for im in result.best_images] == \
        [p.best.image.tobytes() for p in result.prompts]
    assert result.best_image.tobytes() == result.best_images[0].tobytes()
    # progress: one event per batch of 2, NFEs add up to the total
    assert [e.nfe_done for e in events] == sorted(e.nfe_done for e in events)
    assert events[-1].nfe_done == events[-1].nfe_total == 80 and len(events) == 4


def test_search_without_out_uses_a_fresh_folder_under_the_runs_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFSEARCH_RUNS", str(tmp_path / "runs"))
    first = diffsearch.search("a red circle", **FAKE, budget="2x")
    second = diffsearch.search("a red circle", **FAKE, budget="2x")
    assert first.run_dir.parent == second.run_dir.parent == tmp_path / "runs"
    assert first.run_dir != second.run_dir
    assert first.run_dir.name.startswith("a-red-circle-")
    assert (first.run_dir / "results.json").is_file()
    assert first.scores == second.scores  # same job, same seed: same results


def test_search_validates_like_a_job_file(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"search\(\): budget: 'lots'"):
        diffsearch.search("a", **FAKE, budget="lots", out=tmp_path / "x")
    with pytest.raises(JobError, match=r"colour: unknown field"):
        diffsearch.search("a", **FAKE, colour="red", out=tmp_path / "y")


def test_lineage_follows_parents_newest_first() -> None:
    def record(candidate: int, parent: int | None) -> CandidateRecord:
        return CandidateRecord(candidate=candidate, step=10, parent=parent, seed=candidate,
                               reward=0.0, scores={}, nfe=10, verifier_calls=1, error=None,
                               has_final=True)

    records = [record(0, None), record(1, None), record(2, 0), record(3, 2), record(4, 1)]
    assert lineage(records, 3) == (3, 2, 0)
    assert lineage(records, 4) == (4, 1)
    assert lineage(records, 1) == (1,)
    with pytest.raises(ValueError, match="cycle"):
        lineage([record(0, 1), record(1, 0)], 0)


def test_cancel_stops_between_batches_and_the_run_resumes(tmp_path: Path) -> None:
    cancel = threading.Event()
    seen: list[ProgressEvent] = []

    def stop_after_first(event: ProgressEvent) -> None:
        seen.append(event)
        cancel.set()

    job = fake_job(executor="local", budget="8x", batch_size=2)
    with pytest.raises(SearchCancelled):
        run_job(job, tmp_path / "run", on_progress=stop_after_first, cancel=cancel)
    assert len(seen) == 1 and seen[0].nfe_done == 20  # one batch of 2 x 10 steps, then stop
    assert not (tmp_path / "run" / "results.json").exists()

    resumed = run_job(job, tmp_path / "run", resume=True)
    fresh = run_job(job, tmp_path / "fresh")
    assert [c.reward for c in resumed.prompts[0].candidates] == \
        [c.reward for c in fresh.prompts[0].candidates]


def test_asearch_delivers_progress_on_the_loop_in_order(tmp_path: Path) -> None:
    async def main() -> tuple[diffsearch.SearchResult, list[tuple[int, int]], int]:
        loop_thread = threading.get_ident()
        delivered: list[tuple[int, int]] = []

        async def on_progress(event: ProgressEvent) -> None:
            assert threading.get_ident() == loop_thread
            await asyncio.sleep(0)  # awaited before the next event is delivered
            delivered.append((event.nfe_done, threading.get_ident()))

        result = await diffsearch.asearch("a red circle", **FAKE, budget="6x", batch_size=2,
                                          out=tmp_path / "async", on_progress=on_progress)
        return result, delivered, loop_thread

    result, delivered, loop_thread = asyncio.run(main())
    assert [nfe for nfe, _ in delivered] == [20, 40, 60]  # all of them, in order, before return
    assert {thread for _, thread in delivered} == {loop_thread}
    blocking = diffsearch.search("a red circle", **FAKE, budget="6x", out=tmp_path / "sync")
    assert result.scores == blocking.scores


def test_cancelling_asearch_stops_the_engine_thread(tmp_path: Path) -> None:
    async def main() -> list[int]:
        first = asyncio.Event()
        seen: list[int] = []

        def on_progress(event: ProgressEvent) -> None:
            seen.append(event.nfe_done)
            first.set()

        task = asyncio.ensure_future(diffsearch.asearch(
            "a red circle", **FAKE, budget="40x", batch_size=1, out=tmp_path / "run",
            on_progress=on_progress))
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    seen = asyncio.run(main())
    store = RunStore.open(tmp_path / "run" / "store.zarr", writable=False)
    finished = len(store.finished_candidates(0))
    assert 1 <= finished < 40 and seen[0] == 10
    time.sleep(0.3)  # asearch returned after the engine thread stopped: nothing more is added
    assert len(store.finished_candidates(0)) == finished
    assert not (tmp_path / "run" / "results.json").exists()


def test_asearch_callback_error_stops_the_search_and_is_raised(tmp_path: Path) -> None:
    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("ui went away")

    with pytest.raises(RuntimeError, match="ui went away"):
        asyncio.run(diffsearch.asearch("a red circle", **FAKE, budget="40x", batch_size=1,
                                       out=tmp_path / "run", on_progress=broken))
    assert not (tmp_path / "run" / "results.json").exists()

"""Restarts lose nothing: searches are saved in the data dir and come back after the service
stops, gracefully or killed. Running ones come back interrupted and resume without recomputing
a finished candidate, to the results of an uninterrupted run; queued ones run; finished ones are
listed with their results and images.

The first test kills a real ``python -m diffsearch serve`` (the bundled shapes model) with
SIGKILL mid-search; the second stops the in-process service of the harness (the fake runtime)
and covers the resume route's answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from test_service_harness import (
    TOKEN,
    FakeBackend,
    client,
    fake_config,
    read_events,
    serve,
    wait_until_serving,
)

from diffsearch import run_folder
from diffsearch.engine import ProgressEvent
from diffsearch.service import searches
from diffsearch.service.events import EventLog
from diffsearch.service.record_files import RecordFiles
from diffsearch.service.searches import SearchRecord, Status
from diffsearch.store import RunStore
from engine_harness import comparable, fake_job, png_bytes

SHAPES_REQUEST: dict[str, Any] = {
    "prompts": ["a red circle on the left", "two blue squares"], "model": "shapes",
    "verifier": "shapes-clip", "budget": "4x", "num_steps": 10, "seed": 5}
"""2 prompts x 4 samples x 10 steps: 80 NFEs, in work units of 2 samples (20 NFEs each)."""


# ---- helpers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serve_process(data_dir: Path) -> Iterator[tuple[subprocess.Popen[str], httpx.Client]]:
    """``python -m diffsearch serve`` on a free loopback port; killed when the block ends."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSEARCH_")}
    env.update(DIFFSEARCH_TOKEN=TOKEN, HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "diffsearch", "serve", "--port", str(port), "--data-dir",
         str(data_dir), "--executor", "local", "--threads", "1", "--batch-size", "2",
         "--verifier", "shapes-clip", "--log-level", "warning"],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(process, f"http://127.0.0.1:{port}")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            yield process, http
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def poll(http: httpx.Client, search_id: str, until: Any, timeout: float = 120,
         interval: float = 0.1) -> dict[str, Any]:
    """The search's detail once ``until(detail)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        detail = http.get(f"/v1/searches/{search_id}").json()
        if until(detail):
            return detail
        assert time.monotonic() < deadline, f"search {search_id} never got there: {detail}"
        time.sleep(interval)


def status_is(*statuses: str) -> Any:
    return lambda detail: detail["status"] in statuses


def finished_candidates(run_dir: Path) -> dict[tuple[int, int], int]:
    """(prompt, candidate) -> its image's mtime, for every candidate the store has finished
    whose image is written (the driver writes images in the background: a kill may come
    between the two, and the resumed run then renders the image again)."""
    store_path = run_dir / run_folder.STORE
    if not store_path.exists():
        return {}
    store = RunStore.open(store_path, writable=False)
    images = {(p, c.candidate): run_dir / run_folder.candidate_image(p, c.candidate)
              for p in store.prompt_indices() for c in store.finished_candidates(p)}
    return {key: path.stat().st_mtime_ns for key, path in images.items() if path.exists()}


def wait_for_finished(run_dir: Path, timeout: float = 30.0) -> None:
    """Until the store on disk holds a finished candidate: progress events come as the driver
    records outcomes, a moment before its writer thread has them on disk."""
    deadline = time.monotonic() + timeout
    while not finished_candidates(run_dir):
        assert time.monotonic() < deadline, f"nothing finished in {run_dir}"
        time.sleep(0.02)


def image_times(run_dir: Path) -> dict[tuple[int, int], int]:
    """(prompt, candidate) -> mtime of every candidate image in the run folder."""
    return {(int(path.parent.name[1:]), int(path.stem[1:])): path.stat().st_mtime_ns
            for path in (run_dir / run_folder.IMAGES).glob("p*/c*.png")}


def assert_resumed_exactly(run_dir: Path, before: dict[tuple[int, int], int],
                           reference: Path) -> None:
    """The resumed run ends like the uninterrupted ``reference`` and computed only what had not
    finished: the finished candidates' images were never written again, every other one was."""
    assert comparable(run_dir) == comparable(reference)
    assert png_bytes(run_dir) == png_bytes(reference)
    after = image_times(run_dir)
    written = {key for key, mtime in after.items() if before.get(key) != mtime}
    assert written == set(after) - set(before), (sorted(before), sorted(written))


# ---- a real server, killed --------------------------------------------------------------------
def test_a_killed_server_loses_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with serve_process(data_dir) as (process, http):
        created = http.post("/v1/searches", json=SHAPES_REQUEST)
        assert created.status_code == 202, created.text
        interrupted = created.json()["id"]
        queued = http.post("/v1/searches", json=SHAPES_REQUEST).json()["id"]  # the same job
        total = 2 * 4 * 10
        detail = poll(http, interrupted, lambda d: d["progress"]["nfe_done"] > 0)
        wait_for_finished(data_dir / "runs" / interrupted)
        waiting = http.get(f"/v1/searches/{queued}").json()["status"]
        process.send_signal(signal.SIGKILL)
        assert detail["progress"]["nfe_done"] < total, "too late: the search finished"
        assert waiting == "queued"
    run_dir = data_dir / "runs" / interrupted
    before = finished_candidates(run_dir)
    assert 0 < len(before) < 8, before

    with serve_process(data_dir) as (_, http):
        listed = {s["id"]: s for s in http.get("/v1/searches").json()["searches"]}
        assert list(listed) == [interrupted, queued]
        assert listed[interrupted]["status"] == "interrupted"
        assert "resume" in listed[interrupted]["error"]
        assert listed[queued]["status"] in ("queued", "running")  # queued again at start
        resumed = http.post(f"/v1/searches/{interrupted}/resume")
        assert resumed.status_code == 202, resumed.text
        assert resumed.json()["status"] == "queued"
        for search_id in (queued, interrupted):
            assert poll(http, search_id, status_is("done", "failed"))["status"] == "done"
        statuses = [d["status"] for _, kind, d in read_events(http, interrupted)
                    if kind == "status"]
        assert statuses == ["interrupted", "queued", "running", "done"]
    # the queued search ran uninterrupted: the resumed one must end exactly like it
    assert_resumed_exactly(run_dir, before, data_dir / "runs" / queued)

    with serve_process(data_dir) as (process, http):
        for search_id in (interrupted, queued):
            detail = http.get(f"/v1/searches/{search_id}").json()
            assert detail["status"] == "done" and detail["progress"]["nfe_done"] == total
            assert [p["best"]["candidate"] for p in detail["result"]["prompts"]] == \
                [b["candidate"] for b in detail["best"]]
            served = http.get(f"/v1/searches/{search_id}/results.json")
            assert served.json() == json.loads(
                (data_dir / "runs" / search_id / run_folder.RESULTS).read_text())
            best = http.get(detail["result"]["prompts"][1]["best"]["image"])
            assert best.content == (data_dir / "runs" / search_id /
                                    run_folder.best_image(1)).read_bytes()
        again = http.post(f"/v1/searches/{interrupted}/resume")
        assert again.status_code == 409 and "is done" in again.json()["detail"]
        process.send_signal(signal.SIGINT)
        process.wait(30)


# ---- the in-process service, stopped ----------------------------------------------------------
def test_a_stopped_service_comes_back_and_resumes_what_it_stopped(tmp_path: Path) -> None:
    # threads=3: a runtime spec of its own (a slow fake: 0.25 s per denoise call, one candidate
    # of 10 steps per work unit), so the stop lands mid-search
    config = replace(fake_config(tmp_path, threads=3), batch_size=1)
    job = {"prompts": ["a red circle"], "model": "fake", "verifier": "redness",
           "budget": "4x", "seed": 2}
    with serve(config, FakeBackend(delay=0.25)) as url, client(url) as http:
        finished = http.post("/v1/searches", json={**job, "budget": "1x"}).json()["id"]
        poll(http, finished, status_is("done"))
        stopped = http.post("/v1/searches", json=job).json()["id"]
        queued = http.post("/v1/searches", json=job).json()["id"]
        poll(http, stopped, lambda d: d["progress"]["nfe_done"] >= 10, interval=0.02)
    run_dir = config.data_dir / "runs" / stopped
    before = finished_candidates(run_dir)
    assert 0 < len(before) < 4, before
    saved = sorted(p.name for p in (config.data_dir / "searches").iterdir())
    assert saved == [f"{i}.json" for i in (finished, stopped, queued)]  # no temporary files

    with serve(config, FakeBackend(delay=0.25)) as url, client(url) as http:
        listed = [(s["id"], s["status"]) for s in http.get("/v1/searches").json()["searches"]]
        assert listed[:2] == [(finished, "done"), (stopped, "interrupted")]
        assert listed[2][0] == queued and listed[2][1] in ("queued", "running")
        assert http.get(f"/v1/searches/{finished}/results.json").status_code == 200
        assert http.get(f"/v1/searches/{finished}/best/0.png").status_code == 200
        assert http.get(f"/v1/searches/{finished}").json()["result"]["nfe"] == 10

        assert http.post(f"/v1/searches/{queued}/resume").status_code == 409  # not stopped
        assert http.post(f"/v1/searches/{stopped}/cancel").status_code == 409  # nothing runs
        assert http.post(f"/v1/searches/{stopped}/resume").status_code == 202
        for search_id in (queued, stopped):
            poll(http, search_id, status_is("done"))
        assert_resumed_exactly(run_dir, before, config.data_dir / "runs" / queued)

        missing = http.post("/v1/searches/s999999/resume")
        assert missing.status_code == 404 and "s999999" in missing.json()["detail"]
        done = http.post(f"/v1/searches/{finished}/resume")
        assert done.status_code == 409 and "is done" in done.json()["detail"]

        # ids go on from the saved ones; cancelled searches resume only with work to continue
        cancelled = http.post("/v1/searches", json=job).json()["id"]
        assert cancelled == f"s{int(queued[1:]) + 1:06d}"
        without_model = {k: v for k, v in job.items() if k != "model"}
        never_ran_detail = http.post("/v1/searches", json=without_model).json()
        never_ran = never_ran_detail["id"]
        assert never_ran_detail["model"] == never_ran_detail["job"]["model"] == "fake"
        assert http.post(f"/v1/searches/{never_ran}/cancel").json()["status"] == "cancelled"
        refused = http.post(f"/v1/searches/{never_ran}/resume")
        assert refused.status_code == 409 and "nothing to resume" in refused.json()["detail"]
        poll(http, cancelled, lambda d: d["progress"]["nfe_done"] >= 10, interval=0.02)
        assert http.post(f"/v1/searches/{cancelled}/cancel").status_code == 202
        poll(http, cancelled, status_is("cancelled"))
        cancelled_dir = config.data_dir / "runs" / cancelled
        before = finished_candidates(cancelled_dir)
        assert http.post(f"/v1/searches/{cancelled}/resume").status_code == 202
        poll(http, cancelled, status_is("done"))
        assert_resumed_exactly(cancelled_dir, before, config.data_dir / "runs" / queued)


def test_progress_is_saved_at_a_bounded_rate_and_status_changes_always(tmp_path: Path,
                                                                       monkeypatch) -> None:
    files = RecordFiles(tmp_path)
    saved: list[tuple[str, int]] = []
    write = files.save
    monkeypatch.setattr(files, "save", lambda search_id, data: (
        saved.append((data["status"], data["progress"]["nfe_done"])), write(search_id, data)))
    loop = asyncio.new_event_loop()
    try:
        record = SearchRecord(id="s000001", job=fake_job(), model_name="fake",
                              run_dir=tmp_path / "runs" / "s000001", events=EventLog(loop),
                              files=files)
        record.set_status(Status.RUNNING)
        for nfe in range(1, 201):  # 200 events in far less than PROGRESS_SAVE_SECONDS
            record.on_progress(ProgressEvent(nfe_done=nfe, nfe_total=200, prompt_index=0,
                                             outcomes=(), best=None))
        assert saved == [("running", 0)]
        monkeypatch.setattr(searches, "PROGRESS_SAVE_SECONDS", 0.0)  # the interval is over
        record.on_progress(ProgressEvent(nfe_done=201, nfe_total=201, prompt_index=0,
                                         outcomes=(), best=None))
        record.set_status(Status.CANCELLED)
    finally:
        loop.close()
    assert saved == [("running", 0), ("running", 201), ("cancelled", 201)]
    on_disk = json.loads((tmp_path / "searches" / "s000001.json").read_text())
    assert on_disk["status"] == "cancelled" and on_disk["run_dir"] == "runs/s000001"

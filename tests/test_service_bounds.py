"""The service's memory stays bounded however long it runs, over real HTTP: at most
``max_records`` searches that nothing runs in are held (older ones are read back from their
record files when asked for), each event log keeps its newest ``max_events`` (a client that
needs an older event gets a snapshot, never a loop), and each search has at most
``max_event_streams`` event streams open (one more is answered 429)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from test_service_harness import (
    FAKE_REQUEST,
    FakeBackend,
    client,
    fake_config,
    read_events,
    serve,
    serve_app,
    wait_for,
)

from diffsearch.service.app import create_app
from diffsearch.service.events import EventLog


def eventually(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Wait for ``condition`` (a runner thread lets a search go right after its last status)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def submit(http: httpx.Client, **fields: Any) -> str:
    response = http.post("/v1/searches", json={**FAKE_REQUEST, **fields})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


# ---- records ----------------------------------------------------------------------------------
def test_searches_beyond_max_records_leave_memory_and_are_read_back(tmp_path: Path) -> None:
    config = replace(fake_config(tmp_path), max_records=2)
    app = create_app(config, FakeBackend())
    with serve_app(app) as url, client(url) as http:
        manager = app.state.manager
        ids, details, finals = [], {}, {}
        for seed in range(4):
            search_id = submit(http, seed=seed, budget="2x")
            ids.append(search_id)
            details[search_id] = wait_for(http, search_id, "done")
            finals[search_id] = read_events(http, search_id)[-1]
        eventually(lambda: manager.in_memory() == ids[2:])  # the two most recently used

        # every one is listed, and listing does not bring them back into memory
        listed = http.get("/v1/searches").json()["searches"]
        assert [(s["id"], s["status"]) for s in listed] == [(i, "done") for i in ids]
        assert manager.in_memory() == ids[2:]

        # asking for an old one reads it back, exactly as it was; the oldest held one goes
        assert http.get(f"/v1/searches/{ids[0]}").json() == details[ids[0]]
        assert manager.in_memory() == [ids[3], ids[0]]
        assert http.get(f"/v1/searches/{ids[1]}/results.json").status_code == 200
        assert http.get(f"/v1/searches/{ids[1]}/best/0.png").status_code == 200
        assert len(manager.in_memory()) == 2

        # its event ids go on from the saved ones: the final status keeps its id, so a client
        # that had it gets nothing more, and a new one gets the snapshot and the final status
        for search_id in (ids[0], ids[2]):  # read back, and still held
            final = finals[search_id]
            assert read_events(http, search_id, last_event_id=final[0]) == []
            events = read_events(http, search_id)
            assert events[-1] == final
        snapshot = read_events(http, ids[1])[0]
        assert snapshot[1] == "snapshot" and snapshot[0] == finals[ids[1]][0] - 1
        assert snapshot[2]["status"] == "done" and snapshot[2]["nfe_done"] == 20

        # an id that is no search, or no id at all, never reaches the disk: 404
        for name in ("s999999", "..", "s1.json", "searches"):
            assert http.get(f"/v1/searches/{name}").status_code == 404
        assert len(manager.in_memory()) == 2


def test_a_resumed_search_read_back_from_its_file_runs_again(tmp_path: Path) -> None:
    # threads=5: a runtime spec of its own (a slow fake, so the cancel lands mid-search)
    config = replace(fake_config(tmp_path, threads=5), max_records=1, batch_size=1)
    app = create_app(config, FakeBackend(delay=0.05))
    with serve_app(app) as url, client(url) as http:
        manager = app.state.manager
        cancelled = submit(http, budget="4x")
        wait_for(http, cancelled, "running")
        while http.get(f"/v1/searches/{cancelled}").json()["progress"]["nfe_done"] < 10:
            time.sleep(0.02)
        assert http.post(f"/v1/searches/{cancelled}/cancel").status_code == 202
        wait_for(http, cancelled, "cancelled")
        wait_for(http, submit(http, budget="1x"), "done")
        eventually(lambda: cancelled not in manager.in_memory())

        resumed = http.post(f"/v1/searches/{cancelled}/resume")
        assert resumed.status_code == 202 and resumed.json()["status"] == "queued"
        assert wait_for(http, cancelled, "done")["result"]["nfe"] == 40
        statuses = [d["status"] for _, kind, d in read_events(http, cancelled)
                    if kind == "status"]
        assert statuses[-3:] == ["queued", "running", "done"]


# ---- event logs -------------------------------------------------------------------------------
def test_a_capped_event_log_answers_old_ids_with_a_snapshot(tmp_path: Path) -> None:
    config = replace(fake_config(tmp_path), max_events=4, batch_size=1)
    with serve(config) as url, client(url) as http:
        search_id = submit(http, budget="6x")
        detail = wait_for(http, search_id, "done")
        # queued, running, 6 progress events (one per candidate), done: ids 0..8, 5..8 kept
        events = read_events(http, search_id)
        kept = events[1:]
        assert [e[0] for e in kept] == [5, 6, 7, 8]
        assert kept[-1][1:] == ("status", {"status": "done", "error": None})
        snapshot = events[0]
        assert snapshot[:2] == (4, "snapshot")
        assert snapshot[2] == {
            "status": "done", "error": None, "nfe_done": 60, "nfe_total": 60,
            "best": [{"candidate": b["candidate"], "score": b["score"], "nfe": b["nfe"]}
                     for b in detail["best"]]}

        # within the window: only the rest; fallen out of it, or never given: the snapshot
        assert read_events(http, search_id, last_event_id=5) == kept[1:]
        assert read_events(http, search_id, last_event_id=4) == kept
        assert read_events(http, search_id, last_event_id=8) == []
        for gone in (0, 3, 9, 10 ** 12):
            assert read_events(http, search_id, last_event_id=gone) == events, gone


def test_a_follower_that_falls_behind_gets_a_snapshot_then_what_is_kept() -> None:
    async def scenario() -> list[tuple[int, str]]:
        log = EventLog(asyncio.get_running_loop(), max_events=3)
        for index in range(2):
            log.append("progress", {"n": index})
        got: list[tuple[int, str]] = []
        follower = log.follow(-1, lambda: {"now": True})
        got.append(_seen(await anext(follower)))  # event 0 (event 1 is on its way already)
        for index in range(2, 7):  # events 2..6: 0..3 are dropped, 4..6 kept
            log.append("progress", {"n": index})
        log.close()
        got.extend([_seen(event) async for event in follower])
        return got

    assert asyncio.run(scenario()) == [(0, "progress"), (1, "progress"), (3, "snapshot"),
                                       (4, "progress"), (5, "progress"), (6, "progress")]


def _seen(event: Any) -> tuple[int, str]:
    return event.id, event.kind


# ---- event streams ----------------------------------------------------------------------------
def test_event_streams_per_search_are_bounded_and_freed_on_disconnect(tmp_path: Path) -> None:
    # threads=6: a runtime spec of its own (a slow fake: the search runs while streams are open)
    config = replace(fake_config(tmp_path, threads=6, max_event_streams=2), batch_size=1)
    with serve(config, FakeBackend(delay=0.05)) as url, client(url) as http:
        search_id = submit(http, budget="20x")
        wait_for(http, search_id, "running")
        path = f"/v1/searches/{search_id}/events"
        first, second = http.stream("GET", path), http.stream("GET", path)
        with first as one, second as two:
            assert one.status_code == two.status_code == 200
            refused = http.get(path)
            assert refused.status_code == 429, refused.text
            error = refused.json()
            assert error["limit"] == "max_event_streams"
            assert f"search {search_id} has 2 event streams open" in error["detail"]
            other = submit(http, budget="1x")  # another search's streams are not counted
            with http.stream("GET", f"/v1/searches/{other}/events") as three:
                assert three.status_code == 200
        # both closed: the slots come free once the server notices the disconnects
        deadline = time.monotonic() + 10
        while True:
            try:
                with http.stream("GET", path) as response:
                    if response.status_code == 200:
                        break
                    assert response.status_code == 429
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "closed streams kept their slots"
            time.sleep(0.1)
        for stopped in (other, search_id):
            assert http.post(f"/v1/searches/{stopped}/cancel").status_code == 202

"""The service on the Dask backend: one LocalCluster of worker processes for the service's
lifetime, a client of its own per search. Two searches run at once and a cancelled one takes
exactly its own work with it; the answers equal the in-process executor's."""

from __future__ import annotations

from pathlib import Path

import pytest
from dask_fixtures import FakeRuntimePlugin
from distributed import Client
from test_service_harness import FAKE_REQUEST, TOKEN, FakeBackend, client, serve, wait_for

from diffsearch.job import Job
from diffsearch.service.backend import DaskBackend
from diffsearch.service.config import ServiceConfig

FIELDS = {"prompts": ["a"], "model": "fake", "verifier": "redness", "threads": 1}


def test_concurrent_and_cancelled_searches_on_one_cluster(tmp_path: Path) -> None:
    plugin = FakeRuntimePlugin(Job.model_validate(FIELDS), delay=0.03)
    config = ServiceConfig(data_dir=tmp_path / "dask", token=TOKEN, models={"fake": "fake"},
                           verifiers=("redness",), threads=1, executor="dask", workers=2,
                           concurrency=2, batch_size=2)
    backend = DaskBackend(workers=2, scheduler=None, threads=1, concurrency=2,
                          worker_plugins=[plugin])
    with serve(config, backend) as url, client(url) as http:
        doomed = http.post("/v1/searches", json={**FAKE_REQUEST, "budget": "30x"}).json()["id"]
        kept = [http.post("/v1/searches", json={**FAKE_REQUEST, "seed": seed}).json()["id"]
                for seed in (1, 2)]
        wait_for(http, doomed, "running")
        assert http.post(f"/v1/searches/{doomed}/cancel").status_code == 202
        cancelled = wait_for(http, doomed, "cancelled", "done", "failed")
        assert cancelled["status"] == "cancelled", cancelled
        assert cancelled["progress"]["nfe_done"] < 300
        on_dask = {}
        for search_id in kept:
            detail = wait_for(http, search_id, "done", "failed")
            assert detail["status"] == "done", detail
            on_dask[detail["job"]["seed"]] = http.get(
                f"/v1/searches/{search_id}/results.json").json()["prompts"]
        address = backend.scheduler_address
        assert address is not None

    local_config = ServiceConfig(data_dir=tmp_path / "local", token=TOKEN,
                                 models={"fake": "fake"}, verifiers=("redness",), threads=1)
    with serve(local_config, FakeBackend()) as url, client(url) as http:
        for seed, prompts in on_dask.items():
            response = http.post("/v1/searches", json={**FAKE_REQUEST, "seed": seed})
            search_id = response.json()["id"]
            wait_for(http, search_id, "done")
            local = http.get(f"/v1/searches/{search_id}/results.json").json()["prompts"]
            assert local == prompts
    with pytest.raises(OSError):  # the service's cluster went down with it
        Client(address, timeout=2)

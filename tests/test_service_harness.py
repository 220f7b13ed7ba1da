"""Helpers for the service tests: a real uvicorn server on 127.0.0.1 in a background thread,
driven over real HTTP, with searches running on the model-free fake runtime in this process.

(Named test_service_* to sit with the service tests; it holds no tests itself.)
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from diffsearch.job import Job
from diffsearch.runtime import (
    ModelInfo,
    RuntimeSpec,
    WorkerRuntime,
    describe_model,
    register_runtime,
)
from diffsearch.service.app import create_app
from diffsearch.service.backend import LocalBackend
from diffsearch.service.config import Limits, ServiceConfig
from diffsearch.verifiers.base import Verifier, VerifierError
from engine_harness import create_fake_verifier
from fake_denoiser import FakeDenoiser

TOKEN = "test-token-123"
FAKE_REQUEST: dict[str, Any] = {"prompts": ["a red circle on the left"], "model": "fake",
                                "verifier": "redness", "budget": "4x"}


class SlowFakeDenoiser(FakeDenoiser):
    """The fake denoiser, taking ``delay`` seconds per denoise call: room to cancel mid-run."""

    def __init__(self, delay: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay = delay

    def denoise(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.delay)
        return super().denoise(*args, **kwargs)


def create_checked_fake_verifier(spec: str | dict[str, Any], device: str = "cpu") -> Verifier:
    """The fake verifiers, with bad options reported as the registry reports them."""
    try:
        return create_fake_verifier(spec, device)
    except TypeError as error:
        raise VerifierError(f"verifier {spec!r}: bad options: {error}") from None


class FakeBackend(LocalBackend):
    """The in-process backend, with its fake runtime registered for each job's spec on first
    use (the spec the service builds, so everything after that is the real code path).

    Runtimes are per process and keyed by spec: two services alive at once that need different
    fakes (a slow one, to cancel mid-run) must differ in the spec, e.g. in ``threads``.
    """

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay

    def _describe(self, spec: RuntimeSpec, job: Job) -> ModelInfo:
        denoiser = SlowFakeDenoiser(self.delay, num_steps=job.num_steps or 10)
        register_runtime(WorkerRuntime(spec, denoiser, create_checked_fake_verifier))
        return describe_model(spec)


def fake_config(tmp_path: Path, threads: int = 1, **limits: int) -> ServiceConfig:
    return ServiceConfig(data_dir=tmp_path / "data", token=TOKEN, models={"fake": "fake"},
                         verifiers=("redness", "fails-on-bright"), threads=threads,
                         limits=replace(Limits(), **limits))


@contextmanager
def serve(config: ServiceConfig, backend: LocalBackend | None = None) -> Iterator[str]:
    """Run the service on a free loopback port; yield its base URL."""
    with serve_app(create_app(config, backend or FakeBackend())) as url:
        yield url


@contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """Run an app made by ``create_app`` on a free loopback port; yield its base URL (for tests
    that look at ``app.state.manager`` too)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the service did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def client(base_url: str, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=30)


def read_events(http: httpx.Client, search_id: str, *, last_event_id: int | None = None
                ) -> list[tuple[int, str, dict[str, Any]]]:
    """Every server-sent event of a search until the stream ends: (id, kind, data)."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    events: list[tuple[int, str, dict[str, Any]]] = []
    with http.stream("GET", f"/v1/searches/{search_id}/events", headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if not line:
                if fields:
                    events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                fields = {}
                continue
            key, _, value = line.partition(": ")
            fields[key] = value
    return events


def wait_for(http: httpx.Client, search_id: str, *statuses: str, timeout: float = 60
             ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(f"/v1/searches/{search_id}").json()
        if body["status"] in statuses:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"search {search_id} stayed {body['status']}: {body}")
        time.sleep(0.05)


def wait_until_serving(process: subprocess.Popen[str], base_url: str,
                       seconds: float = 60) -> None:
    """Poll ``/v1/health`` of a ``diffsearch serve`` subprocess until it answers (health needs
    no token); fail with the server's stderr if it exits first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{base_url}/v1/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "diffsearch serve did not come up"
        time.sleep(0.2)

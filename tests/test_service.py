"""The HTTP service over real HTTP (uvicorn on 127.0.0.1), searches on the fake runtime."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from test_service_harness import (
    FAKE_REQUEST,
    TOKEN,
    FakeBackend,
    client,
    fake_config,
    read_events,
    serve,
    wait_for,
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> str:
    with serve(fake_config(tmp_path_factory.mktemp("service"))) as url:
        yield url


@pytest.fixture()
def http(service: str) -> httpx.Client:
    with client(service) as http:
        yield http


def submit(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = http.post("/v1/searches", json={**FAKE_REQUEST, **fields})
    assert response.status_code == 202, response.text
    return response.json()


def decode_png(content: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(content))
    image.load()
    assert image.format == "PNG"
    return image


def test_submit_stream_to_the_end_and_fetch_the_best(http: httpx.Client) -> None:
    created = submit(http, prompts=["a red circle", "two blue squares"], budget="6x")
    search_id = created["id"]
    assert created["status"] in ("queued", "running")
    assert created["links"]["events"] == f"/v1/searches/{search_id}/events"

    events = read_events(http, search_id)
    assert [e[0] for e in events] == list(range(len(events)))  # ids in order, none missing
    statuses = [data["status"] for _, kind, data in events if kind == "status"]
    assert statuses == ["queued", "running", "done"]
    progress = [data for _, kind, data in events if kind == "progress"]
    assert [p["nfe_done"] for p in progress] == sorted(p["nfe_done"] for p in progress)
    assert progress[-1]["nfe_done"] == progress[-1]["nfe_total"] == 2 * 6 * 10
    candidates = [c for p in progress for c in p["candidates"]]
    assert sorted((c["prompt_index"], c["candidate"]) for c in candidates) == \
        [(p, c) for p in range(2) for c in range(6)]

    detail = http.get(f"/v1/searches/{search_id}").json()
    assert detail["status"] == "done" and detail["progress"]["nfe_done"] == 120
    results = http.get(f"/v1/searches/{search_id}/results.json").json()
    for index in range(2):
        mine = [c for c in candidates if c["prompt_index"] == index]
        top = max(mine, key=lambda c: c["reward"])
        best = detail["result"]["prompts"][index]["best"]
        saved = results["prompts"][index]["best"]
        assert best["candidate"] == top["candidate"] == saved["candidate"]
        assert best["score"] == top["reward"] and best["lineage"] == [top["candidate"]]
        assert detail["best"][index]["candidate"] == top["candidate"]
        # the plot's history only ever goes up and ends at the best
        history = detail["history"][index]
        assert [s for _, s in history] == sorted(s for _, s in history)
        assert history[-1][1] == top["reward"]

        png = http.get(best["image"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        image = decode_png(png.content)
        assert image.size == (8, 8)  # the fake's 4x4 latent, decoded at 2x
        candidate_png = http.get(top["image"])  # the same pixels (the best names its candidate)
        assert decode_png(candidate_png.content).tobytes() == image.tobytes()
        small = decode_png(http.get(best["image"], params={"size": 4}).content)
        assert small.size == (4, 4)


def test_reconnecting_with_last_event_id_gets_only_the_rest(http: httpx.Client) -> None:
    search_id = submit(http)["id"]
    everything = read_events(http, search_id)
    tail = read_events(http, search_id, last_event_id=1)
    assert tail == everything[2:]


def test_listing_holds_every_search(http: httpx.Client) -> None:
    ids = [submit(http)["id"] for _ in range(2)]
    listed = [s["id"] for s in http.get("/v1/searches").json()["searches"]]
    assert set(ids) <= set(listed) and listed == sorted(listed)
    for search_id in ids:
        wait_for(http, search_id, "done")


def test_a_failing_verifier_fails_candidates_not_the_search(http: httpx.Client) -> None:
    search_id = submit(http, verifier={"name": "fails-on-bright", "threshold": 0.7},
                       budget="6x")["id"]
    events = read_events(http, search_id)
    candidates = [c for _, kind, d in events if kind == "progress" for c in d["candidates"]]
    failed = [c for c in candidates if c["error"]]
    assert failed and all("too bright" in c["error"] for c in failed)
    assert all(c["reward"] is None for c in failed)
    detail = http.get(f"/v1/searches/{search_id}").json()
    assert detail["status"] == "done"
    assert detail["result"]["failed_candidates"] == len(failed)


def test_unknown_search_and_image_are_404(http: httpx.Client) -> None:
    assert http.get("/v1/searches/s999999").status_code == 404
    search_id = submit(http)["id"]
    wait_for(http, search_id, "done")
    missing = http.get(f"/v1/searches/{search_id}/images/0/99.png")
    assert missing.status_code == 404 and "candidate 99" in missing.json()["detail"]
    assert http.get(f"/v1/searches/{search_id}/best/3.png").status_code == 404
    bad = http.get(f"/v1/searches/{search_id}/images/0/x.png")
    assert bad.status_code == 422 and bad.json()["field"] == "candidate"


# ---- auth -------------------------------------------------------------------------------------
def test_wrong_or_missing_token_is_401(service: str) -> None:
    for token in ("nope", None):
        with client(service, token=token) as http:
            for method, path in (("GET", "/v1/searches"), ("GET", "/v1/info"),
                                 ("POST", "/v1/searches"), ("GET", "/v1/searches/s000001/events"),
                                 ("GET", "/v1/searches/s000001/best/0.png")):
                response = http.request(method, path, json=FAKE_REQUEST)
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "token" in response.json()["detail"]
    with client(service, token=None) as http:  # public: liveness, the page, the schema
        assert http.get("/v1/health").json() == {"status": "ok"}
        page = http.get("/")
        assert page.status_code == 200 and "<title>diffsearch</title>" in page.text
        assert http.get("/static/app.js").status_code == 200
        assert "/v1/searches" in http.get("/openapi.json").json()["paths"]


# ---- malformed requests -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        (b'{"prompts": ["a",}', "body", "not valid JSON"),
        (b'["a", "b"]', "body", "JSON object"),
        (b'{"prompts": ["a"], "guidance_scale": NaN}', "body", "NaN"),
        (b"\xff\xfe", "body", "UTF-8"),
        (b'{"prompts": ["a", "\\ud800"]}', "prompts.1", "surrogate"),
        ({"budget": "0x"}, "budget", "0 NFE"),
        ({"prompts": []}, "prompts", "at least 1"),
        ({"prompts": ["  "]}, "prompts", "prompt 0 is empty"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"seed": "one"}, "seed", "integer"),
        ({"budget": "lots"}, "budget", "'lots'"),
        ({"num_steps": 0}, "num_steps", "greater than or equal to 1"),
        ({"strategy": {"name": "annealing"}}, "strategy.name", "unknown strategy 'annealing'"),
        ({"strategy": {"name": "best-of-n", "n": 99}}, "strategy.n", "over the budget"),
        ({"strategy": {"name": "best-of-n", "n": 2.5}}, "strategy.n", "must be an integer"),
        ({"strategy": {"name": "best-of-n", "bogus": 1}}, "strategy.bogus", "unknown option"),
        ({"model": "shapes"}, "model", "not served here"),
        ({"model": "/etc"}, "model", "not served here"),
        ({"model": 3}, "model", "string"),
        ({"verifier": "clip"}, "verifier", "unknown verifier 'clip'"),
        ({"verifier": "/tmp/my-verifier"}, "verifier", "unknown verifier"),
        ({"verifier": {"name": "redness", "label": "../x"}}, "verifier.label", "path"),
        ({"verifier": {"name": "redness", "device": "cuda:7"}}, "verifier.device", "service"),
        ({"eval_verifiers": ["redness", "pickscore"]}, "eval_verifiers.1", "unknown verifier"),
        ({"strategy": {"name": "ttsnap", "verifiers": {"2": "~/x"}}}, "strategy.verifiers.2",
         "path"),
        ({"strategy": {"name": "ttsnap", "verifiers": {"3": "pickscore"}}},  # a pruning step
         "strategy.verifiers.3", "unknown verifier 'pickscore'; this service offers"),
        ({"threads": 64}, "threads", "set by the service"),
        ({"executor": "dask", "scheduler": "tcp://10.0.0.1:8786"}, "executor",
         "set by the service"),
        ({"device": "cuda"}, "device", "set by the service"),
        ({"prompts_file": "/etc/passwd"}, "prompts_file", "reads no files"),
    ],
)
def test_malformed_requests_are_422_naming_the_field(http: httpx.Client, body: Any, field: str,
                                                      fragment: str) -> None:
    if isinstance(body, bytes):
        response = http.post("/v1/searches", content=body,
                             headers={"Content-Type": "application/json"})
    else:
        request = {**FAKE_REQUEST, **body}
        if "prompts_file" in body:
            request.pop("prompts")
        response = http.post("/v1/searches", json=request)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == field, error
    assert fragment in error["detail"], error
    assert "\n" not in error["detail"] and error["limit"] is None


# ---- limits -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> str:
    # threads=2: its own runtime spec, so its slow fake is not the other service's fast one
    config = fake_config(tmp_path_factory.mktemp("strict"), threads=2, max_budget_nfe=50,
                         max_prompts=2, max_prompt_chars=30, max_image_side=6,
                         max_body_bytes=2000, max_queue=1, max_pixels=64 * 64)
    with serve(config, FakeBackend(delay=0.05)) as url:
        yield url


@pytest.mark.parametrize(
    ("fields", "status", "limit", "field"),
    [
        ({"budget": "6x"}, 422, "max_budget_nfe", "budget"),  # 6 x 10 steps = 60 > 50
        ({"budget": 51}, 422, "max_budget_nfe", "budget"),
        ({"budget": "4x", "num_steps": 20}, 422, "max_budget_nfe", "budget"),
        ({"budget": 9 * 10 ** 400}, 422, "max_budget_nfe", "budget"),
        ({"prompts": ["a", "b", "c"]}, 422, "max_prompts", "prompts"),
        ({"prompts": ["a", "x" * 31]}, 422, "max_prompt_chars", "prompts.1"),
        ({"negative_prompt": "x" * 31, "guidance_scale": 5}, 422, "max_prompt_chars",
         "negative_prompt"),
        ({"width": 128, "height": 64}, 422, "max_pixels", "width"),
        ({"height": 72}, 422, "max_pixels", "height"),  # the other side counts as this one
        ({"prompts": ["a" * 20] * 2, "seed": 1, "padding": "p" * 2000}, 413, "max_body_bytes",
         "body"),
    ],
)
def test_every_request_limit_has_its_4xx(strict: str, fields: dict[str, Any], status: int,
                                         limit: str, field: str) -> None:
    with client(strict) as http:
        response = http.post("/v1/searches", json={**FAKE_REQUEST, **fields})
    assert response.status_code == status, response.text
    error = response.json()
    assert error["limit"] == limit and error["field"] == field
    assert limit in error["detail"]


def test_image_size_limit(strict: str) -> None:
    with client(strict) as http:
        search_id = submit(http, budget="1x")["id"]
        wait_for(http, search_id, "done")
        url = f"/v1/searches/{search_id}/best/0.png"
        assert decode_png(http.get(url, params={"size": 6}).content).size == (6, 6)
        response = http.get(url, params={"size": 7})
        assert response.status_code == 422
        assert response.json()["limit"] == "max_image_side"
        assert decode_png(http.get(url).content).size == (8, 8)  # the original is unaffected


def test_queue_limit_then_cancel_queued_and_running(strict: str) -> None:
    with client(strict) as http:
        running = submit(http, budget="5x")["id"]  # 5 x 10 denoise calls of 0.05 s
        wait_for(http, running, "running")
        queued = submit(http, budget="5x")["id"]
        full = http.post("/v1/searches", json=FAKE_REQUEST)
        assert full.status_code == 429 and full.json()["limit"] == "max_queue"
        assert http.get(f"/v1/searches/{queued}").json()["queue_position"] == 0

        cancelled = http.post(f"/v1/searches/{queued}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
        assert [d["status"] for _, k, d in read_events(http, queued) if k == "status"] == \
            ["queued", "cancelled"]

        assert http.post(f"/v1/searches/{running}/cancel").status_code == 202
        events = read_events(http, running)
        assert events[-1][1:] == ("status", {"status": "cancelled", "error": None})
        detail = http.get(f"/v1/searches/{running}").json()
        assert detail["status"] == "cancelled" and detail["progress"]["nfe_done"] < 50
        again = http.post(f"/v1/searches/{running}/cancel")
        assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
        assert http.get(f"/v1/searches/{running}/results.json").status_code == 409
        # the queue is free again, and the cancelled search left nothing running behind it
        assert wait_for(http, submit(http, budget="1x")["id"], "done")["result"]["nfe"] == 10


def test_cancelled_search_does_not_leak_batches_into_the_next(strict: str) -> None:
    with client(strict) as http:
        first = submit(http, budget="5x", seed=1)["id"]
        wait_for(http, first, "running")
        assert http.post(f"/v1/searches/{first}/cancel").status_code == 202
        wait_for(http, first, "cancelled")
        second = submit(http, budget="2x", seed=1)["id"]
        done = wait_for(http, second, "done")
        results = http.get(f"/v1/searches/{second}/results.json").json()
        assert done["result"]["nfe"] == 20 and len(results["prompts"][0]["candidates"]) == 2


# ---- many at once -----------------------------------------------------------------------------
def test_a_burst_of_20_concurrent_submissions_all_finish(service: str) -> None:
    def one(seed: int) -> str:
        with client(service) as http:
            return submit(http, seed=seed, budget="2x")["id"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        ids = list(pool.map(one, range(20)))
    assert len(set(ids)) == 20
    with client(service) as http:
        for seed, search_id in enumerate(ids):
            detail = wait_for(http, search_id, "done", "failed", "cancelled")
            assert detail["status"] == "done", detail
            assert detail["job"]["seed"] == seed and detail["result"]["nfe"] == 20
            results = http.get(f"/v1/searches/{search_id}/results.json").json()
            assert results["job"]["seed"] == seed
        listed = {s["id"] for s in http.get("/v1/searches").json()["searches"]}
        assert set(ids) <= listed


def test_run_folders_are_chosen_by_the_service(tmp_path: Path) -> None:
    config = fake_config(tmp_path)
    with serve(config) as url, client(url) as http:
        search_id = submit(http)["id"]
        wait_for(http, search_id, "done")
    run_dir = config.data_dir / "runs" / search_id
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["job"]["threads"] == 1 and saved["job"]["executor"] == "local"
    # a restarted service continues the numbering instead of reusing a run folder
    with serve(config) as url, client(url) as http:
        assert submit(http)["id"] > search_id


def test_token_compare_is_exact(service: str) -> None:
    with client(service, token=TOKEN + "x") as http:
        assert http.get("/v1/info").status_code == 401
    with client(service, token=TOKEN[:-1]) as http:
        assert http.get("/v1/info").status_code == 401
    with client(service) as http:
        info = http.get("/v1/info").json()
    assert info["auth"] is True and info["models"] == ["fake"]
    assert info["verifiers"] == ["fails-on-bright", "redness"]
    assert "best-of-n" in info["strategies"] and info["limits"]["max_queue"] == 32


@pytest.mark.parametrize(("fields", "field"), [
    ({"width": 50}, "width"),  # not a multiple of the VAE factor (4)
    ({"sampler": "dpm++-2m", "strategy": {"name": "particles"}}, "sampler"),  # cannot resume
    ({"negative_prompt": "blurry", "guidance_scale": 1.0}, "negative_prompt"),  # no CFG pass
])
def test_what_the_models_family_cannot_take_is_refused_before_it_loads(
        tmp_path: Path, fields: dict[str, Any], field: str) -> None:
    """/v1 checks the request against the model's family from its config files: a folder of
    configs without weights is refused with a 422 naming the field, never loaded."""
    from test_generation_settings import config_only_model

    from diffsearch.service.backend import LocalBackend
    from diffsearch.service.config import ServiceConfig

    folder = config_only_model(tmp_path, "StableDiffusionPipeline", vae_levels=3)
    config = ServiceConfig(data_dir=tmp_path / "data", token=TOKEN,
                           models={"configs": str(folder)}, verifiers=("shapes-oracle",),
                           threads=1)
    with serve(config, LocalBackend()) as url, client(url) as http:
        answer = http.post("/v1/searches", json={
            "prompts": ["a red circle on the left"], "model": "configs", **fields})
        assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
        assert http.get("/v1/searches").json()["searches"] == []


def test_an_image_to_video_model_with_a_strategy_that_gives_no_first_frame_is_refused(
        tmp_path: Path) -> None:
    """Best-of-N gives a Wan image-to-video model no first frame: a 422 before queueing, not a
    search that fails once it runs."""
    from tiny_wan import tiny_wan_i2v_pipeline

    from diffsearch.service.backend import LocalBackend
    from diffsearch.service.config import ServiceConfig

    config = ServiceConfig(data_dir=tmp_path / "data", token=TOKEN,
                           models={"i2v": str(tiny_wan_i2v_pipeline(tmp_path))},
                           verifiers=("shapes-video-oracle",), threads=1)
    with serve(config, LocalBackend()) as url, client(url) as http:
        answer = http.post("/v1/searches", json={"prompts": ["a red circle on the left"],
                                                 "model": "i2v"})
        assert answer.status_code == 422 and answer.json()["field"] == "model", answer.text
        assert "image-to-video needs a first frame" in answer.json()["detail"]
        assert http.get("/v1/searches").json()["searches"] == []

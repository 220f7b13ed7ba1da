"""The A1111-compatible routes (/sdapi/v1) over real HTTP, driven by ``webuiapi``, the published
A1111 client, as creative tools drive them: a live server on the fake model (and once on a tiny
real pipeline) with the real engine behind it."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image
from test_service_cli import assert_one_line_error, run_serve
from test_service_harness import TOKEN, FakeBackend, client, fake_config, serve, wait_for

from diffsearch.service.backend import LocalBackend
from diffsearch.service.config import A1111Defaults, ServiceConfig
from tiny_pipelines import tiny_sd_pipeline

PROMPT = "a red circle on the left"
SEARCH = {"diffsearch": {"args": ["best-of-n", "8x", "redness"]}}
"""The script entry choosing the search: 8 samples, scored by the fake's redness verifier."""


def api_for(url: str, password: str | None = TOKEN) -> webuiapi.WebUIApi:
    """webuiapi as a plugin sets it up: host and port, and basic auth (its only kind)."""
    host, port = url.removeprefix("http://").split(":")
    if password is None:
        return webuiapi.WebUIApi(host=host, port=int(port))
    return webuiapi.WebUIApi(host=host, port=int(port), username="krita", password=password)


def decoded(image: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(image)))
    assert picture.format == "PNG"
    picture.load()
    return picture


@pytest.fixture
def live(tmp_path: Path) -> Iterator[str]:
    with serve(fake_config(tmp_path)) as url:
        yield url


def test_txt2img_answers_the_best_candidates_of_a_listed_search(live: str, tmp_path: Path
                                                                ) -> None:
    result = api_for(live).txt2img(prompt=PROMPT, batch_size=2, n_iter=3, steps=4, width=8,
                                   height=8, sampler_name="DDIM", seed=11,
                                   alwayson_scripts=SEARCH)
    assert len(result.images) == 6
    assert all(image.size == (8, 8) for image in result.images)
    info = result.info
    scores, seeds = info["all_scores"], info["all_seeds"]
    assert scores == sorted(scores, reverse=True) and len(set(seeds)) == 6
    search = info["diffsearch"]
    assert search["strategy"] == {"name": "best-of-n"} and search["nfe"] == 32  # 8 x 4 steps
    with client(live) as http:
        listed = {s["id"]: s for s in http.get("/v1/searches").json()["searches"]}
        assert listed[search["search_id"]]["status"] == "done"
        detail = http.get(f"/v1/searches/{search['search_id']}").json()
        assert detail["job"]["seed"] == 11 and detail["job"]["num_steps"] == 4
        assert detail["job"]["sampler"] == "ddim" and detail["job"]["width"] == 8
        results = http.get(f"/v1/searches/{search['search_id']}/results.json").json()
        candidates = results["prompts"][0]["candidates"]
        best = sorted(candidates, key=lambda c: -c["reward"])[:6]
        assert [c["seed"] for c in best] == seeds
        assert [c["reward"] for c in best] == scores
        for image, candidate in zip(result.images, best, strict=True):  # the candidates' PNGs
            served = http.get(f"/v1/searches/{search['search_id']}/images/0/"
                              f"{candidate['candidate']}.png")
            assert served.status_code == 200
            assert Image.open(io.BytesIO(served.content)).tobytes() == image.tobytes()
    assert results["prompts"][0]["best"]["seed"] == seeds[0]


def test_the_search_comes_from_the_script_then_overrides_then_options(live: str) -> None:
    api = api_for(live)
    assert api.get_sd_models()[0]["title"] == "fake"
    assert api.set_options({"diffsearch_budget": "2x", "diffsearch_verifier": "redness"})[
        "diffsearch_budget"] == "2x"
    options = api.get_options()
    assert options == {"sd_model_checkpoint": "fake", "diffsearch_strategy": "best-of-n",
                       "diffsearch_budget": "2x", "diffsearch_verifier": "redness"}
    by_options = api.txt2img(prompt=PROMPT, steps=4, sampler_name="DDIM").info["diffsearch"]
    assert by_options["budget"] == "2x" and by_options["nfe"] == 8
    overridden = api.txt2img(prompt=PROMPT, steps=4, sampler_name="DDIM",
                             override_settings={"diffsearch_budget": "3x"}).info["diffsearch"]
    assert overridden["budget"] == "3x" and overridden["nfe"] == 12
    scripted = api.txt2img(
        prompt=PROMPT, steps=4, sampler_name="DDIM", override_settings={"diffsearch_budget": "3x"},
        alwayson_scripts={"diffsearch": {"args": [{"budget": 20, "strategy": {
            "name": "particles", "potential": "max"}}]}}).info["diffsearch"]
    assert scripted["budget"] == 20 and scripted["strategy"]["name"] == "particles"
    assert api.get_options() == options  # overrides are for their request only


def test_progress_shows_the_best_so_far_and_interrupt_stops_the_search(tmp_path: Path) -> None:
    # a slow fake (its own spec: threads=2) and one candidate per work unit: many progress steps
    config = replace(fake_config(tmp_path, threads=2), batch_size=1)
    with serve(config, FakeBackend(delay=0.15)) as url:
        api = api_for(url)
        answer: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: answer.update(result=api.txt2img(
            prompt=PROMPT, batch_size=3, alwayson_scripts={"diffsearch": {"args": [
                "best-of-n", "16x", "redness"]}}, steps=10, sampler_name="DDIM")))
        worker.start()
        deadline = time.monotonic() + 30
        while True:
            progress = api.get_progress()
            if progress["current_image"] and progress["progress"] > 0:
                break
            assert time.monotonic() < deadline, progress
            time.sleep(0.05)
        assert 0 < progress["progress"] < 1 and progress["state"]["job_count"] == 1
        assert progress["state"]["sampling_steps"] == 160  # 16 samples x 10 steps
        assert decoded(progress["current_image"]).size == (8, 8)
        search_id = progress["state"]["job"]
        assert api.interrupt() == {"interrupted": search_id}
        worker.join(30)
        result = answer["result"]
        assert 1 <= len(result.images) <= 3 and result.info["diffsearch"]["status"] == "cancelled"
        with client(url) as http:
            stopped = wait_for(http, search_id, "cancelled")
        assert stopped["progress"]["nfe_done"] < 160
        assert result.info["all_scores"] == sorted(result.info["all_scores"], reverse=True)
        idle = api.get_progress()
        assert idle["state"]["job_count"] == 0 and idle["current_image"] is None


def test_refused_values_get_a_422_naming_the_field(live: str) -> None:
    api = api_for(live)
    refused = {
        "enable_hr": dict(enable_hr=True),
        "sampler_name": dict(sampler_name="LMS"),
        "scheduler": dict(sampler_name="Euler", scheduler="Karras"),
        "steps": dict(steps=0),
        "width": dict(width=4096, height=4096),  # over max_pixels
        "batch_size": dict(batch_size=4, n_iter=5),  # 20 images, over max_images (16)
        "override_settings.CLIP_stop_at_last_layers": dict(
            override_settings={"CLIP_stop_at_last_layers": 2}),
        "alwayson_scripts.diffsearch.args.1": dict(
            alwayson_scripts={"diffsearch": {"args": ["best-of-n", "lots"]}}),
        "alwayson_scripts.ControlNet": dict(alwayson_scripts={"ControlNet": {"args": [{}]}}),
        "override_settings.diffsearch_verifier": dict(
            override_settings={"diffsearch_verifier": "hpsv2"}),
        "prompt": dict(prompt="  "),
    }
    for field, arguments in refused.items():
        with pytest.raises(RuntimeError) as raised:
            api.txt2img(**{"prompt": PROMPT, **arguments})
        status, text = raised.value.args
        body = json.loads(text)
        assert status == 422 and body["field"] == field, (field, body)
        assert body["error"] == "Unprocessable Entity" and body["detail"].startswith(field)
    with client(live) as http:
        unknown = http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "hr_magic": 1})
        assert unknown.status_code == 422 and unknown.json()["field"] == "hr_magic"
        bad_option = http.post("/sdapi/v1/options", json={"sd_vae": "Automatic"})
        assert bad_option.status_code == 422 and bad_option.json()["field"] == "sd_vae"
        bad_model = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl"})
        assert bad_model.json()["field"] == "sd_model_checkpoint"
        for budget, limit in ((True, None), (5000, "max_budget_nfe")):  # the limit is 2000
            bad_budget = http.post("/sdapi/v1/options", json={"diffsearch_budget": budget})
            assert bad_budget.status_code == 422, bad_budget.text
            assert (bad_budget.json()["field"], bad_budget.json()["limit"]) == (
                "diffsearch_budget", limit)
        assert http.get("/sdapi/v1/options").json()["diffsearch_budget"] == "8x"
        assert http.get("/v1/searches").json()["searches"] == []  # nothing was queued


def test_the_token_is_needed_as_bearer_or_basic_auth(live: str) -> None:
    for route in ("/sdapi/v1/options", "/sdapi/v1/sd-models", "/sdapi/v1/progress"):
        assert httpx.get(live + route).status_code == 401
        assert httpx.get(live + route, auth=("krita", "wrong")).status_code == 401
        assert httpx.get(live + route, auth=("any", TOKEN)).status_code == 200
        assert httpx.get(live + route, headers={"Authorization": f"Bearer {TOKEN}"}
                         ).status_code == 200
    with pytest.raises(RuntimeError) as raised:
        api_for(live, password=None).txt2img(prompt=PROMPT)
    assert raised.value.args[0] == 401 and json.loads(raised.value.args[1])["error"] == \
        "Unauthorized"
    assert httpx.post(live + "/sdapi/v1/interrupt").status_code == 401


def test_a_real_pipeline_s_family_decides_samplers_sizes_and_negative_prompts(tmp_path: Path
                                                                              ) -> None:
    model = tiny_sd_pipeline(tmp_path)  # 16 x 16 images, 4 steps, an SD (UNet) family
    config = ServiceConfig(data_dir=tmp_path / "data", token=TOKEN, models={"tiny": str(model)},
                           verifiers=("shapes-oracle",), threads=1, batch_size=4,
                           a1111=A1111Defaults(budget="4x"))
    with serve(config, LocalBackend()) as url:
        api = api_for(url)
        assert [s["name"] for s in api.get_samplers()] == [
            "DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC"]
        result = api.txt2img(prompt=PROMPT, batch_size=2, width=16, height=16, seed=3,
                             sampler_name="DPM++ 2M", scheduler="Karras")
        assert [image.size for image in result.images] == [(16, 16)] * 2
        assert result.info["sd_model_name"] == "tiny"
        with client(url) as http:
            job = http.get(f"/v1/searches/{result.info['diffsearch']['search_id']}").json()["job"]
        assert job["sampler"] == "dpm++-2m-karras"
        wide = api.txt2img(prompt=PROMPT, width=24, height=16, sampler_name="Euler")
        assert wide.images[0].size == (24, 16) and (wide.info["width"], wide.info["height"]) == (
            24, 16)
        for field, arguments in {
                "width": dict(width=17),  # not a multiple of the VAE factor
                "sampler_name": dict(sampler_name="DPM++ 2M", alwayson_scripts={
                    "diffsearch": {"args": ["particles"]}}),  # a multistep sampler cannot resume
                "negative_prompt": dict(negative_prompt="blurry", cfg_scale=1.0)}.items():
            with pytest.raises(RuntimeError) as raised:
                api.txt2img(prompt=PROMPT, **arguments)
            body = json.loads(raised.value.args[1])
            assert raised.value.args[0] == 422 and body["field"] == field, body
            if field == "sampler_name":  # in A1111's names
                assert "which DPM++ 2M cannot" in body["detail"], body


@pytest.mark.parametrize(("flags", "message"), [
    (["--a1111-strategy", "beam"], "--a1111-strategy.name: unknown strategy 'beam'"),
    (["--a1111-budget", "lots"], "--a1111-budget: 'lots' is not a number of NFEs or 'Nx'"),
    (["--a1111-verifier", "hpsv2", "--verifier", "shapes-clip"],
     "--a1111-verifier: unknown verifier 'hpsv2'; this service offers: shapes-clip"),
])
def test_serve_refuses_a1111_defaults_it_cannot_run(tmp_path: Path, flags: list[str],
                                                    message: str) -> None:
    result = run_serve("--data-dir", str(tmp_path), *flags)
    assert_one_line_error(result, message)


def test_a_search_that_bad_input_fails_is_a_422_and_listed_failed(live: str) -> None:
    # a clip strategy with an image verifier: found by the worker once the search runs
    with pytest.raises(RuntimeError) as raised:
        api_for(live).txt2img(prompt=PROMPT, steps=4, sampler_name="DDIM", alwayson_scripts={
            "diffsearch": {"args": ["linear-clips", "8x", "redness"]}})
    status, text = raised.value.args
    assert status == 422 and "need a video verifier" in json.loads(text)["detail"], text
    with client(live) as http:
        assert [s["status"] for s in http.get("/v1/searches").json()["searches"]] == ["failed"]

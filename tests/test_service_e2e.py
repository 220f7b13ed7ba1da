"""End to end with a real model and a real verifier, nothing faked: a tiny random-weight
StableDiffusionPipeline saved as a diffusers folder (served under an allow-listed name) and the
shapes oracle from the registry. The service's answer must be the Python API's, bit for bit.

(The bundled "shapes" weights are not in the repository yet; this uses the tiny pipeline.)
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from test_service_harness import TOKEN, client, read_events, serve

import diffsearch
from diffsearch.service.backend import LocalBackend
from diffsearch.service.config import ServiceConfig
from tiny_pipelines import tiny_sd_pipeline

PROMPT = "a red circle on the left"


def test_real_pipeline_and_verifier_through_the_service(tmp_path: Path) -> None:
    model = tiny_sd_pipeline(tmp_path)
    config = ServiceConfig(data_dir=tmp_path / "data", token=TOKEN, models={"tiny": str(model)},
                           verifiers=("shapes-oracle",), threads=1, batch_size=2)
    with serve(config, LocalBackend()) as url, client(url) as http:
        created = http.post("/v1/searches", json={
            "prompts": [PROMPT], "model": "tiny", "verifier": "shapes-oracle",
            "budget": "4x", "seed": 7})
        assert created.status_code == 202, created.text
        search_id = created.json()["id"]
        events = read_events(http, search_id)
        assert events[-1][2] == {"status": "done", "error": None}
        progress = [data for _, kind, data in events if kind == "progress"]
        assert len(progress) == 2 and progress[-1]["nfe_done"] == 16  # 4 samples x 4 steps
        detail = http.get(f"/v1/searches/{search_id}").json()
        best = detail["result"]["prompts"][0]["best"]
        png = http.get(best["image"])
        assert png.status_code == 200
        served = Image.open(io.BytesIO(png.content))
        served.load()
        assert served.size == (16, 16) and served.mode == "RGB"

    local = diffsearch.search(PROMPT, model=str(model), verifier="shapes-oracle", budget="4x",
                              seed=7, threads=1, executor="local", out=tmp_path / "api")
    assert local.prompts[0].best is not None
    assert best["candidate"] == local.prompts[0].best.candidate
    assert best["score"] == local.prompts[0].best.score
    assert served.tobytes() == local.best_image.tobytes()
    assert detail["job"]["model"] == "tiny"  # the served name, never the folder

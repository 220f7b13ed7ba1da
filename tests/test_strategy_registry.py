"""Every search strategy by its job-file name, through the real engine, runtime, perturbations
and Zarr store: on the fake denoiser they finish within budget, name a stored best image and
give the same bits whatever the batch size (their options: test_strategy_options.py); on a tiny
real diffusers pipeline (Euler, so the noise scale is not 1) every perturbation runs on real
latents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffsearch.pipelines.base import Denoiser
from diffsearch.pipelines.loading import load_denoiser
from diffsearch.strategies import registry
from engine_harness import fake_job, run_fake
from tiny_pipelines import tiny_sd_pipeline

SEARCHES = {
    "evosearch": {"schedule": [0, 0, 4, 6], "population": [4, 3, 3, 3]},
    "ttsnap": {},
    "zero-order": {"neighbours": 2},
    "paths": {"n": 2},
    "particles": {"particles": 3, "resample_every": 3},
}


def test_every_strategy_is_registered_under_its_job_name() -> None:
    assert set(SEARCHES) <= set(registry.strategy_names())
    for name in SEARCHES:
        assert registry.strategy_class(name).name == name


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_strategy_runs_through_the_engine_bit_for_bit_across_batch_sizes(
        name: str, tmp_path: Path) -> None:
    results = {}
    for batch_size in (8, 1):
        job = fake_job(strategy={"name": name, **SEARCHES[name]}, budget="8x",
                       batch_size=batch_size, images="all")
        out = tmp_path / f"batch{batch_size}"
        result, denoiser = run_fake(job, out)
        assert 0 < result.nfe <= 8 * denoiser.num_steps
        data = json.loads((out / "results.json").read_text())
        (prompt,) = data["prompts"]
        best = prompt["best"]
        assert best is not None and (out / best["image"]).is_file()
        finals = [c["reward"] for c in prompt["candidates"] if c.get("image")]
        assert best["score"] == max(finals)
        results[batch_size] = (result.nfe, prompt["candidates"], best)
    assert results[8] == results[1]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Denoiser]:
    folder = tiny_sd_pipeline(tmp_path_factory.mktemp("sd"), scheduler="euler")
    return folder, load_denoiser(str(folder))


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_default_options_run_on_a_real_pipeline(name: str, tiny_sd: tuple[Path, Denoiser],
                                                tmp_path: Path) -> None:
    folder, denoiser = tiny_sd
    multiple = 16 if name == "evosearch" else 8  # evosearch: enough for step-noise generations
    job = fake_job(model=str(folder), strategy={"name": name}, budget=f"{multiple}x")
    result, _ = run_fake(job, tmp_path / "run", denoiser=denoiser)  # type: ignore[arg-type]
    budget = multiple * denoiser.num_steps
    assert budget * 0.8 < result.nfe <= budget
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["failed_candidates"] == 0
    (prompt,) = data["prompts"]
    assert (tmp_path / "run" / prompt["best"]["image"]).is_file()
    if name == "evosearch":
        assert max(c["step"] for c in prompt["candidates"]) == denoiser.num_steps

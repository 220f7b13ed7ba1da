"""Every search strategy by its job-file name, through the real engine, runtime, perturbations
and Zarr store on the fake denoiser: they finish within budget, name a stored best image, refuse
bad options as job errors, and give the same bits whatever the batch size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffsearch.errors import JobError
from diffsearch.search import registry
from engine_harness import fake_job, run_fake

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
                       batch_size=batch_size)
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


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_unknown_options_are_job_errors_naming_them(name: str, tmp_path: Path) -> None:
    job = fake_job(strategy={"name": name, "colour": "red"})
    with pytest.raises(JobError, match=f"strategy: strategy '{name}' takes no option.*colour"):
        run_fake(job, tmp_path / "run")

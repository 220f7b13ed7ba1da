"""Strategy options are checked in one place: each strategy's ``option_checks``, run when a job
is read (no model needed), so a bad or unknown option fails before anything starts, in one line
naming it (``strategy.<option>: reason``). What needs the model is checked when the strategies
are built, by the one builder the engine and the service share; a strategy's own bug (a
TypeError) is never turned into a user error."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffsearch.cli import main
from diffsearch.errors import JobError
from diffsearch.job import Job, job_from_mapping, load_job
from diffsearch.runtime import ModelInfo
from diffsearch.service.config import ServiceConfig
from diffsearch.service.requests import RequestError, check_against_model
from diffsearch.strategies import registry
from diffsearch.strategies.best_of_n import BestOfN
from diffsearch.strategies.registry import build_strategies
from engine_harness import fake_job, run_fake

NAMES = registry.strategy_names()
OPTIONS = [(name, option) for name in NAMES
           for option in registry.strategy_class(name).option_checks]


def read(tmp_path: Path, strategy_yaml: str) -> Job:
    path = tmp_path / "job.yaml"
    path.write_text(f"prompts: [a red circle]\nstrategy:\n{strategy_yaml}")
    return load_job(path)


@pytest.mark.parametrize("name", NAMES)
def test_every_constructor_option_has_a_check(name: str) -> None:
    cls = registry.strategy_class(name)
    parameters = inspect.signature(cls.__init__).parameters.values()
    keywords = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(cls.option_checks) == keywords


def test_a_fractional_n_fails_when_the_job_is_read(tmp_path: Path) -> None:
    with pytest.raises(JobError) as raised:
        read(tmp_path, "  name: best-of-n\n  n: 2.5\n")
    assert str(raised.value) == f"{tmp_path / 'job.yaml'}: strategy.n: must be an integer, got 2.5"


def test_yaml_yes_does_not_switch_pruning_off(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"strategy\.keep: must be a number, got True$"):
        read(tmp_path, "  name: tree-of-frames\n  keep: yes\n")


@pytest.mark.parametrize(("name", "option"), OPTIONS)
def test_every_option_of_every_strategy_refuses_a_boolean_by_name(
        name: str, option: str, tmp_path: Path) -> None:
    with pytest.raises(JobError, match=rf": strategy\.{option}: must be .*, got True$"):
        read(tmp_path, f"  name: {name}\n  {option}: yes\n")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_options_are_named_with_what_the_strategy_takes(name: str) -> None:
    takes = ", ".join(registry.strategy_class(name).option_checks) or "no options"
    with pytest.raises(JobError, match=re.escape(
            f"job: strategy.colour: unknown option; {name} takes: {takes}")):
        job_from_mapping({"prompts": ["p"], "strategy": {"name": name, "colour": "red"}},
                         source="job", base_dir=Path())


def test_items_of_list_options_are_named(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"strategy\.schedule\.2: must be an integer, got 'x'$"):
        read(tmp_path, "  name: evosearch\n  schedule: [0, 0, x]\n")


def test_checked_options_stay_as_given_in_the_job() -> None:
    """Checking changes no value of the job: its identity (result_key, resume) is as written."""
    job = fake_job(strategy={"name": "particles", "lam": 10, "particles": 3})
    assert job.strategy.options == {"lam": 10, "particles": 3}
    assert isinstance(job.strategy.options["lam"], int)


def test_diffsearch_run_refuses_a_bad_option_before_anything_runs(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("prompts: [a]\nmodel: fake\nstrategy: {name: best-of-n, n: 2.5}\n")
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: {path}: strategy.n: must be an integer, got 2.5"]
    assert not (tmp_path / "out").exists()


# ---- the builder ---------------------------------------------------------------------------------
def test_one_strategy_per_prompt_with_the_budget_in_steps() -> None:
    job = fake_job(prompts=["one", "two"], budget="8x", strategy={"name": "best-of-n"})
    strategies = build_strategies(job, num_steps=10, nfe_per_step=2)
    assert [(s.prompt_index, s.prompt) for s in strategies.values()] == [(0, "one"), (1, "two")]
    assert [s.budget_nfe for s in strategies.values()] == [40, 40]  # 80 NFE, 2 per step
    assert strategies[0].n == 4


def test_checks_that_need_the_model_name_the_option() -> None:
    job = fake_job(budget="8x", strategy={"name": "best-of-n", "n": 9})
    with pytest.raises(JobError) as raised:
        build_strategies(job, num_steps=10, nfe_per_step=1)
    assert str(raised.value) == "strategy.n: 9 samples need 90 NFE, over the budget of 80"
    job = fake_job(budget="8x", strategy={"name": "evosearch", "schedule": [0, 10]})
    with pytest.raises(JobError, match=r"^strategy\.schedule: steps must be below the model's 10"):
        build_strategies(job, num_steps=10, nfe_per_step=1)


def test_a_budget_that_buys_nothing_is_the_strategy_s_refusal() -> None:
    with pytest.raises(JobError, match=r"^strategy: budget of 5 NFE buys no sample of 10 steps$"):
        build_strategies(fake_job(budget=5), num_steps=10, nfe_per_step=1)


class Buggy(BestOfN):
    """A strategy with a bug in its constructor."""

    name = "buggy"

    def __init__(self, **common) -> None:
        super().__init__(**common)
        self.n = len(None)  # type: ignore[arg-type]


@pytest.fixture()
def buggy(monkeypatch: pytest.MonkeyPatch) -> Job:
    monkeypatch.setitem(registry._STRATEGIES, "buggy", f"{__name__}:Buggy")
    return fake_job(strategy={"name": "buggy"})


def test_a_strategy_bug_keeps_its_traceback(buggy: Job, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="NoneType"):
        build_strategies(buggy, num_steps=10, nfe_per_step=1)
    with pytest.raises(TypeError, match="NoneType"):
        run_fake(buggy, tmp_path / "run")


def test_the_service_builds_with_the_same_builder(buggy: Job, tmp_path: Path) -> None:
    config = ServiceConfig(data_dir=tmp_path, token="t" * 32, models={"fake": "fake"})
    info = ModelInfo(num_steps=10, latent_shape=(3, 4, 4), nfe_per_step=1, device="cpu",
                     dtype="float32")
    with pytest.raises(TypeError, match="NoneType"):  # a bug is not the request's fault
        check_against_model(buggy, info, config, ["redness"])
    job = fake_job(budget="8x", strategy={"name": "best-of-n", "n": 9})
    with pytest.raises(RequestError) as raised:
        check_against_model(job, info, config, ["redness"])
    assert raised.value.field == "strategy.n"
    assert raised.value.message == "strategy.n: 9 samples need 90 NFE, over the budget of 80"

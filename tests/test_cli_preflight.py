"""Everyday mistakes on the command line: each is one line, exit status 2, before anything slow
starts (no torch import, no cluster, no model load); a refused run leaves its folder alone; a run
in which every candidate failed exits 1."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_cli import FAKE, assert_one_line_error, invoke, write_job

from diffsearch.job import Job
from engine_harness import install_fake_runtime, run_fake

FAKE_JOB = "prompts: [p]\nmodel: fake\nverifier: redness\nthreads: 1\nbudget: 4x\nexecutor: local\n"


def test_a_job_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(b"prompts: [a]\n\x89PNG\r\n\x1a\n\xff\xfe")
    assert_one_line_error(invoke("run", path, "--out", tmp_path / "out"),
                          "job.yaml", "not a UTF-8 text file")


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--workers", "0"], "--workers:"),
    (["--batch-size", "0"], "--batch-size:"),
])
def test_bad_flag_values_name_the_flag(tmp_path: Path, flags: list[str], fragment: str) -> None:
    path = write_job(tmp_path, "prompts: [a]\n")
    result = invoke("run", path, "--out", tmp_path / "out", *flags)
    assert_one_line_error(result, fragment, "greater than or equal to 1")


def test_generate_names_its_own_flags(tmp_path: Path) -> None:
    result = invoke("generate", "a red circle", "--steps", "0", "--out", tmp_path / "out")
    assert_one_line_error(result, "--steps:")


def _run_cli_in_a_fresh_process(tmp_path: Path, job_text: str) -> dict:
    """Run ``diffsearch run`` in a new interpreter; report its exit code, stderr and whether
    torch or distributed were imported by the time it exited."""
    job = write_job(tmp_path, job_text)
    probe = textwrap.dedent(f"""
        import json, sys
        from click.testing import CliRunner
        from diffsearch.cli import main
        result = CliRunner().invoke(main, ["run", {str(job)!r}, "--out", {str(tmp_path / "out")!r}])
        print(json.dumps({{"code": result.exit_code, "output": result.output,
                          "torch": "torch" in sys.modules,
                          "distributed": "distributed" in sys.modules}}))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_missing_model_is_told_before_torch_or_dask_is_imported(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    seen = _run_cli_in_a_fresh_process(tmp_path, f"prompts: [a]\nmodel: {missing}\n")
    assert seen["code"] == 2, seen
    assert "does not exist" in seen["output"] and str(missing) in seen["output"]
    assert not seen["torch"] and not seen["distributed"]
    assert not (tmp_path / "out").exists()


def test_an_uncached_hub_id_names_the_download_flag_that_exists(tmp_path: Path) -> None:
    seen = _run_cli_in_a_fresh_process(tmp_path, "prompts: [a]\nmodel: some-org/no-model\n")
    assert seen["code"] == 2, seen
    assert "--allow-download" in seen["output"]
    assert "--allow-download" in invoke("run", "--help").output


def test_an_unknown_verifier_is_refused_before_the_executor_starts(tmp_path: Path) -> None:
    result = invoke("run", write_job(tmp_path, "prompts: [a]\nverifier: no-such-judge\n"),
                    "--out", tmp_path / "out")
    assert_one_line_error(result, "unknown verifier 'no-such-judge'")
    assert not (tmp_path / "out").exists()


def test_a_verifier_wrapped_by_another_is_checked_before_the_executor_starts(
        tmp_path: Path) -> None:
    job = ("prompts: [a]\neval_verifiers:\n  - name: shift-average\n"
           "    verifier: {name: ensemble, members: [shapes-clip, no-such-judge]}\n")
    result = invoke("run", write_job(tmp_path, job), "--out", tmp_path / "out")
    assert_one_line_error(result, "eval_verifiers.0: shift-average: verifier: ensemble: "
                                  "members[1]: unknown verifier 'no-such-judge'")
    assert not (tmp_path / "out").exists()


def test_a_refused_resume_leaves_the_run_folder_exactly_as_it_was(tmp_path: Path) -> None:
    job = Job.model_validate({"prompts": ["p"], **FAKE, "budget": "4x"})
    install_fake_runtime(job)
    out = tmp_path / "run"
    assert invoke("run", write_job(tmp_path, FAKE_JOB), "--out", out, "--quiet").exit_code == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    other = write_job(tmp_path, FAKE_JOB + "seed: 7\n")
    assert_one_line_error(invoke("run", other, "--out", out, "--resume", "--quiet"),
                          "different job", "cannot resume")
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before


def test_a_run_whose_every_candidate_failed_exits_1_with_the_first_error(tmp_path: Path) -> None:
    text = FAKE_JOB.replace("verifier: redness", "verifier: {name: fails-on-bright, threshold: -1}")
    job = Job.model_validate({"prompts": ["p"], **FAKE, "budget": "4x",
                              "verifier": {"name": "fails-on-bright", "threshold": -1}})
    install_fake_runtime(job)
    result = invoke("run", write_job(tmp_path, text), "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 1, result.output
    assert "every candidate failed" in result.output and "too bright" in result.output


def test_a_run_with_some_failed_candidates_exits_0_and_counts_them(tmp_path: Path) -> None:
    plain = Job.model_validate({"prompts": ["p"], **FAKE, "budget": "4x", "batch_size": 1})
    rewards = sorted(c.reward for c in run_fake(plain, tmp_path / "plain")[0].prompts[0].candidates)
    threshold = (rewards[1] + rewards[2]) / 2  # the two reddest candidates fail
    verifier = {"name": "fails-on-bright", "threshold": threshold}
    install_fake_runtime(Job.model_validate({**plain.model_dump(), "verifier": verifier}))
    text = FAKE_JOB.replace("verifier: redness", f"verifier: {json.dumps(verifier)}")
    out = tmp_path / "run"  # one candidate per work unit: a failing batch is one candidate
    result = invoke("run", write_job(tmp_path, text + "batch_size: 1\n"), "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "failed candidates: 2;" in result.output
    assert json.loads((out / "results.json").read_text())["failed_candidates"] == 2


def test_the_executor_help_names_the_real_default() -> None:
    assert "else dask" in invoke("run", "--help").output
    assert Job.model_validate({"prompts": ["a"]}).executor == "dask"


def test_save_candidate_images_is_not_accepted_as_if_it_worked(tmp_path: Path) -> None:
    """``images`` says which images are written; the old field is refused, not ignored."""
    path = write_job(tmp_path, "prompts: [a]\nsave_candidate_images: false\n")
    assert_one_line_error(invoke("run", path, "--out", tmp_path / "out"),
                          "save_candidate_images: unknown field")


@pytest.mark.parametrize(("line", "message"), [
    ("guidance_scale: true", "guidance_scale: Input should be a valid number"),
    ("seed: false", "seed: Input should be a valid integer"),
    ("budget: true", "budget"),
    ("num_steps: '20'", "num_steps: Input should be a valid integer"),
])
def test_a_number_field_refuses_booleans_and_strings(tmp_path: Path, line: str,
                                                     message: str) -> None:
    """YAML's true is not 1: a job (or a request body) saying true where a number goes is an
    error, as the OpenAPI schema promises, not a guidance scale of 1."""
    path = write_job(tmp_path, f"prompts: [a]\n{line}\n")
    assert_one_line_error(invoke("run", path, "--out", tmp_path / "out"), message)


def test_a_strategy_that_does_not_fit_the_model_is_refused_before_a_cluster(
        tmp_path: Path) -> None:
    """best-of-n n: 9 on an 8x budget is wrong only given the model's steps: the bundled
    model's config says so, and no cluster is started or model loaded to find out."""
    seen = _run_cli_in_a_fresh_process(
        tmp_path, "prompts: [a]\nbudget: 8x\nstrategy: {name: best-of-n, n: 9}\n")
    assert seen["code"] == 2, seen
    assert "strategy.n: 9 samples need 180 NFE, over the budget of 160" in seen["output"], seen
    assert "local cluster" not in seen["output"]
    assert not (tmp_path / "out").exists()


def test_a_verifier_named_in_strategy_options_is_checked_too(tmp_path: Path) -> None:
    """TTSnap's per-step verifiers reach verifiers as the job's own fields do."""
    path = write_job(tmp_path, "prompts: [a]\nbudget: 8x\n"
                               "strategy: {name: ttsnap, verifiers: {2: no-such-judge}}\n")
    result = invoke("run", path, "--out", tmp_path / "out")
    assert_one_line_error(result, "strategy.verifiers.2: unknown verifier 'no-such-judge'")
    assert not (tmp_path / "out").exists()

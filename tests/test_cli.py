"""The click CLI: exit codes, one-line errors, and the commands end to end on the fake model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffsearch.cli import main
from diffsearch.job import Job
from engine_harness import install_fake_runtime

FAKE = {"model": "fake", "verifier": "redness", "threads": 1, "executor": "local"}


def write_job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("prompts: [a, b\n", ["job.yaml:", "not valid YAML"]),
        ("- just\n- a list\n", ["mapping of fields"]),
        ("prompts: [a]\ncolour: red\n", ["colour: unknown field"]),
        ("prompts: [a]\nbudget: lots\n", ["budget:", "'lots'"]),
        ("prompts: []\n", ["prompts:"]),
        ("prompts: [a]\nseed: one\n", ["seed:"]),
        ("prompts: [a]\nexecutor: spark\n", ["executor:"]),
        ("prompts_file: missing.txt\n", ["missing.txt", "not found"]),
    ],
)
def test_malformed_job_files_exit_2_with_one_line(tmp_path: Path, text: str,
                                                  fragments: list[str]) -> None:
    result = invoke("run", write_job(tmp_path, text), "--out", tmp_path / "out")
    assert_one_line_error(result, *fragments)


def test_missing_job_file(tmp_path: Path) -> None:
    assert_one_line_error(invoke("run", tmp_path / "nope.yaml"), "nope.yaml", "cannot read")


def test_unknown_strategy_is_refused_before_any_work(tmp_path: Path) -> None:
    path = write_job(tmp_path, "prompts: [a]\nstrategy: {name: annealing}\n")
    result = invoke("run", path, "--out", tmp_path / "out")
    assert_one_line_error(result, "strategy.name: unknown strategy 'annealing'", "best-of-n")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # running as root: permissions do not stop us
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "run"  # a folder inside a regular file can never be created
    else:
        out = locked / "run"
    path = write_job(tmp_path, "prompts: [a]\n")
    assert_one_line_error(invoke("run", path, "--out", out), "cannot write to output folder")


def test_generate_then_show(tmp_path: Path) -> None:
    job = Job.model_validate({"prompts": ["a red circle on the left"], **FAKE, "budget": "4x",
                              "strategy": {"name": "best-of-n"}})
    install_fake_runtime(job)
    out = tmp_path / "run"
    result = invoke("generate", "a red circle on the left", "--model", "fake",
                    "--verifier", "redness", "--budget", "4x", "--executor", "local",
                    "--out", out, "--quiet", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "40 NFE" in result.output
    data = json.loads((out / "results.json").read_text())
    assert data["nfe"] == 40 and (out / data["prompts"][0]["best"]["image"]).is_file()

    shown = invoke("show", out, "--json")
    rows = json.loads(shown.output)
    assert rows[0]["score"] == data["prompts"][0]["best"]["score"]
    assert rows[0]["finished"] is True

    again = invoke("generate", "a red circle on the left", "--model", "fake",
                   "--verifier", "redness", "--budget", "4x", "--executor", "local",
                   "--out", out, "--quiet", "--threads", "1")
    assert_one_line_error(again, "already holds a run", "--resume")


def test_show_a_stopped_run_reads_the_store(tmp_path: Path) -> None:
    job = Job.model_validate({"prompts": ["p"], **FAKE, "budget": "4x"})
    install_fake_runtime(job)
    out = tmp_path / "run"
    result = invoke("run", write_job(tmp_path, "prompts: [p]\nmodel: fake\nverifier: redness\n"
                                               "threads: 1\nbudget: 4x\nexecutor: local\n"),
                    "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    (out / "results.json").unlink()  # as if the driver died before writing it
    rows = json.loads(invoke("show", out, "--json").output)
    assert rows[0]["finished"] is False and rows[0]["score"] is not None
    assert (out / rows[0]["image"]).is_file()


def test_show_rejects_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    assert_one_line_error(invoke("show", tmp_path), "not a diffsearch run")

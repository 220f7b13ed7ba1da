"""Packaging facts that must agree: the Python the code needs, and the test lock and scripts."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "test.lock"
MINIMUM_PYTHON = "3.11"
"""The oldest Python the code runs on: it catches asyncio's timeouts as the builtin TimeoutError
(the same class only from 3.11), and the README asks for 3.11."""


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_requires_python_is_the_minimum_the_code_supports(pyproject: dict) -> None:
    allowed = SpecifierSet(pyproject["project"]["requires-python"])
    older = f"3.{int(MINIMUM_PYTHON.split('.')[1]) - 1}"
    assert MINIMUM_PYTHON in allowed and "3.13" in allowed and older not in allowed, allowed
    assert pyproject["tool"]["ruff"]["target-version"] == "py" + MINIMUM_PYTHON.replace(".", "")
    assert f"Python {MINIMUM_PYTHON}" in (ROOT / "README.md").read_text()


def test_the_lock_pins_every_requirement_of_the_test_environment(pyproject: dict) -> None:
    lines = [line for line in LOCK.read_text().splitlines() if line.strip()]
    header = [line for line in lines if line.startswith("#")]
    assert header and "scripts/lock" in " ".join(header)
    pins = {}
    for line in lines[len(header):]:
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"not a name==version pin: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    assert "diffsearch" not in pins
    project = pyproject["project"]
    # pip and the build backend too: scripts/test builds the editable install without isolation
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"],
              *pyproject["build-system"]["requires"], "pip"]
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in {LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])


@pytest.mark.parametrize("script", ["scripts/test", "scripts/lock", ".ci/run"])
def test_scripts_are_executable_bash(script: str) -> None:
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_ci_runs_the_test_command_in_a_venv_keyed_on_the_lock() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "requirements/test.lock" in ci and re.search(r"^VENV=.* bash scripts/test$", ci, re.M)


def _drift_report():  # noqa: ANN202 - a module loaded from its file
    spec = importlib.util.spec_from_file_location("drift_report", ROOT / "scripts/drift_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_drift_report_names_each_moved_package_and_the_pytest_summary() -> None:
    drift_report = _drift_report()
    locked = "# header\ntorch==2.14.1\nzarr==3.1.6\nmatplotlib==3.11.2\nPyYAML==6.0.4\n"
    installed = "torch==2.15.0\nzarr==3.1.6\npyyaml==6.0.4\nnew_dep==1.0\n"
    log = ("..F.\n=== short test summary info ===\nFAILED tests/test_x.py::test_y - boom\n"
           "=== 1 failed, 3 passed in 2.00s ===\n")
    text = drift_report.report(locked, installed, log, 1)
    assert "  torch 2.14.1 -> 2.15.0\n" in text and "  new_dep not locked -> 1.0\n" in text
    assert "not installed by .[test] (the bench extra, or no longer needed): matplotlib\n" in text
    assert "zarr" not in text and "yaml" not in text.lower()  # unchanged, whatever the spelling
    assert "(2 differ)" in text and "pytest exit status 1:" in text
    assert text.endswith("  FAILED tests/test_x.py::test_y - boom\n"
                         "  === 1 failed, 3 passed in 2.00s ===\n")
    clean = drift_report.report(locked, locked, "....\n=== 4 passed in 1.00s ===\n", 0)
    assert "(0 differ):\n  none\n" in clean and "no longer needed): none\n" in clean
    assert clean.endswith("  === 4 passed in 1.00s ===\n")

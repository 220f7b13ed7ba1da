"""Verifier plugins as users ship them: an installed package with an entry point.

The example plugin in ``examples/diffsearch-example-verifier`` is pip-installed (editable, no
deps) into the running environment, then found through ``available_verifiers()``, the CLI group
and a fresh interpreter, and used to score. A broken plugin must be reported by name without
hiding the others.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from verifier_fixtures import write_distribution

from diffsearch.cli_verifiers import verifiers as verifiers_group
from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.registry import available_verifiers, create_verifier

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "diffsearch-example-verifier"
DIST = "diffsearch-example-verifier"


def _editable_paths(dist: metadata.Distribution) -> list[str]:
    """The folders an editable install's .pth file adds to sys.path at interpreter start."""
    paths = []
    for file in dist.files or []:
        if file.name.endswith(".pth"):
            for line in Path(str(dist.locate_file(file))).read_text().splitlines():
                if line and not line.startswith(("#", "import")) and Path(line).is_dir():
                    paths.append(line)
    return paths


@pytest.fixture(scope="module")
def installed_plugin() -> Iterator[metadata.Distribution]:
    """pip-install the example plugin, then let this interpreter see it as a new one would
    (its .pth was not processed when this interpreter started)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-e", str(EXAMPLE)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    importlib.invalidate_caches()
    dist = metadata.distribution(DIST)
    with pytest.MonkeyPatch.context() as patch:
        for path in _editable_paths(dist):
            if path not in sys.path:
                patch.syspath_prepend(path)
        yield dist


def _red_green_grey() -> torch.Tensor:
    images = torch.zeros(3, 3, 16, 16)
    images[0, 0] = 1.0            # pure red
    images[1, 1] = 1.0            # pure green
    images[2] = 0.5               # grey
    return images


def test_example_plugin_is_listed_with_its_distribution(
    installed_plugin: metadata.Distribution,
) -> None:
    (info,) = [i for i in available_verifiers() if i.name == "redness"]
    assert info.source == f"{DIST} {installed_plugin.version}"
    assert info.status == "ok", info.message
    assert info.target == "diffsearch_example_verifier:RednessVerifier"


def test_example_plugin_scores_a_batch(installed_plugin: metadata.Distribution) -> None:
    verifier = create_verifier("redness")
    scores = verifier.score(_red_green_grey(), ["", "", ""])
    assert scores.tolist() == pytest.approx([1.0, -0.5, 0.0])
    assert verifier.describe()["needs_prompt"] is False


def test_example_plugin_takes_job_file_options(installed_plugin: metadata.Distribution) -> None:
    image = torch.zeros(1, 3, 20, 20)
    image[0, 0, 5:15, 5:15] = 1.0  # a red square in the middle of black
    whole = create_verifier({"name": "redness"}).score(image, [""])
    centre = create_verifier({"name": "redness", "centre": 0.5}).score(image, [""])
    assert whole.item() == pytest.approx(0.25) and centre.item() == pytest.approx(1.0)
    with pytest.raises(VerifierError, match=r"centre must be in \(0, 1\]"):
        create_verifier({"name": "redness", "centre": 2})


def test_example_plugin_in_cli_group(installed_plugin: metadata.Distribution) -> None:
    result = CliRunner().invoke(verifiers_group, ["list", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = [r for r in json.loads(result.output) if r["name"] == "redness"]
    assert row["status"] == "ok" and row["source"].startswith(DIST)


def test_fresh_interpreter_finds_and_uses_the_plugin(
    installed_plugin: metadata.Distribution,
) -> None:
    """What a user's next command sees: no sys.path help, just the installed environment."""
    code = ("import torch; from diffsearch.verifiers.registry import create_verifier; "
            "v = create_verifier('redness'); "
            "print(v.score(torch.ones(2, 3, 8, 8) * torch.tensor([1., 0, 0]).view(1, 3, 1, 1),"
            " ['', '']).tolist())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=300, cwd="/")
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1.0, 1.0]


def test_broken_plugin_is_reported_and_others_still_work(
    installed_plugin: metadata.Distribution, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = f"broken_plugin_{tmp_path.name.replace('-', '_')}"
    write_distribution(tmp_path, "broken-plugin", "0.3", {"broken": f"{module}:Broken"},
                       {module: "raise ImportError('needs libfoo 2.0, found 1.4')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))

    infos = {i.name: i for i in available_verifiers()}
    broken = infos["broken"]
    assert broken.status == "error" and broken.source == "broken-plugin 0.3"
    assert "'broken'" in broken.message and "needs libfoo 2.0, found 1.4" in broken.message
    assert infos["redness"].status == "ok" and infos["clip"].status == "ok"

    with pytest.raises(VerifierError, match="'broken'.*cannot be imported.*libfoo"):
        create_verifier("broken")
    assert create_verifier("redness").score(_red_green_grey(), ["", "", ""])[0] == 1.0

    table = CliRunner().invoke(verifiers_group, ["list"])
    assert table.exit_code == 0
    (line,) = [ln for ln in table.output.splitlines() if ln.startswith("broken ")]
    assert "broken-plugin 0.3" in line and "error:" in line and "libfoo" in line

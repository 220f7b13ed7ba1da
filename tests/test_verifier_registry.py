"""The verifier registry: names, plugins through entry points, verifier folders, the CLI group."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from verifier_fixtures import (
    pixel_batch,
    register_tiny_clip,
    write_distribution,
    write_open_clip_checkpoint,
)

from diffsearch.cli_verifiers import verifiers as verifiers_group
from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.clip import ClipVerifier
from diffsearch.verifiers.registry import (
    BUILTINS,
    FOLDER_MANIFEST,
    UnknownVerifierError,
    available_verifiers,
    create_verifier,
)

PROMPTS = ["a red circle", "two blue squares"]

_CONSTANT_PLUGIN = '''
import torch
from diffsearch.verifiers.base import Verifier


class Constant(Verifier):
    name = "constant"
    needs_prompt = False

    def __init__(self, device="cpu", value=1.0, **options):
        super().__init__(device, **options)
        if value < 0:
            raise RuntimeError("value must be >= 0")
        self.value = value

    def score(self, images, prompts):
        return torch.full((images.shape[0],), float(self.value))


class NotAVerifier:
    pass
'''


@pytest.fixture(scope="module")
def arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    return register_tiny_clip(tmp_path_factory.mktemp("open-clip-configs"))


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site folder with one healthy plugin, one whose target is not a Verifier and one that
    tries to take the built-in name ``clip``."""
    site = tmp_path / "site"
    module = f"constant_plugin_{tmp_path.name.replace('-', '_')}"
    write_distribution(site, "constant-plugin", "1.2", {
        "constant": f"{module}:Constant",
        "not-a-verifier": f"{module}:NotAVerifier",
        "clip": f"{module}:Constant",
    }, {module: _CONSTANT_PLUGIN})
    monkeypatch.syspath_prepend(str(site))
    return site


def _by_name(name: str, source: str | None = None):  # noqa: ANN202 - test helper
    return [i for i in available_verifiers()
            if i.name == name and (source is None or i.source == source)]


def test_builtins_are_listed_with_their_source() -> None:
    infos = {i.name: i for i in available_verifiers() if i.source == "built-in"}
    assert set(BUILTINS) <= set(infos)
    assert infos["clip"].status == "ok" and infos["clip"].message == ""
    assert infos["ensemble"].status == "ok"
    assert infos["clip"].target == "diffsearch.verifiers.clip:ClipVerifier"


def test_unknown_name_is_one_line_listing_the_names() -> None:
    with pytest.raises(UnknownVerifierError) as caught:
        create_verifier("no-such-verifier")
    message = str(caught.value)
    assert "\n" not in message and "'no-such-verifier'" in message
    assert "clip" in message and "ensemble" in message and FOLDER_MANIFEST in message
    assert isinstance(caught.value, VerifierError)


def test_plugin_is_found_built_and_given_options(plugin_site: Path) -> None:
    (info,) = _by_name("constant")
    assert info.source == "constant-plugin 1.2" and info.status == "ok"
    verifier = create_verifier({"name": "constant", "value": 3.0, "label": "c3"})
    assert verifier.score(pixel_batch(2, seed=1), PROMPTS).tolist() == [3.0, 3.0]


def test_plugin_problems_are_reported_per_name(plugin_site: Path) -> None:
    (bad,) = _by_name("not-a-verifier")
    assert bad.status == "error" and "not a subclass" in bad.message
    (shadow,) = _by_name("clip", "constant-plugin 1.2")
    assert shadow.status == "error" and "already taken by built-in" in shadow.message
    assert _by_name("clip", "built-in")[0].status == "ok"
    with pytest.raises(VerifierError, match="'not-a-verifier'.*not a subclass"):
        create_verifier("not-a-verifier")


def test_constructor_failures_name_the_verifier(plugin_site: Path) -> None:
    with pytest.raises(VerifierError, match=r"'constant' \(constant-plugin 1.2\) failed to load: "
                                            r"RuntimeError: value must be >= 0"):
        create_verifier({"name": "constant", "value": -1})
    with pytest.raises(VerifierError, match="takes no option.*colour"):
        create_verifier({"name": "constant", "colour": "red"})


def test_malformed_specs() -> None:
    with pytest.raises(VerifierError, match="needs a 'name'.*arch"):
        create_verifier({"arch": "ViT-B-32"})
    with pytest.raises(VerifierError, match="name or a mapping"):
        create_verifier(3)  # type: ignore[arg-type]


def _verifier_folder(root: Path, arch: str) -> Path:
    folder = root / "my-verifier"
    write_open_clip_checkpoint(folder / "weights" / "student.pt", seed=2)
    (folder / FOLDER_MANIFEST).write_text(json.dumps({
        "verifier": "clip",
        "options": {"arch": arch, "pretrained": "weights/student.pt", "chunk": 3},
        "meta": {"trained_at_step": 6},
    }))
    return folder


def test_verifier_folder_is_usable_by_path_and_movable(tmp_path: Path, arch: str) -> None:
    folder = _verifier_folder(tmp_path / "a", arch)
    built = create_verifier(str(folder))
    assert isinstance(built, ClipVerifier) and built.chunk == 3
    # The same chunk as the folder's: scores in chunks of 3 and of the default 8 run other CPU
    # kernels and round differently, so only equal chunks can be compared bit for bit.
    direct = ClipVerifier(arch=arch, pretrained=str(folder / "weights" / "student.pt"), chunk=3)
    images = pixel_batch(2, seed=3)
    assert torch.equal(built.score(images, PROMPTS), direct.score(images, PROMPTS))

    moved = shutil.copytree(folder, tmp_path / "b" / "renamed")
    shutil.rmtree(folder)
    again = create_verifier({"name": str(moved), "chunk": 1})
    assert again.chunk == 1  # job-file options override the folder's
    # another chunk size means other kernels: equal up to rounding, not bit for bit
    torch.testing.assert_close(again.score(images, PROMPTS), direct.score(images, PROMPTS))


def test_bad_verifier_folders_are_explained(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    manifest = folder / FOLDER_MANIFEST
    manifest.write_text(json.dumps({"verifier": "clip", "option": {}}))
    with pytest.raises(VerifierError, match="unknown key.*option"):
        create_verifier(str(folder))
    manifest.write_text(json.dumps({"options": {}}))
    with pytest.raises(VerifierError, match="'verifier' must name"):
        create_verifier(str(folder))
    manifest.write_text("{not json")
    with pytest.raises(VerifierError, match="cannot read it"):
        create_verifier(str(folder))
    manifest.write_text(json.dumps({"verifier": "nope"}))
    with pytest.raises(UnknownVerifierError, match="'nope'"):
        create_verifier(str(folder))


def test_cli_list_table_and_json(plugin_site: Path) -> None:
    runner = CliRunner()
    table = runner.invoke(verifiers_group, ["list"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "STATUS"]
    assert any(line.split()[:3] == ["clip", "built-in", "ok"] for line in lines)
    assert any(line.startswith("constant ") and "constant-plugin 1.2" in line
               and line.rstrip().endswith("ok") for line in lines)
    assert any(line.startswith("not-a-verifier ") and "error:" in line for line in lines)

    as_json = runner.invoke(verifiers_group, ["list", "--json"])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.output)
    constant = next(r for r in rows if r["name"] == "constant")
    assert constant == {"name": "constant", "source": "constant-plugin 1.2", "status": "ok",
                        "target": constant["target"], "message": ""}

"""A candidate's failure is reported once, in proportion: a verifier's user error (it cannot
score this prompt) is its one line, kept with the candidate; a verifier's bug also prints its
traceback, which is what its author needs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import engine_harness
from diffsearch.verifiers.base import Verifier, VerifierError
from engine_harness import fake_job, run_fake


class RefusesPrompts(Verifier):
    name = "refuses-prompts"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise VerifierError(f"refuses-prompts cannot score {prompts[0]!r}")


@pytest.mark.parametrize(("verifier", "traceback_printed", "message"), [
    ("refuses-prompts", False, "cannot score"),
    ({"name": "fails-on-bright", "threshold": -1}, True, "too bright"),
])
def test_a_verifier_error_is_one_line_and_a_bug_keeps_its_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        verifier: str | dict, traceback_printed: bool, message: str) -> None:
    monkeypatch.setitem(engine_harness.FAKE_VERIFIERS, RefusesPrompts.name, RefusesPrompts)
    result, _ = run_fake(fake_job(budget="2x", verifier=verifier), tmp_path / "run")
    errors = [c.error for p in result.prompts for c in p.candidates]
    assert errors and all(message in e for e in errors)
    assert ("Traceback" in capsys.readouterr().err) is traceback_printed

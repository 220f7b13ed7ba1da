"""Verifier calls count what was spent: a judge sampled k times costs k calls per score, and an
ensemble costs what its members do."""

from __future__ import annotations

from pathlib import Path

import pytest

import engine_harness
from diffsearch.verifiers.ensemble import EnsembleVerifier
from engine_harness import RednessVerifier, fake_job, run_fake


class ThreeSampleRedness(RednessVerifier):
    """Redness, priced like a judge sampled three times."""

    name = "three-sample-redness"
    calls_per_score = 3


def test_a_k_sample_judge_costs_k_calls_per_score(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(engine_harness.FAKE_VERIFIERS, ThreeSampleRedness.name,
                        ThreeSampleRedness)
    plain, _ = run_fake(fake_job(budget="4x"), tmp_path / "plain")
    sampled, _ = run_fake(fake_job(budget="4x", verifier=ThreeSampleRedness.name),
                          tmp_path / "sampled")
    assert plain.verifier_calls == 4
    assert sampled.verifier_calls == 3 * plain.verifier_calls


def test_an_ensemble_costs_what_its_members_do() -> None:
    ensemble = EnsembleVerifier(members=["shapes-oracle", {"name": "shapes-oracle", "weight": 2}])
    assert ensemble.calls_per_score == 2

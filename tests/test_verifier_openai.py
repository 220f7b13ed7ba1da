"""The ``openai`` verifier against a real OpenAI-compatible HTTP server on loopback.

The server (tests/openai_server.py) decodes each request's PNG data URL and grades the pixels
under the prompt, so the scores checked here prove which image and prompt each reply belongs
to. Everything goes through the official ``openai`` client over HTTP: concurrency and order,
retries (429 with Retry-After, 5xx, timeouts) and their bounds, the reply cache, the key never
leaving the environment, network opt-in, and a search whose guiding verifier is the endpoint.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from openai_server import JudgeServer
from PIL import Image

from diffsearch.api import run_job
from diffsearch.job import Job
from diffsearch.runtime import RuntimeSpec, WorkerRuntime, register_runtime
from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.openai_judge import (
    RETRY_AFTER_CAP_SECONDS,
    OpenAIJudge,
    retry_after,
)
from diffsearch.verifiers.registry import BUILTINS, create_verifier
from fake_denoiser import FakeDenoiser

KEY_ENV = "DIFFSEARCH_TEST_JUDGE_KEY"
SECRET = "sk-test-Zq81vY3nLw0pRt6uXe"
PROMPTS = ["a red kite", "a green field", "a blue lake"]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server() -> Iterator[JudgeServer]:
    judge_server = JudgeServer(SECRET)
    yield judge_server
    judge_server.close()


@pytest.fixture(autouse=True)
def _fresh(server: JudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.reset()
    monkeypatch.setenv(KEY_ENV, SECRET)


def judge(server: JudgeServer, **options: Any) -> OpenAIJudge:
    defaults = {"model": "test-vlm", "base_url": server.url, "api_key_env": KEY_ENV,
                "allow_network": True, "timeout": 5.0}
    return OpenAIJudge(**(defaults | options))


def solid(colours: torch.Tensor, size: int = 16) -> torch.Tensor:
    """(B, 3, size, size) images of one colour each."""
    return colours[:, :, None, None].expand(-1, -1, size, size).contiguous()


def quantised(colours: torch.Tensor) -> torch.Tensor:
    """The colours as 8-bit pixels carry them, which is what the server sees."""
    return (colours * 255).round() / 255


def colours(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))


def test_scores_come_back_in_input_order_under_concurrency(server: JudgeServer) -> None:
    server.delay = (0.0, 0.15)
    rgb = colours(12, seed=1)
    prompts = [PROMPTS[row % 3] for row in range(12)]
    verifier = judge(server, max_concurrency=6, weights={"prompt_accuracy": 1})
    scores = verifier.score(solid(rgb), prompts)
    expected = torch.stack([10 * quantised(rgb)[row, row % 3] for row in range(12)])
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert 1 < server.peak_in_flight <= 6 and server.requests == 12
    # the default weights: the mean of all four aspects, 10 x the mean pixel for "red" prompts
    both = judge(server).score(solid(rgb[:3]), ["a red kite"] * 3)
    torch.testing.assert_close(both, 10 * quantised(rgb[:3]).mean(1), rtol=0, atol=1e-5)


def test_usage_counts_requests_and_the_tokens_the_endpoint_reported(server: JudgeServer) -> None:
    verifier = judge(server)
    verifier.score(solid(colours(3, seed=2)), PROMPTS)
    assert verifier.usage() == {"requests": 3, "retries": 0, "cache_hits": 0,
                                "prompt_tokens": server.prompt_tokens,
                                "completion_tokens": server.completion_tokens}
    assert server.prompt_tokens > 3 * 85 and server.completion_tokens >= 3


def test_padded_rows_are_asked_once(server: JudgeServer) -> None:
    rgb = colours(2, seed=3)
    images = solid(torch.cat([rgb, rgb[-1:].expand(2, 3)]))  # the runtime pads by repetition
    scores = judge(server).score(images, ["a red kite", "a blue lake", "a blue lake",
                                          "a blue lake"])
    assert server.requests == 2 and scores[1] == scores[2] == scores[3]


def test_yes_probability_is_the_mass_of_the_yes_alternatives(server: JudgeServer) -> None:
    rgb = colours(4, seed=4)
    verifier = judge(server, mode="yes-probability", max_concurrency=2)
    scores = verifier.score(solid(rgb), ["a red kite"] * 4)
    torch.testing.assert_close(scores, quantised(rgb)[:, 0], rtol=1e-6, atol=0)
    sent = server.bodies[0]
    assert (sent["logprobs"], sent["top_logprobs"], sent["max_tokens"]) == (True, 20, 1)
    assert 'Does this image show "a red kite"?' in sent["messages"][0]["content"][1]["text"]


def test_an_endpoint_without_logprobs_is_told_to_use_rubric(server: JudgeServer) -> None:
    server.logprobs = False
    with pytest.raises(VerifierError) as caught:
        judge(server, mode="yes-probability").score(solid(colours(1, seed=5)), PROMPTS[:1])
    message = str(caught.value)
    assert "returned no logprobs" in message and "use mode: rubric" in message
    assert "\n" not in message


def test_a_429_with_retry_after_is_waited_out_then_retried(server: JudgeServer) -> None:
    server.faults = [(429, {"Retry-After": "1"})]
    verifier = judge(server)
    started = time.monotonic()
    scores = verifier.score(solid(colours(1, seed=6)), PROMPTS[:1])
    assert time.monotonic() - started >= 1.0  # the backoff alone would wait at most 0.5 s
    assert torch.isfinite(scores).all() and server.requests == 2
    assert verifier.usage()["requests"] == 2 and verifier.usage()["retries"] == 1


def test_a_500_is_retried_after_a_backoff(server: JudgeServer) -> None:
    server.faults = [(500, {})]
    verifier = judge(server)
    rgb = colours(1, seed=7)
    scores = verifier.score(solid(rgb), PROMPTS[:1])
    torch.testing.assert_close(scores, 10 * quantised(rgb).mean(1), rtol=0, atol=1e-5)
    assert server.requests == 2 and verifier.usage()["retries"] == 1


def test_retries_are_bounded(server: JudgeServer) -> None:
    server.faults = [(503, {})] * 10
    with pytest.raises(VerifierError) as caught:
        judge(server, max_retries=2).score(solid(colours(1, seed=8)), PROMPTS[:1])
    assert "HTTP 503 from" in str(caught.value) and "(3 attempts)" in str(caught.value)
    assert server.requests == 3


def test_a_timeout_fails_its_candidate_alone_after_bounded_retries(server: JudgeServer) -> None:
    verifier = judge(server, timeout=0.3, max_retries=1, max_concurrency=3)
    images, prompts = solid(colours(3, seed=9)), ["a red kite", "SLOW a green field",
                                                  "a blue lake"]
    started = time.monotonic()
    with pytest.raises(VerifierError) as caught:
        verifier.score(images, prompts)
    assert time.monotonic() - started < 1.8  # 2 x 0.3 s and one backoff of at most 0.5 s
    message = str(caught.value)
    assert message.startswith("openai: row 1: no reply from http://127.0.0.1:")
    assert "within timeout 0.3 s (2 attempts) (1 of 3 rows failed)" in message
    assert "\n" not in message
    assert server.requests == 4
    # the runtime then scores the chunk row by row: the others' replies are remembered
    for row in (0, 2):
        assert torch.isfinite(verifier.score(images[row:row + 1], prompts[row:row + 1])).all()
    assert server.requests == 4 and verifier.usage()["cache_hits"] == 2


def test_an_unparseable_reply_fails_its_candidate_with_the_reply_quoted(
        server: JudgeServer) -> None:
    with pytest.raises(VerifierError) as caught:
        judge(server).score(solid(colours(2, seed=10)), ["a red kite", "GARBLE"])
    assert "row 1: the judge's reply holds no JSON object: 'I would rather not grade" \
        in str(caught.value)


@pytest.mark.parametrize(("combine", "expected"), [("mean", 5.0), ("majority", 3.0)])
def test_samples_are_separate_requests_combined(server: JudgeServer, combine: str,
                                                expected: float) -> None:
    verifier = judge(server, samples=3, temperature=0.7, combine=combine,
                     weights={"overall": 1})
    scores = verifier.score(solid(colours(2, seed=11)), PROMPTS[:2])
    assert scores.tolist() == [expected, expected]
    assert verifier.calls_per_score == 3 and server.requests == 6
    assert {body["temperature"] for body in server.bodies} == {0.7}


def test_the_cache_makes_a_repeated_run_free(server: JudgeServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    images = solid(colours(4, seed=12))
    prompts = [PROMPTS[row % 3] for row in range(4)]
    first = judge(server, cache_dir=str(cache), samples=2, temperature=0.5)
    scores = first.score(images, prompts)
    assert server.requests == 8
    again = judge(server, cache_dir=str(cache), samples=2, temperature=0.5)
    assert torch.equal(again.score(images, prompts), scores)
    assert server.requests == 8
    assert again.usage() == {"requests": 0, "retries": 0, "cache_hits": 8, "prompt_tokens": 0,
                             "completion_tokens": 0}
    files = sorted(cache.rglob("*"))
    assert len([f for f in files if f.suffix == ".json"]) == 8
    assert not [f for f in files if f.name.endswith(".tmp")]  # atomic writes leave none
    # another model or question is another request
    judge(server, cache_dir=str(cache), model="other-vlm", samples=2,
          temperature=0.5).score(images[:1], prompts[:1])
    assert server.requests == 10


def test_the_key_is_never_written_nor_in_errors(server: JudgeServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    verifier = judge(server, cache_dir=str(cache))
    verifier.score(solid(colours(2, seed=13)), PROMPTS[:2])
    assert SECRET not in json.dumps(verifier.describe())
    assert all(SECRET.encode() not in f.read_bytes() for f in cache.rglob("*") if f.is_file())
    # a server that echoes the key it was given (here a wrong one) in its 401
    wrong = SECRET[::-1]
    monkeypatch.setenv(KEY_ENV, wrong)
    with pytest.raises(VerifierError) as caught:
        judge(server, cache_dir=str(cache)).score(solid(colours(1, seed=14)), PROMPTS[:1])
    message = str(caught.value)
    assert "HTTP 401" in message and "Incorrect API key provided: ***" in message
    assert wrong not in message and "(1 attempt)" in message  # a 401 is not retried
    assert server.requests == 3


def test_a_search_judged_by_the_endpoint_keeps_the_key_out_of_the_run_folder(
        server: JudgeServer, tmp_path: Path) -> None:
    spec = {"name": "openai", "model": "test-vlm", "base_url": server.url,
            "api_key_env": KEY_ENV, "allow_network": True, "max_concurrency": 4,
            "weights": {"overall": 1}, "cache_dir": str(tmp_path / "cache")}
    job = Job.model_validate({"prompts": ["a red kite"], "model": "fake", "verifier": spec,
                              "budget": "4x", "threads": 1, "executor": "local"})
    register_runtime(WorkerRuntime(RuntimeSpec.from_job(job), FakeDenoiser(num_steps=10),
                                   create_verifier))
    out = tmp_path / "run"
    result = run_job(job, out)
    data = json.loads((out / "results.json").read_text())
    best = data["prompts"][0]["best"]
    assert result.verifier_calls == 4 and server.requests == 4
    assert data["verifier_usage"]["openai"]["requests"] == server.requests
    assert data["verifier_usage"]["openai"]["prompt_tokens"] > 0
    pixels = np.asarray(Image.open(out / best["image"]).convert("RGB"), dtype=np.float64)
    assert best["score"] == pytest.approx(10 * pixels.mean() / 255, abs=1e-4)
    written = [f for f in [*out.rglob("*"), *(tmp_path / "cache").rglob("*")] if f.is_file()]
    assert written and all(SECRET.encode() not in f.read_bytes() for f in written)


def test_network_use_is_opt_in(server: JudgeServer) -> None:
    for refused in ({}, {"allow_network": "yes"}, {"allow_network": False}):
        options = {"model": "test-vlm", "base_url": server.url, "api_key_env": KEY_ENV,
                   **refused}
        with pytest.raises(VerifierError, match="set its option allow_network: true"):
            OpenAIJudge(**options)
    assert server.requests == 0


def test_the_key_comes_only_from_the_named_environment_variable(
        server: JudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(VerifierError, match=f"environment variable {KEY_ENV} .* is not set"):
        judge(server)
    with pytest.raises(VerifierError) as caught:
        judge(server, api_key_env=SECRET)  # the key pasted where its variable's name goes
    assert "NAME of an environment variable" in str(caught.value)
    assert SECRET not in str(caught.value)
    with pytest.raises(VerifierError, match="never an option") as caught:
        judge(server, api_key=SECRET)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(("options", "fragment"), [
    ({"model": None}, "model is required"),
    ({"base_url": "127.0.0.1:8000/v1"}, "base_url must be an http:// or https:// URL"),
    ({"mode": "score"}, "mode must be one of"),
    ({"samples": 0}, "samples must be a whole number >= 1"),
    ({"samples": 3}, "samples > 1 needs temperature > 0"),
    ({"mode": "yes-probability", "temperature": 0.5}, "apply to mode: rubric"),
    ({"max_concurrency": 0}, "max_concurrency must be a whole number >= 1"),
    ({"max_retries": -1}, "max_retries must be a whole number >= 0"),
    ({"timeout": 0}, "timeout must be a number of seconds > 0"),
    ({"question": "Rate it."}, "question must be a string containing {prompt}"),
    ({"weights": {"beauty": 1}}, "openai: weights name unknown aspect(s) beauty"),
    ({"combine": "median"}, "combine must be one of mean, majority"),
])
def test_bad_options_fail_in_one_line_before_any_request(
        server: JudgeServer, options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(VerifierError) as caught:
        judge(server, **options)
    assert fragment in str(caught.value) and str(caught.value).startswith("openai: ")
    assert server.requests == 0


def test_without_the_openai_package_the_error_says_what_to_install(
        server: JudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai now raises ImportError
    with pytest.raises(VerifierError, match=r"pip install 'diffsearch\[openai\]'"):
        judge(server)


def test_retry_after_headers() -> None:
    assert retry_after({"retry-after-ms": "250"}) == 0.25
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "86400"}) == RETRY_AFTER_CAP_SECONDS
    assert 8 <= retry_after({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None


def test_registered_as_openai(server: JudgeServer) -> None:
    assert BUILTINS["openai"] == "diffsearch.verifiers.openai_judge:OpenAIJudge"
    built = create_verifier({"name": "openai", "label": "gpt", "model": "test-vlm",
                             "base_url": server.url, "api_key_env": KEY_ENV,
                             "allow_network": True})
    assert isinstance(built, OpenAIJudge) and built.describe()["api_key_env"] == KEY_ENV

"""The ``openai`` verifier against a real OpenAI-compatible HTTP server on loopback.

The server (tests/openai_server.py) decodes each request's PNG data URL and answers with a tiny
random Qwen2-VL written here by tests/vlm_fixtures.py (offline), run on that image and question,
so the scores checked here are the model's and prove which image and prompt each reply belongs
to; one test recomputes them from the model folder directly, without the server's code.
Everything goes through the official ``openai`` client over HTTP: concurrency and order,
retries (429 with Retry-After, 5xx, timeouts) and their bounds, the reply cache, the key never
leaving the environment, network opt-in, and a search whose guiding verifier is the endpoint.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import torch
from openai_server import JudgeServer
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from vlm_fixtures import write_tiny_vlm

from diffsearch.api import run_job
from diffsearch.job import Job
from diffsearch.runtime import RuntimeSpec, WorkerRuntime, register_runtime
from diffsearch.verifiers._rubric import (
    DEFAULT_ASPECTS,
    RUBRIC_QUESTION,
    YES_QUESTION,
    rubric_fields,
)
from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.openai_judge import (
    RETRY_AFTER_CAP_SECONDS,
    OpenAIJudge,
    retry_after,
)
from diffsearch.verifiers.registry import BUILTINS, create_verifier
from diffsearch.verifiers.vlm import to_pil
from fake_denoiser import FakeDenoiser

KEY_ENV = "DIFFSEARCH_TEST_JUDGE_KEY"
SECRET = "sk-test-Zq81vY3nLw0pRt6uXe"
PROMPTS = ["a red kite", "a green field", "a blue lake"]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_vlm(tmp_path_factory.mktemp("judge"), "qwen2-vl", seed=0)


@pytest.fixture(scope="module")
def server(model_folder: Path) -> Iterator[JudgeServer]:
    judge_server = JudgeServer(SECRET, model_folder)
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


def colours(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))


def chat(question: str) -> list[dict[str, Any]]:
    """The chat the server makes of the verifier's request: one image, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def rubric_question(prompt: str) -> str:
    return RUBRIC_QUESTION.format(prompt=prompt, **rubric_fields(DEFAULT_ASPECTS))


def model_grades(server: JudgeServer, images: torch.Tensor, prompt: str,
                 aspects: tuple[str, ...] = tuple(DEFAULT_ASPECTS)) -> torch.Tensor:
    """(B, aspects): the server's model's greedy grades of each image under the default
    rubric, computed without HTTP, on the 8-bit pixels the verifier sends."""
    question = chat(rubric_question(prompt))
    return torch.tensor([[server.judge.aspect_value(question, [image], aspect)
                          for aspect in aspects] for image in to_pil(images)])


def model_yes(server: JudgeServer, images: torch.Tensor, prompt: str) -> torch.Tensor:
    """The server's model's P(yes) among the answers' first tokens, for each image."""
    question = chat(YES_QUESTION.format(prompt=prompt))
    return torch.tensor([sum(math.exp(logprob) for token, logprob
                             in server.judge.answer_logprobs(server.judge.inputs(question, [image]))
                             if token.strip().lower() == "yes") for image in to_pil(images)])


def distinct(values: torch.Tensor, by: float = 1e-4) -> bool:
    """Every pair of ``values`` differs by more than ``by`` (so a mix-up would show)."""
    gaps = (values[:, None] - values[None, :]).abs()
    return bool((gaps[~torch.eye(len(values), dtype=torch.bool)] > by).all())


def test_scores_come_back_in_input_order_under_concurrency(server: JudgeServer) -> None:
    server.delay = (0.0, 0.15)
    rgb = colours(12, seed=1)
    prompts = [PROMPTS[row % 3] for row in range(12)]
    verifier = judge(server, max_concurrency=6, weights={"prompt_accuracy": 1})
    scores = verifier.score(solid(rgb), prompts)
    expected = torch.cat([model_grades(server, solid(rgb[row:row + 1]), prompts[row],
                                       ("prompt_accuracy",))[:, 0] for row in range(12)])
    assert distinct(expected)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert 1 < server.peak_in_flight <= 6 and server.requests == 12
    # the default weights: the mean of all four aspects
    both = judge(server).score(solid(rgb[:3]), ["a red kite"] * 3)
    torch.testing.assert_close(both, model_grades(server, solid(rgb[:3]), "a red kite").mean(1),
                               rtol=0, atol=1e-5)


def test_the_scores_are_the_tiny_models_own_and_differ_by_image(
        server: JudgeServer, model_folder: Path) -> None:
    """Not canned: two images get different scores, each what the model folder gives when run
    directly with transformers (written here apart from the server's code)."""
    images = torch.stack([solid(torch.tensor([[0.9, 0.1, 0.1]]))[0],
                          torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))])
    rubric = judge(server).score(images, ["a red kite"] * 2)
    yes = judge(server, mode="yes-probability").score(images, ["a red kite"] * 2)

    processor = AutoProcessor.from_pretrained(model_folder)
    model = AutoModelForImageTextToText.from_pretrained(model_folder, dtype=torch.float32)
    vocabulary = processor.tokenizer.get_vocab()

    def next_token(image: Image.Image, question: str, reply_start: str = "") -> torch.Tensor:
        text = processor.apply_chat_template(chat(question), add_generation_prompt=True,
                                             tokenize=False)
        inputs = processor(text=[text + reply_start], images=[image], return_tensors="pt")
        with torch.no_grad():
            return model(**inputs).logits[0, -1]

    digits = [vocabulary[str(digit)] for digit in range(10)]
    # first tokens of "Yes", " Yes", "No", " No" in the byte-level vocabulary
    answers = [vocabulary[token] for token in ("Yes", "\u0120Yes", "N", "\u0120")]
    direct_rubric, direct_yes = [], []
    for image in to_pil(images):
        means = [(next_token(image, rubric_question("a red kite"), f'{{"{aspect}": ')[digits]
                  .softmax(0) * torch.arange(10)).sum() for aspect in DEFAULT_ASPECTS]
        direct_rubric.append(torch.stack(means).mean())
        shares = next_token(image, YES_QUESTION.format(prompt="a red kite"))[answers].softmax(0)
        direct_yes.append(shares[:2].sum())
    torch.testing.assert_close(rubric, torch.stack(direct_rubric), rtol=0, atol=1e-5)
    torch.testing.assert_close(yes, torch.stack(direct_yes), rtol=1e-5, atol=0)
    assert abs(rubric[0] - rubric[1]) > 0.05 and abs(yes[0] - yes[1]) > 0.05


def test_usage_counts_requests_and_the_tokens_the_endpoint_reported(server: JudgeServer) -> None:
    verifier = judge(server)
    images = solid(colours(3, seed=2))
    verifier.score(images, PROMPTS)
    assert verifier.usage() == {"requests": 3, "retries": 0, "cache_hits": 0,
                                "prompt_tokens": server.prompt_tokens,
                                "completion_tokens": server.completion_tokens}
    # the model's own count: the rendered chat with the image's tokens, as the processor makes it
    assert server.prompt_tokens == sum(
        server.judge.inputs(chat(rubric_question(prompt)), [image])["input_ids"].shape[1]
        for image, prompt in zip(to_pil(images), PROMPTS, strict=True))
    assert server.completion_tokens > 3 * len(DEFAULT_ASPECTS)


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
    expected = model_yes(server, solid(rgb), "a red kite")
    assert distinct(expected) and ((expected > 0) & (expected < 1)).all()
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
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
    torch.testing.assert_close(scores, model_grades(server, solid(rgb), PROMPTS[0]).mean(1),
                               rtol=0, atol=1e-5)
    assert server.requests == 2 and verifier.usage()["retries"] == 1


def test_retries_are_bounded(server: JudgeServer) -> None:
    server.faults = [(503, {})] * 10
    with pytest.raises(VerifierError) as caught:
        judge(server, max_retries=2).score(solid(colours(1, seed=8)), PROMPTS[:1])
    assert "HTTP 503 from" in str(caught.value) and "(3 attempts)" in str(caught.value)
    assert server.requests == 3


def test_a_timeout_fails_its_candidate_alone_after_bounded_retries(server: JudgeServer) -> None:
    # yes-probability: one forward pass per reply, well inside the timeout on a busy machine
    verifier = judge(server, mode="yes-probability", timeout=0.5, max_retries=1,
                     max_concurrency=3)
    images, prompts = solid(colours(3, seed=9)), ["a red kite", "SLOW a green field",
                                                  "a blue lake"]
    started = time.monotonic()
    with pytest.raises(VerifierError) as caught:
        verifier.score(images, prompts)
    assert time.monotonic() - started < 2.2  # 2 x 0.5 s and one backoff of at most 0.5 s
    message = str(caught.value)
    assert message.startswith("openai: row 1: no reply from http://127.0.0.1:")
    assert "within timeout 0.5 s (2 attempts) (1 of 3 rows failed)" in message
    assert "\n" not in message
    assert server.requests == 4
    # the runtime then scores the chunk row by row: the others' replies are remembered
    for row in (0, 2):
        assert torch.isfinite(verifier.score(images[row:row + 1], prompts[row:row + 1])).all()
    assert server.requests == 4 and verifier.usage()["cache_hits"] == 2


def test_an_unparseable_reply_fails_its_candidate_with_the_reply_quoted(
        server: JudgeServer) -> None:
    with pytest.raises(VerifierError) as caught:
        judge(server, max_new_tokens=8).score(solid(colours(2, seed=10)), ["a red kite",
                                                                           "GARBLE"])
    # the model's own unconstrained reply: random weights write no JSON
    (reply,) = [reply for body, reply in server.answered
                if "GARBLE" in body["messages"][0]["content"][1]["text"]]
    assert reply.strip()
    assert f"row 1: the judge's reply holds no JSON object: {' '.join(reply.split())!r}" \
        in str(caught.value)


def majority(values: list[float]) -> float:
    """The most frequent value, the lowest of those tied."""
    counts = Counter(values)
    return min(value for value in counts if counts[value] == max(counts.values()))


@pytest.mark.parametrize("combine", ["mean", "majority"])
def test_samples_are_separate_requests_combined(server: JudgeServer, combine: str) -> None:
    verifier = judge(server, samples=3, temperature=0.7, combine=combine,
                     weights={"overall": 1})
    scores = verifier.score(solid(colours(2, seed=11)), PROMPTS[:2])
    assert verifier.calls_per_score == 3 and server.requests == 6
    assert {body["temperature"] for body in server.bodies} == {0.7}
    # each row's three sampled "overall" digits, as the server's model drew them
    sampled = [[json.loads(reply)["overall"] for body, reply in server.answered
                if f'"{prompt}"' in body["messages"][0]["content"][1]["text"]]
               for prompt in PROMPTS[:2]]
    assert [len(row) for row in sampled] == [3, 3]
    assert len({value for row in sampled for value in row}) > 1  # sampled, not fixed
    expected = [sum(row) / 3 if combine == "mean" else majority(row) for row in sampled]
    assert scores.tolist() == pytest.approx(expected, abs=1e-6)


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
    best_image = Image.open(out / best["image"]).convert("RGB")
    expected = server.judge.aspect_value(chat(rubric_question("a red kite")), [best_image],
                                         "overall")
    assert best["score"] == pytest.approx(expected, abs=1e-5)
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

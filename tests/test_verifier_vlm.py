"""The ``vlm`` verifier on tiny random Qwen2-VL, Idefics3 and LLaVA-OneVision folders written
by the test.

Random weights give meaningless scores, so these tests check the plumbing that real judges rely
on: which token is "Yes", one BOS, the next-token reading against a plain forward pass, batch
and order invariance, the rubric's parsing and per-candidate failure, seeded sampling, and the
registry. Replies the rubric tests need are put in the model's mouth by replacing ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from verifier_fixtures import PROMPTS, offline_hub, pixel_batch, to_pil
from vlm_fixtures import ARCHITECTURES, write_tiny_vlm

from diffsearch.verifiers import vlm as vlm_module
from diffsearch.verifiers._rubric import (
    QUOTE_CHARS,
    RubricReplyError,
    combine_samples,
    normalise_weights,
    parse_rubric,
    weighted_score,
)
from diffsearch.verifiers.base import MissingWeightsError, VerifierError
from diffsearch.verifiers.registry import available_verifiers, create_verifier
from diffsearch.verifiers.vlm import VlmVerifier, answer_text

ASPECTS = ["prompt_accuracy", "visual_quality", "creativity", "overall"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    return {arch: write_tiny_vlm(root / arch, arch, seed=3) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def judges(folders: dict[str, Path]) -> dict[str, VlmVerifier]:
    return {arch: VlmVerifier(model=str(folder), chunk=2) for arch, folder in folders.items()}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def rubric_judge(request: pytest.FixtureRequest, folders: dict[str, Path]) -> VlmVerifier:
    return VlmVerifier(model=str(folders[request.param]), mode="rubric", chunk=2,
                       max_new_tokens=6)


@pytest.mark.parametrize(("arch", "answer"), [("qwen2-vl", "Yes"), ("idefics3", " Yes"),
                                              ("llava-onevision", "Yes")])
def test_the_answer_token_is_the_first_token_of_the_templates_yes(
        judges: dict[str, VlmVerifier], arch: str, answer: str) -> None:
    assert judges[arch].describe()["answer_token"] == answer


def test_the_answer_follows_a_generation_prompt_that_differs_only_in_whitespace() -> None:
    turn = "<|im_start|>user <image>\nx<|im_end|><|im_start|>assistant"
    # LLaVA-OneVision: the prompt ends "assistant\n", its assistant turn "assistant \nYes"
    assert answer_text(turn + "\n", turn + " \nYes<|im_end|>") == "Yes<|im_end|>"
    assert answer_text(turn + "\n", turn + "\nYes<|im_end|>\n") == "Yes<|im_end|>\n"
    assert answer_text("Assistant:", "Assistant: Yes<end>") == " Yes<end>"
    # the turn differs in more than whitespace: no answer position is guessed
    assert answer_text(turn + "\n", turn + " said\nYes") is None
    assert answer_text(turn + "\n", turn + "Yes") is None
    assert answer_text(turn + ":", turn + " Yes") is None


def test_the_prompt_holds_one_bos_although_template_and_tokenizer_both_add_one(
        judges: dict[str, VlmVerifier]) -> None:
    judge = judges["idefics3"]
    bos, pad = judge.tokenizer.bos_token_id, judge.tokenizer.pad_token_id
    ids = judge._inputs(to_pil(pixel_batch(2, seed=1)), ["a", "two blue squares"])["input_ids"]
    for row in ids.tolist():
        real = [token for token in row if token != pad]
        assert real[0] == bos and real.count(bos) == 1
    assert ids[0, 0] == pad  # the shorter prompt is padded on the left


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_yes_probability_is_the_next_token_probability_of_a_plain_forward_pass(
        judges: dict[str, VlmVerifier], folders: dict[str, Path], arch: str) -> None:
    images = pixel_batch(2, seed=4)
    scores = judges[arch].score(images, PROMPTS[:2])
    processor = AutoProcessor.from_pretrained(folders[arch])
    model = AutoModelForImageTextToText.from_pretrained(folders[arch]).eval()
    yes = judges[arch].answer_token
    for row, (image, prompt) in enumerate(zip(to_pil(images), PROMPTS[:2], strict=True)):
        text = f'Does this image show "{prompt}"? Answer yes or no.'
        conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": text}]}]
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True,
                                               tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        expected = torch.softmax(logits.float(), -1)[yes]
        torch.testing.assert_close(scores[row], expected, rtol=1e-5, atol=0)
    assert scores.dtype == torch.float32 and ((scores >= 0) & (scores <= 1)).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_scores_keep_order_and_equal_rows_scored_alone(
        judges: dict[str, VlmVerifier], arch: str) -> None:
    judge, images = judges[arch], pixel_batch(3, seed=5)
    together = judge.score(images, PROMPTS)
    alone = torch.cat([judge.score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=0)
    reverse = judge.score(images.flip(0), PROMPTS[::-1])
    torch.testing.assert_close(reverse, together.flip(0), rtol=1e-5, atol=0)
    ratios = together / together.roll(1)
    assert ((ratios - 1).abs() > 1e-3).all()  # distinct scores, so the order check means something
    assert torch.equal(judge.score(images, PROMPTS), together)  # deterministic


def test_valid_replies_parse_with_prose_and_fences_around_them() -> None:
    reply = ('Here is my grading:\n```json\n{"prompt_accuracy": 8, "visual_quality": 6.5, '
             '"creativity": 0, "overall": 10, "reasoning": "fine"}\n```')
    assert parse_rubric(reply, ASPECTS) == {"prompt_accuracy": 8.0, "visual_quality": 6.5,
                                            "creativity": 0.0, "overall": 10.0}
    assert parse_rubric('{x} then {"overall": 3}', ["overall"]) == {"overall": 3.0}


@pytest.mark.parametrize(("reply", "reason"), [
    ("I would give it a seven.", "holds no JSON object"),
    ('{"prompt_accuracy": 8, "overall": 7', "holds no JSON object"),
    ('{"prompt_accuracy": 8, "overall": 7}', "lacks visual_quality, creativity"),
    ('{"prompt_accuracy": 8, "visual_quality": 11, "creativity": 1, "overall": 7}',
     "visual_quality is 11, not a number in [0, 10]"),
    ('{"prompt_accuracy": "8", "visual_quality": 1, "creativity": 1, "overall": 7}',
     "prompt_accuracy is '8'"),
    ('{"prompt_accuracy": true, "visual_quality": 1, "creativity": 1, "overall": 7}',
     "prompt_accuracy is True"),
])
def test_malformed_replies_fail_with_the_reply_quoted(reply: str, reason: str) -> None:
    with pytest.raises(RubricReplyError) as caught:
        parse_rubric(reply, ASPECTS)
    assert reason in str(caught.value) and repr(reply) in str(caught.value)


def test_a_long_reply_is_quoted_truncated() -> None:
    with pytest.raises(RubricReplyError) as caught:
        parse_rubric("no " * 500, ASPECTS)
    assert len(str(caught.value)) < QUOTE_CHARS + 80 and str(caught.value).endswith("...'")


def test_weights_and_sample_combination() -> None:
    scores = {"prompt_accuracy": 8.0, "visual_quality": 4.0, "creativity": 0.0, "overall": 6.0}
    assert weighted_score(scores, normalise_weights(None, ASPECTS, judge="vlm")) == 4.5
    only = normalise_weights({"overall": 2, "prompt_accuracy": 2}, ASPECTS, judge="vlm")
    assert weighted_score(scores, only) == 7.0
    assert combine_samples([3.0, 9.0, 3.0], "mean") == 5.0
    assert combine_samples([3.0, 9.0, 3.0], "majority") == 3.0
    assert combine_samples([9.0, 3.0], "majority") == 3.0  # a tie goes to the lower score
    with pytest.raises(VerifierError, match="unknown aspect"):
        normalise_weights({"beauty": 1}, ASPECTS, judge="vlm")
    with pytest.raises(VerifierError, match="positive weight"):
        normalise_weights({"overall": 0}, ASPECTS, judge="vlm")


def _fake_generate(judge: VlmVerifier, reply: Callable[[str, int], str],
                   monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the model's ``generate``: row r of call c answers ``reply(prompt text, c)``.
    Returns the list of batch sizes it was called with."""
    calls: list[int] = []
    tokenizer = judge.tokenizer

    def generate(input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        texts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        answers = [tokenizer(reply(text, len(calls)), add_special_tokens=False)["input_ids"]
                   for text in texts]
        calls.append(len(texts))
        width = max(map(len, answers))
        padded = [a + [tokenizer.pad_token_id] * (width - len(a)) for a in answers]
        return SimpleNamespace(sequences=torch.cat([input_ids, torch.tensor(padded)], 1))

    monkeypatch.setattr(judge.model, "generate", generate)
    return calls


def _grades(overall: float) -> str:
    return ('{"prompt_accuracy": 10, "visual_quality": 6, "creativity": 2, '
            f'"overall": {overall:g}}}')


def test_a_malformed_reply_fails_its_candidate_only(rubric_judge: VlmVerifier,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def reply(text: str, call: int) -> str:
        return "Sorry, I cannot grade this." if "two blue squares" in text else _grades(4)

    _fake_generate(rubric_judge, reply, monkeypatch)
    images = pixel_batch(3, seed=6)
    with pytest.raises(VerifierError) as caught:
        rubric_judge.score(images, PROMPTS)
    assert "holds no JSON object: 'Sorry, I cannot grade this.' (row 1; 1 of 3" \
        in str(caught.value)
    # the runtime retries a chunk that raised row by row: only the bad candidate fails again
    for row in (0, 2):
        score = rubric_judge.score(images[row:row + 1], PROMPTS[row:row + 1])
        assert score.tolist() == [(10 + 6 + 2 + 4) / 4]
    with pytest.raises(VerifierError, match="row 0; 1 of 1"):
        rubric_judge.score(images[1:2], PROMPTS[1:2])


@pytest.mark.parametrize(("combine", "expected"), [("mean", 5.0), ("majority", 3.0)])
def test_samples_are_combined(folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                              combine: str, expected: float) -> None:
    judge = VlmVerifier(model=str(folders["idefics3"]), mode="rubric", samples=3,
                        temperature=0.7, combine=combine, weights={"overall": 1}, chunk=2)
    calls = _fake_generate(judge, lambda text, call: _grades([3, 9, 3][call % 3]), monkeypatch)
    assert judge.score(pixel_batch(2, seed=7), PROMPTS[:2]).tolist() == [expected] * 2
    assert calls == [2, 2, 2] and judge.calls_per_score == 3


def test_unparseable_samples_are_dropped_while_one_parses(rubric_judge: VlmVerifier,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rubric_judge, "samples", 3)
    monkeypatch.setattr(rubric_judge, "temperature", 1.0)
    replies = ["garbage", _grades(8), "more garbage"]
    _fake_generate(rubric_judge, lambda text, call: replies[call], monkeypatch)
    assert rubric_judge.score(pixel_batch(1, seed=8), PROMPTS[:1]).tolist() == [6.5]


def test_sampled_replies_are_seeded_per_row(folders: dict[str, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Real sampling on the tiny model; each reply is scored by its text so that the score
    shows which tokens were drawn."""
    monkeypatch.setattr(vlm_module, "parse_rubric", lambda reply, aspects: {
        name: float(sum(map(ord, reply)) % 11) for name in aspects})

    def judge(seed: int) -> VlmVerifier:
        return VlmVerifier(model=str(folders["qwen2-vl"]), mode="rubric", samples=2,
                           temperature=1.0, seed=seed, chunk=2, max_new_tokens=5)

    images = pixel_batch(3, seed=9)
    first = judge(0)
    together = first.score(images, PROMPTS)
    assert torch.equal(judge(0).score(images, PROMPTS), together)  # reproducible
    alone = torch.cat([first.score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    assert torch.equal(alone, together)  # a row's draws do not depend on its batch-mates
    assert not torch.equal(judge(1).score(images, PROMPTS), together)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_rubric_replies_keep_order_and_equal_rows_judged_alone(
        folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """Real greedy decoding (image features, left padding, the cache); each distinct reply
    gets its own score (the order it was first seen in), so equal scores mean equal replies."""
    seen: dict[str, int] = {}

    def by_text(reply: str, aspects: list[str]) -> dict[str, float]:
        return dict.fromkeys(aspects, float(seen.setdefault(reply, len(seen))))

    monkeypatch.setattr(vlm_module, "parse_rubric", by_text)
    judge = VlmVerifier(model=str(folders[arch]), mode="rubric", chunk=2, max_new_tokens=5)
    images = pixel_batch(3, seed=12)
    together = judge.score(images, PROMPTS)
    replies = len(seen)
    assert replies > 1  # the replies depend on the image and prompt
    alone = torch.cat([judge.score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    assert torch.equal(alone, together)
    assert torch.equal(judge.score(images.flip(0), PROMPTS[::-1]), together.flip(0))
    assert len(seen) == replies  # no reply changed with its batch-mates or place


def test_greedy_rubric_ignores_the_checkpoints_sampling_defaults(
        rubric_judge: VlmVerifier, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rubric_judge.model.generation_config, "do_sample", True)
    monkeypatch.setattr(rubric_judge.model.generation_config, "temperature", 5.0)
    inputs = rubric_judge._inputs(to_pil(pixel_batch(2, seed=10)), PROMPTS[:2])
    runs = [rubric_judge._generate(inputs, 6).sequences for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_registered_listed_and_usable_in_an_ensemble(folders: dict[str, Path]) -> None:
    assert {"vlm": "ok"}.items() <= {i.name: i.status for i in available_verifiers()}.items()
    model = str(folders["qwen2-vl"])
    single = create_verifier({"name": "vlm", "model": model, "label": "judge"})
    ensemble = create_verifier({"name": "ensemble",
                                "members": [{"name": "vlm", "model": model, "weight": 2}]})
    images = pixel_batch(2, seed=11)
    torch.testing.assert_close(ensemble.score(images, PROMPTS[:2]),
                               2 * single.score(images, PROMPTS[:2]))


def test_a_missing_model_says_how_to_get_it(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = offline_hub(monkeypatch, tmp_path / "hub")
    with pytest.raises(MissingWeightsError) as caught:
        VlmVerifier(model="Qwen/Qwen2.5-VL-3B-Instruct")
    message = str(caught.value)
    assert "`hf download Qwen/Qwen2.5-VL-3B-Instruct`" in message and "\n" not in message
    with pytest.raises(MissingWeightsError, match="folder not found"):
        VlmVerifier(model=str(tmp_path / "nowhere" / "model"))
    assert attempts == []


@pytest.mark.parametrize(("options", "field"), [
    ({"mode": "score"}, "mode must be one of yes-probability, rubric"),
    ({"mode": "rubric", "combine": "median"}, "combine must be one of mean, majority"),
    ({"mode": "rubric", "samples": 0}, "samples must be a whole number >= 1"),
    ({"mode": "rubric", "samples": 3}, "samples > 1 needs temperature > 0"),
    ({"samples": 3, "temperature": 1.0}, "samples and temperature apply to mode: rubric"),
    ({"weights": {"overall": 1}}, "aspects and weights apply to mode: rubric"),
    ({"question": "Is this good?"}, "question must be a string containing {prompt}"),
    ({"question": "{prompt} {score}"}, "question may use only {prompt}"),
    ({"question": "{prompt} {aspects}"}, "question may use only {prompt} (double"),
    ({"mode": "rubric", "seed": 1.5}, "seed must be a whole number"),
    ({"mode": "rubric", "aspects": "overall"}, "aspects must be a list of names"),
    ({"dtype": "int8"}, "dtype must be one of float32"),
    ({"chunk": 0}, "chunk must be a whole number >= 1"),
])
def test_bad_options_are_refused_before_loading(options: dict[str, Any], field: str) -> None:
    with pytest.raises(VerifierError) as caught:
        VlmVerifier(model="/no/such/vlm", **options)
    assert not isinstance(caught.value, MissingWeightsError) and field in str(caught.value)

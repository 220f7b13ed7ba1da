"""``video-reward``: a Qwen2-VL backbone and a linear reward head loaded from a folder, checked
on a tiny random model against the head applied by hand to the model's own hidden states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from verifier_fixtures import forbid_network
from video_reward_fixtures import OUTPUTS, QUESTION, REWARD_TOKENS, reward_folder, write_backbone

from diffsearch.api import run_job
from diffsearch.job import Job
from diffsearch.verifiers.base import MissingWeightsError, VerifierError
from diffsearch.verifiers.registry import create_verifier
from diffsearch.verifiers.video_reward import VideoRewardVerifier

PROMPTS = ["a red ball bouncing", "a red ball bouncing", "a blue square"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_backbone(tmp_path_factory.mktemp("video-reward") / "backbone", seed=0)


def random_clips(count: int, frames: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, frames, 3, 16, 16, generator=generator)


def hidden_states(folder: Path, clips: torch.Tensor, prompts: list[str],
                  question: str = QUESTION) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each clip alone through the model's full forward under ``question``: (input ids, last
    hidden states)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    out = []
    for clip, prompt in zip(clips, prompts, strict=True):
        text = question.replace("{prompt}", prompt)
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}],
            add_generation_prompt=True, tokenize=False)
        frames = (clip * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        batch = processor(text=[text], videos=[frames], return_tensors="pt")
        with torch.no_grad():
            result = model(**batch, output_hidden_states=True)
        out.append((batch["input_ids"][0], result.hidden_states[-1][0]))
    return out


def token_states(folder: Path, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The last hidden state at each reward token, (B, 3, D)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer.convert_tokens_to_ids(REWARD_TOKENS)
    return torch.stack([torch.stack([hidden[(row_ids == i).nonzero()[0, 0]] for i in ids])
                        for row_ids, hidden in hidden_states(folder, clips, prompts)])


def test_rewards_are_the_head_read_at_each_reward_token(backbone: Path, tmp_path: Path) -> None:
    folder = reward_folder(backbone, tmp_path / "rm")
    clips = random_clips(3)
    verifier = create_verifier({"name": "video-reward", "model": str(folder)})
    rewards = verifier.rewards(clips, PROMPTS)
    weight = load_file(str(folder / "reward_head.safetensors"))["weight"]
    at_tokens = token_states(folder, clips, PROMPTS)  # (B, 3, D)
    expected = torch.einsum("btd,td->bt", at_tokens, weight)  # output i at token i
    assert torch.allclose(rewards, expected, atol=1e-4)
    assert torch.allclose(verifier.score(clips, PROMPTS), rewards.sum(1))
    ta = VideoRewardVerifier(model=str(folder), output="TA").score(clips, PROMPTS)
    assert torch.allclose(ta, rewards[:, 2])
    assert verifier.describe()["outputs"] == OUTPUTS


def test_a_one_row_head_standardised_and_last_token_pooling(backbone: Path,
                                                          tmp_path: Path) -> None:
    clips = random_clips(2, seed=1)
    prompts = PROMPTS[:2]
    mean, std = {"VQ": 0.5, "TA": -1.0}, {"MQ": 2.0, "TA": 4.0}
    one = reward_folder(backbone, tmp_path / "one", rows=1, mean=mean, std=std)
    weight = load_file(str(one / "reward_head.safetensors"))["weight"][0]
    raw = token_states(one, clips, prompts) @ weight  # the one row at every reward token
    shift = torch.tensor([0.5, 0.0, -1.0])
    scale = torch.tensor([1.0, 2.0, 4.0])
    rewards = VideoRewardVerifier(model=str(one)).rewards(clips, prompts)
    assert torch.allclose(rewards, (raw - shift) / scale, atol=1e-4)

    rate = 'Rate "{prompt}".'
    last = reward_folder(backbone, tmp_path / "last", bias=True, pooling="last",
                         reward_tokens=None, question=rate)
    head = load_file(str(last / "reward_head.safetensors"))
    verifier = VideoRewardVerifier(model=str(last))
    states = torch.stack([hidden[-1] for _, hidden in hidden_states(last, clips, prompts, rate)])
    assert torch.allclose(verifier.rewards(clips, prompts),
                          states @ head["weight"].T + head["bias"], atol=1e-4)


def test_the_model_sees_the_whole_clip_and_rows_are_independent(backbone: Path,
                                                                tmp_path: Path) -> None:
    verifier = VideoRewardVerifier(model=str(reward_folder(backbone, tmp_path / "rm")), chunk=2)
    clips = random_clips(3)
    together = verifier.score(clips, PROMPTS)  # one padded chunk of 2, then 1 (padded)
    alone = torch.cat([verifier.score(clips[i:i + 1], [PROMPTS[i]]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-4)
    assert len(set(together.tolist())) == 3
    reversed_order = verifier.score(clips.flip(1), PROMPTS)
    assert not torch.allclose(reversed_order, together, atol=1e-3)  # frame order matters
    two = VideoRewardVerifier(model=verifier.describe()["model"], frames=2)
    assert torch.allclose(two.score(clips, PROMPTS), verifier.score(clips[:, [0, 3]], PROMPTS),
                          atol=1e-5)


def test_it_loads_by_path_only_and_says_what_the_folder_lacks(
        backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = forbid_network(monkeypatch)
    for missing in ("KwaiVGI/VideoReward", str(tmp_path / "nowhere")):
        with pytest.raises(MissingWeightsError, match="loaded by path only, never downloaded"):
            create_verifier({"name": "video-reward", "model": missing})
    with pytest.raises(MissingWeightsError, match="reward_head.json not found"):
        VideoRewardVerifier(model=str(backbone))
    assert attempts == []
    with pytest.raises(VerifierError, match="model is required"):
        create_verifier("video-reward")


@pytest.mark.parametrize(("manifest", "message"), [
    ({"outputs": []}, "outputs must be a list of distinct reward names"),
    ({"pooling": "mean"}, "pooling must be one of last, tokens"),
    ({"reward_tokens": REWARD_TOKENS[:2]}, "needs reward_tokens, one token per output"),
    ({"question": "no prompt here"}, "question must be a string holding {prompt}"),
    ({"question": "{prompt} <|VQ_reward|>"}, "question must hold every reward token"),
    ({"std": {"VQ": 0}}, "every std must be > 0"),
    ({"mean": {"XX": 1.0}}, r"mean must map output names \(VQ, MQ, TA\)"),
    ({"reward_tokens": ["<|VQ_reward|>", "<|MQ_reward|>", "<|XX_reward|>"],
      "question": "{prompt} <|VQ_reward|> <|MQ_reward|> <|XX_reward|>"},
     "reward token '<|XX_reward|>' is not one token"),
])
def test_a_bad_manifest_is_refused_in_one_line(backbone: Path, tmp_path: Path,
                                               manifest: dict, message: str) -> None:
    folder = reward_folder(backbone, tmp_path / "rm", **manifest)
    with pytest.raises(VerifierError, match=message):
        VideoRewardVerifier(model=str(folder))


def test_a_head_that_does_not_fit_and_an_unknown_output_are_refused(backbone: Path,
                                                                   tmp_path: Path) -> None:
    folder = reward_folder(backbone, tmp_path / "rm", rows=2)
    with pytest.raises(VerifierError, match=r"'weight' of shape \(1 or 3, 32\).*\(2, 32\)"):
        VideoRewardVerifier(model=str(folder))
    good = reward_folder(backbone, tmp_path / "good")
    with pytest.raises(VerifierError, match="output must be one of VQ, MQ, TA, overall"):
        VideoRewardVerifier(model=str(good), output="motion")


def test_video_verifiers_judge_a_search_on_the_bundled_model(backbone: Path,
                                                            tmp_path: Path) -> None:
    """frames guides a Tree-of-Frames search; temporal-consistency and video-reward judge its
    clips: each scores every finished clip, and the best is the guide's best."""
    folder = reward_folder(backbone, tmp_path / "rm")
    motion = "a red circle moving from left to right"
    job = Job.model_validate({
        "prompts": [motion], "model": "shapes", "num_steps": 8, "threads": 1,
        "executor": "local", "budget": 48,
        "verifier": {"name": "frames", "verifier": "shapes-oracle", "aggregate": "min"},
        "eval_verifiers": [{"name": "temporal-consistency", "features": "shapes-clip"},
                           {"name": "video-reward", "model": str(folder), "label": "reward"}],
        "strategy": {"name": "tree-of-frames", "first_frame_candidates": 3, "branching": 2,
                     "image_verifier": "shapes-oracle"}})
    prompt = run_job(job, tmp_path / "run").prompts[0]
    finished = [c for c in prompt.candidates if c.candidate >= 5]
    assert len(finished) == 2
    assert prompt.best.reward == max(c.reward for c in finished)
    for candidate in finished:
        assert set(candidate.scores) == {"frames", "temporal-consistency", "reward"}
        assert -1.0 <= candidate.scores["temporal-consistency"] <= 1.0

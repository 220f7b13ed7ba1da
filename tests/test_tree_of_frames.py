"""Tree-of-Frames and linear clips: the exact mechanics with scripted outcomes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from diffsearch.api import run_job
from diffsearch.cli import main as cli_main
from diffsearch.job import Job
from diffsearch.pipelines.frame_chain import FrameChain
from diffsearch.run_folder import best_clip, candidate_clip, candidate_image
from diffsearch.runtime import ClipFrames, RuntimeSpec, WorkBatch, get_runtime
from diffsearch.seeding import derive_seed
from diffsearch.store import RunStore
from diffsearch.strategies import registry
from diffsearch.strategies.tree_of_frames import LinearClips, TreeOfFrames
from diffsearch.tasks import Outcome, PerturbKind, ScoreOn, Task
from diffsearch.verifiers.base import VerifierError
from engine_harness import clip_redness, comparable, fake_job, install_fake_runtime, run_fake

PROMPT = "a red circle moving from left to right"
FRAMES = ["a red circle on the left", "a red circle in the centre", "a red circle on the right"]
T = 10  # strength 0.6 -> frames >= 1 restart at k = 4 and cost 6 NFE


def tof(budget: int = 1000, **options) -> TreeOfFrames:
    """A Tree-of-Frames built as a job builds it: its options checked first."""
    return TreeOfFrames.from_options({"strength": 0.6, **options}, prompt_index=0,
                                     prompt=PROMPT, num_steps=T, budget_nfe=budget, seed=7)


def outcome(task: Task, reward: float | None, error: str | None = None) -> Outcome:
    return Outcome(prompt_index=task.prompt_index, candidate=task.candidate, step=task.end,
                   reward=None if error else reward, nfe=task.denoise_nfe(T), error=error)


def play(strategy, reward: Callable[[Task], float | None]) -> list[list[Task]]:
    """Run a strategy to the end, answering each task with ``reward(task)`` (None: fails)."""
    rounds = []
    while not strategy.done:
        tasks = strategy.ask()
        assert tasks, "ask() may only return [] when done"
        rounds.append(tasks)
        strategy.tell([outcome(t, r) if (r := reward(t)) is not None else
                       outcome(t, None, error="NaN") for t in tasks])
    return rounds


def test_first_frames_are_scored_on_their_image_and_the_best_is_the_root() -> None:
    s = tof(first_frame_candidates=4, branching=2)
    first = s.ask()
    assert [t.candidate for t in first] == [0, 1, 2, 3]
    for t in first:
        assert (t.prompt, t.start, t.end, t.source_candidate) == (FRAMES[0], 0, T, None)
        assert t.score_on is ScoreOn.FINAL and t.verifier == "shapes-clip"
        assert t.seed == derive_seed(7, PROMPT, t.candidate, "noise")
    s.tell([outcome(t, r) for t, r in zip(first, [0.1, 0.9, 0.5, 0.9])])
    children = s.ask()
    # the tie between 1 and 3 goes to the lower id; only the root branches
    assert [(t.candidate, t.parent, t.source_candidate) for t in children] == [(4, 1, 1),
                                                                                (5, 1, 1)]
    for t in children:
        assert (t.prompt, t.start, t.end) == (FRAMES[1], 4, T)
        assert t.perturbation.kind is PerturbKind.RENOISE and t.perturbation.to_step == 4
        assert t.score_on is ScoreOn.CLIP and t.verifier is None  # the job's video verifier
        assert t.seed == derive_seed(7, PROMPT, t.candidate, "frame")
    assert children[0].seed != children[1].seed


def test_pruning_keeps_the_top_share_and_the_best_finished_clip_wins() -> None:
    s = tof(first_frame_candidates=2, branching=4, prune_depths=[1], keep=0.5)
    rewards = {0: 0.2, 1: 0.3,                       # root: 1
               2: 0.1, 3: 0.8, 4: 0.5, 5: 0.7}      # depth 1: keep 3 and 5
    rounds = play(s, lambda t: rewards.get(t.candidate, 1.0 - t.candidate / 100))
    assert [len(r) for r in rounds] == [2, 4, 8]
    depth2 = rounds[2]
    assert [t.parent for t in depth2] == [3, 3, 3, 3, 5, 5, 5, 5]
    assert [t.candidate for t in depth2] == list(range(6, 14))
    assert all(t.prompt == FRAMES[2] and t.score_on is ScoreOn.CLIP for t in depth2)
    best = s.best()
    assert best is not None and best.candidate == 6 and best.reward == pytest.approx(0.94)
    spent = sum(t.denoise_nfe(T) for r in rounds for t in r)
    assert spent == 2 * 10 + (4 + 8) * 6 == s.planned_nfe(2, 4)


def test_unpruned_depths_are_not_scored_and_every_branch_grows() -> None:
    s = tof(num_frames=4, first_frame_candidates=1, branching=2, prune_depths=[2], keep=0.25)
    rounds = play(s, lambda t: float(t.candidate))
    assert [len(r) for r in rounds] == [1, 2, 4, 2]
    assert [r[0].score_on for r in rounds] == [ScoreOn.FINAL, ScoreOn.NONE, ScoreOn.CLIP,
                                               ScoreOn.CLIP]
    # depth 2 made candidates 3..6; keep 25% of 4 -> the single best, 6
    assert [t.parent for t in rounds[3]] == [6, 6]
    assert s.best().candidate == 8
    assert s.open_branches(2) == [2, 4, 2]


def test_failed_frames_end_their_branch_and_rank_last() -> None:
    s = tof(first_frame_candidates=3, branching=2, prune_depths=[1], keep=1.0)
    rewards = {0: None, 1: 0.5, 2: 0.4,   # the failed first frame is never the root
               3: None, 4: 0.2}           # a failed partial clip is pruned even with keep=1
    rounds = play(s, lambda t: rewards.get(t.candidate, 0.3))
    assert {t.parent for t in rounds[1]} == {1}
    assert [t.parent for t in rounds[2]] == [4, 4]


def test_all_first_frames_failing_ends_the_search_without_a_clip() -> None:
    s = tof(first_frame_candidates=2, branching=2)
    rounds = play(s, lambda t: None)
    assert len(rounds) == 1 and s.done and s.best() is None


def test_budget_fitting_is_exact_and_never_overspends() -> None:
    # per tree: 10 * n0 + 6 * (b + ceil(b / 2) * b); at 100 NFE b = 3 (84 NFE with n0 = 3,
    # b = 4 would need 112), and the 46 NFE left after the branches buy n0 = 4
    s = tof(budget=100)
    assert (s.branching, s.first_frame_candidates) == (3, 4)
    assert s.planned_nfe(4, 3) == 94
    rounds = play(s, lambda t: 0.5)
    assert sum(t.denoise_nfe(T) for r in rounds for t in r) == 94
    assert tof(budget=100, branching=2).first_frame_candidates == 7  # 100 - 6 * 4 = 76
    assert tof(budget=100, first_frame_candidates=1).branching == 4  # 82 NFE; b=5: 130
    for budget in range(22, 400, 7):
        s = tof(budget=budget)
        assert s.planned_nfe(s.first_frame_candidates, s.branching) <= budget


@pytest.mark.parametrize(("options", "message"), [
    ({"budget": 21}, "needs 22 NFE, over the budget of 21"),
    ({"first_frame_candidates": 5, "branching": 3, "budget": 100}, "needs 104 NFE"),
    ({"prune_depths": [2]}, r"prune_depths: must lie between .* \(1..1\), got \[2\]"),
    ({"prune_depths": [0]}, "prune_depths.0: must be >= 1"),
    ({"prune_depths": 1}, "prune_depths: must be a non-empty list of integers, got 1"),
    ({"keep": 0}, r"keep: must be in \(0, 1\]"),
    ({"keep": True}, "keep: must be a number, got True"),  # YAML's `keep: yes`
    ({"branching": 0}, "branching: must be >= 1"),
    ({"first_frame_candidates": 2.5}, "first_frame_candidates: must be an integer"),
    ({"strength": 0.01}, "strength: strength 0.01 leaves no denoising step"),
    ({"num_frames": 1}, "num_frames: must be >= 2"),
    ({"image_verifier": ""}, "image_verifier: must be a name"),
    ({"colour": "red"}, "colour: unknown option; tree-of-frames takes: num_frames, strength"),
])
def test_bad_options_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tof(**options)


def test_same_outcomes_same_tasks() -> None:
    def reward(t: Task) -> float:
        return (t.seed % 1000) / 1000

    a, b = tof(budget=150), tof(budget=150)
    assert play(a, reward) == play(b, reward)
    assert a.best() == b.best()
    other_seed = TreeOfFrames(prompt_index=0, prompt=PROMPT, num_steps=T, budget_nfe=150,
                              seed=8, strength=0.6)
    assert play(other_seed, reward)[0] != play(tof(budget=150), reward)[0]


def test_linear_clips_are_independent_chains_best_by_the_video_score() -> None:
    s = LinearClips(prompt_index=3, prompt=PROMPT, num_steps=T, budget_nfe=70, seed=7,
                    strength=0.6)
    assert s.n == 3  # one clip costs 10 + 6 + 6 = 22 NFE
    rounds = play(s, lambda t: None if t.candidate == 4 else float(t.candidate))
    assert [[t.candidate for t in r] for r in rounds] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [t.parent for t in rounds[1]] == [0, 1, 2]
    assert [t.parent for t in rounds[2]] == [3, 5]  # the clip of failed frame 4 ends there
    assert [r[0].score_on for r in rounds] == [ScoreOn.NONE, ScoreOn.NONE, ScoreOn.CLIP]
    assert [r[0].prompt for r in rounds] == FRAMES
    assert all(t.prompt_index == 3 for r in rounds for t in r)
    assert s.best().candidate == 7
    with pytest.raises(ValueError, match="buys no clip of 3 frames"):
        LinearClips(prompt_index=0, prompt=PROMPT, num_steps=T, budget_nfe=21, seed=7,
                    strength=0.6)
    with pytest.raises(ValueError, match="n: 4 clips need 88 NFE"):
        LinearClips(prompt_index=0, prompt=PROMPT, num_steps=T, budget_nfe=70, seed=7,
                    strength=0.6, n=4)


def test_both_are_registered() -> None:
    assert registry.strategy_class("tree-of-frames") is TreeOfFrames
    assert registry.strategy_class("linear-clips") is LinearClips


# ---- through the real engine, store and runtime on the fake denoiser ---------------------------

def media_bytes(run_dir: Path) -> dict[str, bytes]:
    """Every image and clip of a run folder, by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.suffix in (".png", ".gif")}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def tof_job(**fields):
    strategy = {"name": "tree-of-frames", "num_frames": 3, "strength": 0.6,
                "first_frame_candidates": 3, "branching": 2, "image_verifier": "redness"}
    defaults = {"prompts": [PROMPT], "verifier": "clip-redness", "budget": 120,
                "strategy": strategy}
    return fake_job(**{**defaults, **fields})


def chain_of(candidates: list[dict], candidate: int) -> list[int]:
    parent_of = {c["candidate"]: c["parent"] for c in candidates}
    chain = [candidate]
    while parent_of[chain[0]] is not None:
        chain.insert(0, parent_of[chain[0]])
    return chain


def test_tree_of_frames_end_to_end_scores_and_writes_whole_clips(tmp_path: Path) -> None:
    job = tof_job(eval_verifiers=["redness", {"name": "clip-redness", "label": "clip-eval"}],
                  images="all")
    result, denoiser = run_fake(job, tmp_path / "run")
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    candidates = {c["candidate"]: c for c in data["prompts"][0]["candidates"]}
    # 3 first frames (30 NFE), 2 partial clips (12), the best kept -> 2 finished clips (12)
    assert data["nfe"] == result.nfe == 30 + 2 * 6 + 2 * 6
    assert sorted(candidates) == list(range(7))
    first = [candidates[c] for c in range(3)]
    assert all(set(c["scores"]) == {"redness"} for c in first)  # image judges only
    root = max(first, key=lambda c: (c["reward"], -c["candidate"]))["candidate"]
    assert candidates[3]["parent"] == candidates[4]["parent"] == root
    for c in range(3, 7):
        assert set(candidates[c]["scores"]) == {"clip-redness", "clip-eval"}  # video judges only

    best = data["prompts"][0]["best"]
    assert best["candidate"] in (5, 6)
    assert best["score"] == max(candidates[5]["reward"], candidates[6]["reward"])
    # the runtime assembled the clip from the stored chain, oldest frame first
    chain = chain_of(list(candidates.values()), best["candidate"])
    assert len(chain) == 3 and chain[0] == root
    store = RunStore.open(tmp_path / "run" / "store.zarr", writable=False)
    assert store.parents(0) == {c: candidates[c]["parent"] for c in candidates}
    frames = denoiser.decode(store.read_latents(0, chain))
    assert best["score"] == pytest.approx(clip_redness(frames[None]).item(), rel=1e-6)
    assert torch.equal(store.read_latents(0, [best["candidate"]], final=True),
                       store.read_latents(0, [best["candidate"]]))
    # ... and wrote it: a 3-frame GIF next to the last frame's PNG, which is the best image
    run = tmp_path / "run"
    for clip in (candidate_clip(0, best["candidate"]), best_clip(0)):
        with Image.open(run / clip) as gif:
            assert gif.n_frames == 3 and gif.size == (8, 8)
    assert np.array_equal(pixels(run / best["image"]),
                          pixels(run / candidate_image(0, best["candidate"])))
    # frames >= 1 were re-noised to k = 4 and denoised 4 -> 10 under their frame's prompt
    assert [(c.start, c.end) for c in denoiser.calls][-2:] == [(4, 10), (4, 10)]
    assert set(FRAMES) <= set(denoiser.encoded) and PROMPT not in denoiser.encoded
    verifier = get_runtime(RuntimeSpec.from_job(job)).verifiers["clip-redness"]
    # partial clips at the pruning depth, whole ones at the end, always with the clip prompt
    assert sorted(set(verifier.seen)) == [(2, PROMPT), (3, PROMPT)]


def test_the_same_job_gives_the_same_clips_whatever_the_batch_size(tmp_path: Path) -> None:
    for name, batch_size in (("a", 8), ("b", 1)):
        run_fake(tof_job(batch_size=batch_size), tmp_path / name)
    assert comparable(tmp_path / "a", "job", "result_key") == \
        comparable(tmp_path / "b", "job", "result_key")
    assert media_bytes(tmp_path / "a") == media_bytes(tmp_path / "b")


def test_an_interrupted_tree_resumes_by_replay(tmp_path: Path) -> None:
    job = tof_job(batch_size=1)
    run_fake(job, tmp_path / "full")
    seen = []

    def stop_in_the_second_depth(event) -> None:
        seen.append(event)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_fake(job, tmp_path / "stopped", on_progress=stop_in_the_second_depth)
    _, denoiser = run_fake(job, tmp_path / "stopped", resume=True)
    assert len(denoiser.calls) == 7 - 4  # only the unfinished frames ran again
    assert comparable(tmp_path / "stopped") == comparable(tmp_path / "full")
    assert media_bytes(tmp_path / "stopped") == media_bytes(tmp_path / "full")


def test_linear_clips_end_to_end(tmp_path: Path) -> None:
    job = tof_job(strategy={"name": "linear-clips", "num_frames": 3, "strength": 0.6}, budget=70,
                  images="all")
    result, _ = run_fake(job, tmp_path / "run")
    prompt = result.prompts[0]
    assert result.nfe == 3 * 22
    last = [c for c in prompt.candidates if c.candidate >= 6]
    assert prompt.best.candidate == max(last, key=lambda c: c.reward).candidate
    assert all(c.reward is None for c in prompt.candidates if c.candidate < 6)
    for c in last:
        assert (tmp_path / "run" / candidate_clip(0, c.candidate)).is_file()


def test_clip_scoring_with_an_image_verifier_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(VerifierError, match="need a video verifier .* 'redness' scores images"):
        run_fake(tof_job(verifier="redness"), tmp_path / "run")


def test_the_cli_runs_tree_of_frames_from_flags_and_from_a_job_file(tmp_path: Path) -> None:
    job = tof_job(executor="local", threads=1)
    install_fake_runtime(job)
    flags = ["--model", "fake", "--verifier", "clip-redness", "--budget", "120",
             "--executor", "local", "--threads", "1", "--quiet"]
    options = ["--option", "num_frames=3", "--option", "strength=0.6",
               "--option", "first_frame_candidates=3",
               "--option", "branching=2", "--option", "image_verifier=redness"]
    result = CliRunner().invoke(cli_main, ["generate", PROMPT, "--strategy", "tree-of-frames",
                                           *options, *flags, "--out", str(tmp_path / "flags")])
    assert result.exit_code == 0, result.output
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json")))
    result = CliRunner().invoke(cli_main, ["run", str(tmp_path / "job.yaml"), "--out",
                                           str(tmp_path / "file"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert comparable(tmp_path / "flags", "job", "result_key") == \
        comparable(tmp_path / "file", "job", "result_key")
    assert (tmp_path / "file" / best_clip(0)).is_file()


def test_the_cli_names_the_missing_video_verifier_in_one_line(tmp_path: Path) -> None:
    install_fake_runtime(tof_job(verifier="redness", executor="local", threads=1))
    result = CliRunner().invoke(cli_main, [
        "generate", PROMPT, "--strategy", "tree-of-frames", "--option", "image_verifier=redness",
        "--option", "strength=0.6",
        "--model", "fake", "--verifier", "redness", "--budget", "120", "--executor", "local",
        "--threads", "1", "--quiet", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "need a video verifier" in result.output and "Traceback" not in result.output


def test_one_batch_may_hold_clips_of_different_lengths(tmp_path: Path) -> None:
    """The runtime scores each clip length as its own batch; every clip is its own chain."""
    job = tof_job()
    _, denoiser = run_fake(job, tmp_path / "run")
    store = RunStore.open(tmp_path / "run" / "store.zarr", writable=False)
    parents = {c.candidate: c.parent for c in store.finished_candidates(0)}
    depth_two = next(c for c, p in parents.items() if p is not None and parents[p] is not None)
    chain = FrameChain.for_prompt(PROMPT, 4, 0.6)
    tasks = tuple(chain.next_frame_task(prompt_index=0, frame=frame, candidate=candidate,
                                        parent=parent, seed=candidate, num_steps=T,
                                        score_on=ScoreOn.CLIP)
                  for candidate, parent, frame in ((7, 0, 1), (8, depth_two, 3)))
    runtime = get_runtime(RuntimeSpec.from_job(job))

    def ancestors_of(task: Task) -> list[int]:
        ancestors = [task.parent]
        while parents[ancestors[0]] is not None:
            ancestors.insert(0, parents[ancestors[0]])
        return ancestors

    batch = WorkBatch(
        tasks=tasks, store_path=str(store.path),
        sources=tuple(store.latent_ref(0, t.source_candidate) for t in tasks),
        clips=tuple(ClipFrames(ancestors=tuple(store.latent_ref(0, a, final=True)
                                               for a in ancestors_of(t)), prompt=PROMPT)
                    for t in tasks))
    result = runtime.run(batch)
    for row, (task, out) in enumerate(zip(tasks, result.outcomes, strict=True)):
        own = torch.from_numpy(result.states[row:row + 1])
        frames = torch.cat([denoiser.decode(store.read_latents(0, ancestors_of(task))),
                            denoiser.decode(own)])
        assert len(frames) == {7: 2, 8: 4}[task.candidate]
        assert out.reward == pytest.approx(clip_redness(frames[None]).item(), rel=1e-6)


def test_tree_of_frames_on_the_bundled_shapes_model(tmp_path: Path) -> None:
    """The real adapter, renoise and VAE: a motion clip searched end to end (8 steps)."""
    guide = {"name": "shapes-video", "frame_verifier": "shapes-oracle"}
    job = Job.model_validate({
        "prompts": [PROMPT], "model": "shapes", "num_steps": 8, "threads": 1,
        "executor": "local", "verifier": guide, "eval_verifiers": ["shapes-video-oracle"],
        "budget": 48, "strategy": {"name": "tree-of-frames", "first_frame_candidates": 3,
                                   "branching": 2, "image_verifier": "shapes-oracle"}})
    result = run_job(job, tmp_path / "run")
    prompt = result.prompts[0]
    assert result.nfe == 3 * 8 + 2 * 6 + 2 * 6  # strength 0.75 of 8 steps: k = 2
    finished = [c for c in prompt.candidates if c.candidate >= 5]
    assert len(finished) == 2 and prompt.best.candidate in {c.candidate for c in finished}
    assert prompt.best.reward == max(c.reward for c in finished)
    assert 0.0 <= prompt.best.scores["shapes-video-oracle"] <= 1.0
    with Image.open(tmp_path / "run" / best_clip(0)) as gif:
        assert gif.n_frames == 3 and gif.size == (32, 32)

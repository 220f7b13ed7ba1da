"""Tree-of-Frames over chunks on a real video family: a tiny Wan image-to-video pipeline
(tests/tiny_wan.py), saved and loaded by path, where a candidate is a whole 5-frame clip that
continues the last frame of its parent chunk (the first chunk continues the user's image)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_wan import SIZE, WAN_DEFAULTS, tiny_wan_i2v_pipeline, tiny_wan_pipeline

from diffsearch.api import run_job
from diffsearch.cli import main as cli_main
from diffsearch.clips import join_chain
from diffsearch.errors import JobError
from diffsearch.job import Job
from diffsearch.pipelines.frame_chain import frame_prompts
from diffsearch.preflight import check_sampler, preflight
from diffsearch.run_folder import best_clip
from diffsearch.runtime import Render, RuntimeSpec, WorkBatch, get_runtime
from diffsearch.seeding import derive_seed
from diffsearch.store import RunStore
from diffsearch.strategies.tree_of_frames import LinearClips, TreeOfFrames
from diffsearch.tasks import Outcome, ScoreOn
from diffsearch.verifiers.temporal import TemporalConsistencyVerifier
from engine_harness import comparable, fake_job, run_fake

PROMPT = "a red circle moving from left to right"
CHUNK_PROMPTS = frame_prompts(PROMPT, 3)
T = WAN_DEFAULTS["num_steps"]
FRAMES = SIZE["num_frames"]
GUIDE = {"name": "temporal-consistency", "features": "pixels"}
"""A video verifier with no weights whose scores differ from clip to clip."""
TREE = {"name": "tree-of-frames", "unit": "chunk", "num_chunks": 3,
        "first_frame_candidates": 2, "branching": 2, "prune_depths": [1]}
TREE_NFE = T * (2 + 2 + 2)
"""2 first chunks, the root's 2 children (1 kept at depth 1), its 2 children: 4 steps each."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_wan_i2v_pipeline(tmp_path_factory.mktemp("i2v"))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "first.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (SIZE["height"], SIZE["width"], 3),
                                 dtype=np.uint8)).save(path)
    return path


def wan_job(folder: Path, image: Path | None, **fields) -> Job:
    strategy = {**TREE, **({} if image is None else {"image": str(image)})}
    return Job.model_validate({"prompts": [PROMPT], "model": str(folder), "threads": 1,
                               "executor": "local", "verifier": GUIDE, "budget": TREE_NFE,
                               "strategy": strategy, **fields})


@pytest.fixture(scope="module")
def tree_run(folder, image, tmp_path_factory) -> tuple[Job, Path]:
    job = wan_job(folder, image)
    out = tmp_path_factory.mktemp("tree") / "run"
    run_job(job, out)
    return job, out


def candidates_of(run_dir: Path) -> dict[int, dict]:
    data = json.loads((run_dir / "results.json").read_text())
    return {c["candidate"]: c for c in data["prompts"][0]["candidates"]}


def media_bytes(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.suffix in (".png", ".gif")}


# ---- the plan, with scripted outcomes -----------------------------------------------------------
def chunk_tree(budget: int = 1000, **options) -> TreeOfFrames:
    return TreeOfFrames.from_options({"unit": "chunk", **options}, prompt_index=0,
                                     prompt=PROMPT, num_steps=10, budget_nfe=budget, seed=7)


def test_chunks_run_the_whole_schedule_from_noise_and_continue_their_parent() -> None:
    s = chunk_tree(first_frame_candidates=2, branching=2)
    assert s.chunks is not None and s.chunks.image is None
    assert s.named_verifiers() == {}  # first chunks are clips: the job's video verifier
    first = s.ask()
    for t in first:
        assert (t.prompt, t.start, t.end, t.parent, t.source_candidate) == (
            CHUNK_PROMPTS[0], 0, 10, None, None)
        assert t.score_on is ScoreOn.CLIP and t.verifier is None
    s.tell([Outcome(prompt_index=0, candidate=t.candidate, step=10, reward=r, nfe=10)
            for t, r in zip(first, [0.1, 0.9])])
    children = s.ask()
    assert [(t.candidate, t.parent) for t in children] == [(2, 1), (3, 1)]
    for t in children:  # from its own noise: the parent is the condition, not the start
        assert (t.prompt, t.start, t.end, t.source_candidate, t.perturbation) == (
            CHUNK_PROMPTS[1], 0, 10, None, None)
        assert t.seed == derive_seed(7, PROMPT, t.candidate, "frame")
    # every chunk costs the whole schedule: 10 * (2 + 2 + 1 * 2)
    assert s.planned_nfe(2, 2) == 60
    fitted = chunk_tree(budget=60)
    assert fitted.planned_nfe(fitted.first_frame_candidates, fitted.branching) <= 60
    linear = LinearClips.from_options({"unit": "chunk", "num_chunks": 2}, prompt_index=0,
                                      prompt=PROMPT, num_steps=10, budget_nfe=45, seed=7)
    assert linear.n == 2  # a clip of 2 chunks costs 20


@pytest.mark.parametrize(("options", "message"), [
    ({"image": "x.png"}, r"image: applies to unit: chunk only; with unit: frame a candidate"),
    ({"num_chunks": 3}, r"num_chunks: applies to unit: chunk only"),
    ({"unit": "chunk", "strength": 0.5}, r"strength: applies to unit: frame only; with unit: "
                                         r"chunk a candidate is a whole image-to-video clip"),
    ({"unit": "chunk", "num_frames": 3}, r"num_frames: applies to unit: frame only"),
    ({"unit": "chunk", "image_verifier": "clip"}, r"image_verifier: applies to unit: frame"),
    ({"unit": "clip"}, r"unit: must be one of 'frame', 'chunk', got 'clip'"),
    ({"unit": "chunk", "num_chunks": 1}, r"num_chunks: must be >= 2"),
    ({"unit": "chunk", "image": "missing.png"}, r"image: cannot read an image from "
                                                r"'missing.png'"),
])
def test_options_of_the_other_unit_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        chunk_tree(**{"unit": "frame", **options})
    if "image_verifier" in options:
        return  # linear clips judge no first frames
    with pytest.raises(ValueError, match=message):
        LinearClips.from_options({"unit": "frame", **options}, prompt_index=0, prompt=PROMPT,
                                 num_steps=10, budget_nfe=100, seed=7)


# ---- end to end on the tiny Wan I2V folder ------------------------------------------------------
def test_tree_of_chunks_end_to_end(tree_run, image) -> None:
    job, out = tree_run
    data = json.loads((out / "results.json").read_text())
    candidates = candidates_of(out)
    assert data["nfe"] == TREE_NFE == job.budget_nfe(T)
    assert all(c["error"] is None for c in candidates.values())
    assert all(c["nfe"] == T for c in candidates.values())  # every chunk: the whole schedule
    roots = [c for c in candidates.values() if c["parent"] is None]
    assert [c["candidate"] for c in roots] == [0, 1]
    root = max(roots, key=lambda c: (c["reward"], -c["candidate"]))["candidate"]
    depth1 = [c for c in candidates.values() if c["parent"] == root]
    assert len(depth1) == 2
    kept_one = max(depth1, key=lambda c: (c["reward"], -c["candidate"]))["candidate"]
    depth2 = [c for c in candidates.values() if c["parent"] not in (None, root)]
    assert [c["parent"] for c in depth2] == [kept_one, kept_one]  # pruned to one at depth 1
    best = data["prompts"][0]["best"]
    assert best["candidate"] in {c["candidate"] for c in depth2}
    assert best["score"] == max(c["reward"] for c in depth2)
    # the best clip: 5 frames, then 4 new ones per continuation
    with Image.open(out / best_clip(0)) as gif:
        assert gif.n_frames == FRAMES + 2 * (FRAMES - 1)

    store = RunStore.open(out / "store.zarr", writable=False)
    denoiser = get_runtime(RuntimeSpec.from_job(job)).denoiser

    def latent(candidate: int) -> torch.Tensor:
        return store.read_latents(0, [candidate], final=True)

    def rerun(candidate: int, first_frame: Image.Image | torch.Tensor, prompt: str
              ) -> torch.Tensor:
        cond = denoiser.condition_on_image(denoiser.encode(prompt), first_frame)
        noise = denoiser.initial_noise([candidates[candidate]["seed"]])
        return denoiser.denoise(noise, [cond], 0, T).latents

    # the first chunks continue the user's image, every other its parent's last decoded frame
    with Image.open(image) as picture:
        assert torch.equal(rerun(0, picture.convert("RGB"), CHUNK_PROMPTS[0]), latent(0))
    for c in [*depth1, *depth2]:
        depth = 1 if c in depth1 else 2
        last_frame = denoiser.decode(latent(c["parent"]))[0, -1]
        assert torch.equal(rerun(c["candidate"], last_frame, CHUNK_PROMPTS[depth]),
                           latent(c["candidate"]))
    # the verifier judged the chunks joined, each continuation without its first frame
    chain = [root, kept_one, best["candidate"]]
    clip = join_chain([denoiser.decode(latent(c))[0] for c in chain])
    assert clip.shape == (FRAMES + 2 * (FRAMES - 1), 3, SIZE["height"], SIZE["width"])
    expected = TemporalConsistencyVerifier(features="pixels").score(clip[None], [PROMPT])
    assert best["score"] == pytest.approx(expected.item(), rel=1e-6)
    # a lost best clip is decoded again from its chain, as joined for scoring
    runtime = get_runtime(RuntimeSpec.from_job(job))
    refs = tuple(store.latent_ref(0, c, final=True) for c in chain)
    rendered = runtime.run(WorkBatch(tasks=(), store_path=str(store.path), renders=(
        Render(prompt_index=0, candidate=chain[-1], frames=refs),))).images
    assert rendered[(0, chain[-1])].shape == (len(clip), SIZE["height"], SIZE["width"], 3)


def test_a_rerun_is_bit_identical_and_an_interrupted_one_resumes_by_replay(
        tree_run, tmp_path, monkeypatch) -> None:
    job, full = tree_run
    run_job(job, tmp_path / "again")
    assert comparable(tmp_path / "again") == comparable(full)
    assert media_bytes(tmp_path / "again") == media_bytes(full)

    events = []

    def stop_after_the_first_depths(event) -> None:
        events.append(event)
        if len(events) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(job, tmp_path / "stopped", on_progress=stop_after_the_first_depths)
    denoiser = get_runtime(RuntimeSpec.from_job(job)).denoiser
    denoised: list[int] = []
    original = denoiser.denoise

    def counting(latents, conds, start, end, **kwargs):
        denoised.append(len(latents))
        return original(latents, conds, start, end, **kwargs)

    monkeypatch.setattr(denoiser, "denoise", counting)
    run_job(job, tmp_path / "stopped", resume=True)
    assert sum(denoised) == 2  # only the last depth's two chunks ran again
    assert comparable(tmp_path / "stopped") == comparable(full)
    assert media_bytes(tmp_path / "stopped") == media_bytes(full)


def test_linear_clips_of_chunks_from_the_command_line(folder, image, tmp_path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(cli_main, [
        "generate", PROMPT, "--model", str(folder), "--strategy", "linear-clips",
        "--option", "unit=chunk", "--option", "num_chunks=2", "--option", "n=2",
        "--option", f"image={image}", "--verifier", "temporal-consistency",
        "--budget", str(2 * 2 * T), "--executor", "local", "--threads", "1", "--quiet",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["nfe"] == 2 * 2 * T
    candidates = candidates_of(out)
    assert all(c["error"] is None for c in candidates.values())
    assert [candidates[c]["parent"] for c in (2, 3)] == [0, 1]
    assert all(candidates[c]["reward"] is None for c in (0, 1))  # only whole clips are scored
    assert data["prompts"][0]["best"]["candidate"] == max(
        (2, 3), key=lambda c: (candidates[c]["reward"], -c))
    with Image.open(out / best_clip(0)) as gif:
        assert gif.n_frames == 2 * FRAMES - 1


# ---- refused before anything loads ---------------------------------------------------------------
def test_an_image_to_video_folder_needs_a_strategy_that_gives_first_frames(
        folder, image, tmp_path) -> None:
    job = wan_job(folder, image, strategy={"name": "best-of-n"})
    with pytest.raises(JobError, match="model: image-to-video needs a first frame for every "
                                       "candidate, which strategy best-of-n does not give; "
                                       "run tree-of-frames or linear-clips with unit: chunk"):
        preflight(job, tmp_path / "run", resume=False)
    with pytest.raises(JobError, match=r"strategy\.image: an image-to-video model continues a "
                                       r"first frame; give the first chunk's as image"):
        preflight(wan_job(folder, None), tmp_path / "run", resume=False)
    assert not (tmp_path / "run").exists()


def test_chunks_need_a_model_that_continues_an_image(image, tmp_path) -> None:
    text_to_video = tiny_wan_pipeline(tmp_path)
    with pytest.raises(JobError, match=r"strategy\.unit: chunk makes every candidate continue "
                                       r"an image, which wan models cannot; use an "
                                       r"image-to-video model \(WanImageToVideoPipeline\)"):
        preflight(wan_job(text_to_video, image), tmp_path / "run", resume=False)
    # a model held in process has no config to read: its worker refuses it in one line
    job = fake_job(prompts=[PROMPT], verifier="clip-redness", budget=60,
                   strategy={**TREE, "image": str(image)})
    with pytest.raises(JobError, match=r"strategy\.unit: chunk .* this model cannot"):
        run_fake(job, tmp_path / "fake")


def test_a_frame_tree_still_declares_no_chunks() -> None:
    tree = TreeOfFrames(prompt_index=0, prompt=PROMPT, num_steps=10, budget_nfe=100, seed=7)
    assert tree.chunks is None and tree.unit == "frame"
    assert tree.named_verifiers() == {"image_verifier": "shapes-clip"}
    assert tree.ask()[0].score_on is ScoreOn.FINAL


def test_chunks_take_a_sampler_that_cannot_resume() -> None:
    """Every chunk runs 0 -> T in one call, so the shipped UniPC serves; frames resume."""
    check_sampler("flow-unipc", chunk_tree())
    with pytest.raises(JobError, match="sampler: strategy tree-of-frames continues states"):
        check_sampler("flow-unipc", TreeOfFrames(prompt_index=0, prompt=PROMPT, num_steps=10,
                                                 budget_nfe=100, seed=7))

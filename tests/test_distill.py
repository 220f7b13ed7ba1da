"""``diffsearch distill``: TTSnap's noise-aware verifiers by self-distillation, end to end on a
tiny real SD pipeline and a tiny shapes-clip teacher in the shipped file format.

The CLI runs once per module (seconds): 8 denoising steps, TTSnap's default pruning steps for 8
(1, 2, 4), a handful of prompts. The tiny pipeline predicts v: with random weights its x0
estimates then differ visibly from the final images, so the students have something to learn
(with epsilon prediction a random UNet's x0 is already the final image).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import open_clip
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from strategy_harness import common, play, scripted
from verifier_fixtures import register_tiny_clip, write_open_clip_checkpoint

from diffsearch.cli import main
from diffsearch.distill import (
    DistillError,
    distill,
    generate_trajectories,
    kendall_taus,
    objective_loss,
    paired_means,
    train_stage,
    verifier_scores,
)
from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.shapes import clip_model, world
from diffsearch.pipelines.shapes.tokenizer import build_tokenizer
from diffsearch.strategies.ttsnap import TTSnap
from diffsearch.tasks import ScoreOn
from diffsearch.verifiers.clip import ClipVerifier
from diffsearch.verifiers.distillable import NotDistillableError, distillable
from diffsearch.verifiers.registry import FOLDER_MANIFEST, UnknownVerifierError, create_verifier
from diffsearch.verifiers.shapes import ShapesClipVerifier
from tiny_pipelines import tiny_sd_pipeline

NUM_STEPS = 8
STEPS = [1, 2, 4]
"""TTSnap's default pruning steps for 8 steps (2, 6, 11 of 20, scaled)."""
SAMPLES, EVAL_SAMPLES, EPOCHS, LR, BATCH, SEED = 3, 4, 8, 5e-6, 8, 0


def write_tiny_shapes_clip(folder: Path, seed: int) -> Path:
    """A random-weight shapes-clip folder written the way train_clip writes the shipped one
    (grammar tokenizer, open_clip_config.json, open_clip_model.safetensors), smallest sizes,
    plus a verifier manifest so the folder is a verifier by path."""
    tokenizer = build_tokenizer(folder)
    cfg = clip_model.model_config(folder, len(tokenizer), embed_dim=32, vision_width=32,
                                  vision_layers=1, text_width=32, text_layers=1)
    clip_model.write_config(folder, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / clip_model.WEIGHTS_FILE))
    (folder / FOLDER_MANIFEST).write_text(json.dumps(
        {"verifier": "shapes-clip", "options": {"weights": "."}}))
    return folder


@dataclass
class Setup:
    model: Path
    teacher: Path
    train_file: Path
    eval_file: Path
    out: Path
    manifest: dict
    stdout: str

    def denoiser(self):
        return load_denoiser(str(self.model), num_steps=NUM_STEPS, device="cpu")

    def prompts(self, file: Path) -> list[str]:
        return file.read_text().splitlines()


def run_cli(*args: object) -> object:
    return CliRunner().invoke(main, ["distill", *(str(a) for a in args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("distill")
    model = tiny_sd_pipeline(root, prediction_type="v_prediction")
    teacher = write_tiny_shapes_clip(root / "teacher", seed=1)
    train_file, eval_file = root / "train.txt", root / "eval.txt"
    train_file.write_text("\n".join(dict.fromkeys(world.train_prompts(8, seed=3))))
    eval_file.write_text("\n".join(dict.fromkeys(world.heldout_prompts(5, seed=3))))
    out = root / "out"
    result = run_cli("--model", model, "--teacher", teacher, "--num-steps", NUM_STEPS,
                     "--prompts-file", train_file, "--eval-prompts-file", eval_file,
                     "--samples", SAMPLES, "--eval-samples", EVAL_SAMPLES, "--epochs", EPOCHS,
                     "--lr", LR, "--batch-size", BATCH, "--seed", SEED, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "distilled.json").read_text())
    return Setup(model, teacher, train_file, eval_file, out, manifest, result.stdout)


def test_cli_writes_a_complete_manifest_and_prints_the_table(setup) -> None:
    m = setup.manifest
    assert m["teacher"] == str(setup.teacher) and m["model"] == str(setup.model)
    assert m["num_steps"] == NUM_STEPS
    assert m["steps"] == {"1": "step-01", "2": "step-02", "4": "step-04"}
    n_train = len(setup.prompts(setup.train_file))
    train = m["train"]
    assert (train["prompts"], train["samples"], train["images"]) == (n_train, SAMPLES,
                                                                     n_train * SAMPLES)
    assert train["eval_prompts"] == len(setup.prompts(setup.eval_file))
    assert (train["epochs"], train["lr"], train["batch"], train["seed"]) == (EPOCHS, LR, BATCH,
                                                                             SEED)
    assert set(train["seconds"]) == {"generate", "teacher_scores", "train"}
    assert sorted(m["kendall_tau"]) == ["1", "2", "4"]
    table = setup.stdout.splitlines()
    for step, row in m["kendall_tau"].items():
        assert -1.0 <= row["before"] <= 1.0 and -1.0 <= row["after"] <= 1.0
        assert 1 <= row["prompts"] <= train["eval_prompts"]
        assert any(line.split()[:3] == [step, f"{row['before']:+.3f}", f"{row['after']:+.3f}"]
                   for line in table)


def test_curriculum_runs_from_least_to_most_noisy(setup) -> None:
    train = setup.manifest["train"]
    assert train["curriculum"] == [4, 2, 1]
    assert [train["stages"][str(s)]["initialised_from"] for s in (4, 2, 1)] == [
        "teacher", "step-04", "step-02"]
    for step in STEPS:
        manifest = json.loads((setup.out / f"step-{step:02d}" / FOLDER_MANIFEST).read_text())
        assert manifest["verifier"] == "shapes-clip" and manifest["options"] == {"weights": "."}
        meta = manifest["meta"]
        assert meta["noise_aware"] is True and meta["step"] == step
        assert meta["teacher"] == str(setup.teacher) and meta["num_steps"] == NUM_STEPS


def test_each_stage_starts_from_the_previous_students_weights(setup) -> None:
    """Retrain level 2 from the saved level-4 student: bit for bit the saved level-2 student;
    from the teacher instead, something else."""
    denoiser = setup.denoiser()
    train = generate_trajectories(denoiser, setup.prompts(setup.train_file), SAMPLES, STEPS,
                                  SEED, batch=BATCH, progress=False)
    teacher = create_verifier(str(setup.teacher))
    targets = verifier_scores(teacher, train.final, train.row_prompts)
    saved = load_file(str(setup.out / "step-02" / clip_model.WEIGHTS_FILE))

    def level_two_from(folder: Path) -> dict[str, torch.Tensor]:
        adapter = distillable(create_verifier(str(folder)))
        student = adapter.new_student()
        train_stage(adapter, student, train.x0[2], train.row_prompts, targets, step=2,
                    epochs=EPOCHS, lr=LR, batch=BATCH, seed=SEED, progress=False)
        return student.state_dict()

    from_previous = level_two_from(setup.out / "step-04")
    assert all(torch.equal(from_previous[k], saved[k]) for k in saved)
    from_teacher = level_two_from(setup.teacher)
    assert not all(torch.equal(from_teacher[k], saved[k]) for k in saved)


def test_training_loss_goes_down_at_every_level(setup) -> None:
    for step, stage in setup.manifest["train"]["stages"].items():
        assert stage["loss_after"] < stage["loss_before"], (step, stage)
        assert stage["updates"] == EPOCHS * -(-setup.manifest["train"]["images"] // BATCH)


def test_checkpoints_load_by_path_anywhere_and_score(setup, tmp_path) -> None:
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = setup.prompts(setup.eval_file)[:1] * 5
    teacher_scores = create_verifier(str(setup.teacher)).score(images, prompts)
    for step in STEPS:
        moved = tmp_path / f"moved-{step}"
        shutil.copytree(setup.out / f"step-{step:02d}", moved)  # the folder is self-contained
        for folder in (setup.out / f"step-{step:02d}", moved):
            verifier = create_verifier(str(folder))
            assert isinstance(verifier, ShapesClipVerifier)
            assert Path(verifier.weights) == folder.resolve()
            scores = verifier.score(images, prompts)
            assert scores.shape == (5,) and torch.isfinite(scores).all()
            assert not torch.equal(scores, teacher_scores)  # trained away from the teacher


def test_within_prompt_objective_ignores_each_prompts_level() -> None:
    targets = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    shifted = targets + torch.tensor([5.0] * 3 + [-7.0] * 3)  # a constant per prompt group
    assert objective_loss(shifted, targets, "within-prompt", samples=3) == 0.0
    assert objective_loss(shifted, targets, "mse", samples=3) > 0.0
    swapped = torch.tensor([3.0, 2.0, 1.0, 10.0, 20.0, 30.0])  # prompt 0 ranked backwards
    assert objective_loss(swapped, targets, "within-prompt", samples=3) == pytest.approx(8 / 6)


def test_within_prompt_stages_train_on_whole_prompt_groups(setup, tmp_path) -> None:
    out = tmp_path / "within"
    result = run_cli("--model", setup.model, "--teacher", setup.teacher,
                     "--num-steps", NUM_STEPS, "--steps", "2",
                     "--prompts-file", setup.train_file, "--eval-prompts-file", setup.eval_file,
                     "--samples", SAMPLES, "--eval-samples", EVAL_SAMPLES, "--epochs", EPOCHS,
                     "--lr", LR, "--batch-size", BATCH, "--seed", SEED,
                     "--objective", "within-prompt", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    train = json.loads((out / "distilled.json").read_text())["train"]
    assert train["objective"] == "within-prompt"
    groups, per_batch = len(setup.prompts(setup.train_file)), max(1, BATCH // SAMPLES)
    stage = train["stages"]["2"]
    assert stage["updates"] == EPOCHS * -(-groups // per_batch)
    assert stage["loss_after"] < stage["loss_before"]


def test_kendall_tau_is_per_prompt_then_averaged() -> None:
    finals = torch.tensor([1.0, 2, 3, 4] * 3)
    scores = torch.tensor([1.0, 2, 3, 4, 4, 3, 2, 1, 5, 5, 5, 5])
    taus = kendall_taus(scores, finals, samples=4)
    assert taus[:2] == [1.0, -1.0] and taus[2] != taus[2]  # constant scores: undefined
    assert paired_means([1.0, -1.0, 0.0], [0.5, float("nan"), 1.0]) == (0.5, 0.75, 2)
    assert paired_means([float("nan")], [1.0]) == (None, None, 0)


def test_kendall_table_is_the_teacher_and_each_steps_student_on_held_out_x0(setup) -> None:
    denoiser = setup.denoiser()
    held_out = generate_trajectories(denoiser, setup.prompts(setup.eval_file), EVAL_SAMPLES,
                                     STEPS, SEED, batch=BATCH, progress=False)
    teacher = create_verifier(str(setup.teacher))
    finals = verifier_scores(teacher, held_out.final, held_out.row_prompts)
    for step in STEPS:
        student = create_verifier(str(setup.out / f"step-{step:02d}"))
        before = kendall_taus(verifier_scores(teacher, held_out.x0[step], held_out.row_prompts),
                              finals, EVAL_SAMPLES)
        after = kendall_taus(verifier_scores(student, held_out.x0[step], held_out.row_prompts),
                             finals, EVAL_SAMPLES)
        expected = dict(zip(("before", "after", "prompts"), paired_means(before, after)))
        assert setup.manifest["kendall_tau"][str(step)] == pytest.approx(expected)


def test_ttsnap_takes_the_folder_and_scores_each_step_with_its_student(setup) -> None:
    strategy = TTSnap(verifiers=str(setup.out), **common(num_steps=NUM_STEPS, budget=200))
    record = play(strategy, scripted(lambda task: task.candidate / 100))
    used = [{(t.end, t.score_on, t.verifier) for t in tasks} for tasks, _ in record.rounds]
    folder = {s: str((setup.out / f"step-{s:02d}").resolve()) for s in STEPS}
    assert used == [{(1, ScoreOn.X0, folder[1])}, {(2, ScoreOn.X0, folder[2])},
                    {(4, ScoreOn.X0, folder[4])}, {(NUM_STEPS, ScoreOn.FINAL, None)}]


def test_ttsnap_refuses_a_folder_that_does_not_fit(setup, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"steps \[1, 2, 4\] but TTSnap prunes at \[1, 3\]"):
        TTSnap(verifiers=str(setup.out), prune_at=[1, 3], keep=0.5,
               **common(num_steps=NUM_STEPS, budget=200))
    with pytest.raises(ValueError, match="distilled for 8 denoising steps, this run has 20"):
        TTSnap(verifiers=str(setup.out), **common(num_steps=20, budget=400))
    with pytest.raises(ValueError, match="nor a folder holding distilled.json"):
        TTSnap(verifiers=str(tmp_path), **common(num_steps=NUM_STEPS, budget=200))


def test_clip_teacher_distils_into_clip_folders_in_float16(setup, tmp_path) -> None:
    arch = register_tiny_clip(tmp_path / "configs")
    checkpoint = write_open_clip_checkpoint(tmp_path / "tiny-clip.pt", seed=2)
    teacher = {"name": "clip", "arch": arch, "pretrained": str(checkpoint)}
    manifest = distill(denoiser=setup.denoiser(), teacher=teacher, model="tiny",
                       train_prompts=["a red circle", "two blue squares"],
                       eval_prompts=["one green triangle", "a red square"], out=tmp_path / "out",
                       steps=[2], samples=2, epochs=1, lr=LR, batch=BATCH,
                       weights_dtype="float16", progress=False)
    folder = tmp_path / "out" / manifest["steps"]["2"]
    saved = json.loads((folder / FOLDER_MANIFEST).read_text())
    assert saved["verifier"] == "clip" and saved["options"]["arch"] == arch
    assert manifest["train"]["weights_dtype"] == "float16"
    weights = load_file(str(folder / saved["options"]["pretrained"]))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
    student = create_verifier(str(folder))
    assert isinstance(student, ClipVerifier)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(student.score(images, ["a red circle"] * 2)).all()


def test_distillable_student_scores_exactly_as_its_teacher(setup) -> None:
    teacher = create_verifier(str(setup.teacher))
    adapter = distillable(teacher)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    prompts = ["a red circle on the left", "two blue squares"] * 2
    student_scores = adapter.score(adapter.new_student(), images, prompts)
    assert student_scores.requires_grad
    torch.testing.assert_close(student_scores.detach(), teacher.score(images, prompts))


def test_teachers_without_a_network_are_refused_by_name(setup, tmp_path) -> None:
    with pytest.raises(NotDistillableError, match="'shapes-oracle' cannot be distilled"):
        distill(denoiser=setup.denoiser(), teacher="shapes-oracle", model="tiny",
                train_prompts=["a red circle"], eval_prompts=["two blue squares"],
                out=tmp_path / "out", steps=[2])
    with pytest.raises(UnknownVerifierError, match="unknown verifier 'no-such-judge'"):
        distill(denoiser=setup.denoiser(), teacher="no-such-judge", model="tiny",
                train_prompts=["a red circle"], eval_prompts=["two blue squares"],
                out=tmp_path / "out", steps=[2])
    with pytest.raises(DistillError, match="none left that are not also training prompts"):
        distill(denoiser=setup.denoiser(), teacher=str(setup.teacher), model="tiny",
                train_prompts=["a red circle"], eval_prompts=["a red circle"],
                out=tmp_path / "out", steps=[2])


@pytest.mark.parametrize(("flags", "message"), [
    (["--teacher", "no-such-judge"], "unknown verifier 'no-such-judge'"),
    (["--teacher", "shapes-oracle"], "'shapes-oracle' cannot be distilled"),
    (["--steps", "0,9"], r"steps: \[0, 9\] outside 1..7"),
    (["--steps", "2,2"], "repeats a step"),
    (["--steps", "2,x"], "comma-separated integers"),
    (["--samples", "1"], "at least 2 trajectories per prompt"),
    (["--prompts", "10"], "--prompts N draws shapes-world prompts"),
])
def test_cli_errors_are_one_line_with_status_2(setup, tmp_path, flags, message) -> None:
    base = {"--model": setup.model, "--teacher": setup.teacher, "--num-steps": NUM_STEPS,
            "--prompts-file": setup.train_file, "--eval-prompts-file": setup.eval_file,
            "--out": tmp_path / "out"}
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = value
    if "--prompts" in base:
        del base["--prompts-file"], base["--eval-prompts-file"]
    result = run_cli(*[item for pair in base.items() for item in pair], "--quiet")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_used_output_folder(setup) -> None:
    result = run_cli("--model", setup.model, "--teacher", setup.teacher, "--num-steps",
                     NUM_STEPS, "--prompts-file", setup.train_file, "--eval-prompts-file",
                     setup.eval_file, "--out", setup.out, "--quiet")
    assert result.exit_code == 2
    assert "exists and is not an empty folder" in result.stderr


def test_the_small_bundled_guide_is_distillable_like_the_guide() -> None:
    """``shapes-clip-small`` is the same network with other weights: its student starts as it
    and scores exactly as it does."""
    teacher = create_verifier("shapes-clip-small")
    adapter = distillable(teacher)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle on the left", "two blue squares"]
    torch.testing.assert_close(adapter.score(adapter.new_student(), images, prompts).detach(),
                               teacher.score(images, prompts))

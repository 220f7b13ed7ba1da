"""Per-prompt settings: a prompt may carry its own negative prompt, seed, size, guidance and
steps (a mapping in ``prompts``, a line of a .jsonl prompts file), with the job's fields as
defaults. Checked when the job is read and, against the model's family, before anything loads;
run by the real engine on the bundled model, where a prompt's results are exactly those of a
job that gives the same settings to all of its prompts, and prompts of different settings never
share a work unit."""

from __future__ import annotations

import json

import adapter_checks as checks
import pytest
from PIL import Image
from test_cli import assert_one_line_error, invoke

from diffsearch import run_folder
from diffsearch.api import run_job
from diffsearch.engine import WorkPool
from diffsearch.errors import JobError
from diffsearch.job import Job, Sampling, job_from_mapping
from diffsearch.store import RunStore
from diffsearch.tasks import ScoreOn, Task

WIDE = {"prompt": "two blue squares", "width": 48, "height": 32, "seed": 7}
SHORT = {"prompt": "a green triangle at the top", "num_steps": 3, "guidance_scale": 2.5,
         "negative_prompt": "red"}
JOB = {"model": "shapes", "verifier": "shapes-clip", "budget": "2x", "num_steps": 4,
       "threads": 1, "executor": "local", "batch_size": 4, "images": "all", "seed": 3}


# ---- reading the job ----------------------------------------------------------------------------
def test_a_prompt_takes_its_own_settings_and_the_jobs_for_the_rest():
    job = Job(prompts=["a red circle on the left", WIDE, SHORT], **JOB)
    plain, wide, short = (job.prompt_settings(i) for i in range(3))
    assert (plain.text, plain.seed, plain.negative_prompt) == ("a red circle on the left", 3, None)
    assert plain.sampling == job.job_sampling == Sampling(num_steps=4)
    assert (wide.seed, wide.sampling) == (7, Sampling(num_steps=4, width=48, height=32))
    assert short.sampling == Sampling(num_steps=3, guidance_scale=2.5)
    assert short.negative_prompt == "red" and short.seed == 3
    assert job.samplings() == [plain.sampling, wide.sampling, short.sampling]
    assert job.prompt_texts == ["a red circle on the left", WIDE["prompt"], SHORT["prompt"]]


def test_a_mapping_with_only_a_prompt_is_that_prompt():
    assert Job(prompts=[{"prompt": "a"}]).result_key() == Job(prompts=["a"]).result_key()
    assert Job(prompts=[{"prompt": "a", "seed": 1}]).result_key() != Job(prompts=["a"]).result_key()


@pytest.mark.parametrize(("entry", "message"), [
    ({"prompt": "a", "width": 4}, "prompts.1.width: Input should be greater than or equal to 8"),
    ({"prompt": "a", "seed": True}, "prompts.1.seed: Input should be a valid integer"),
    ({"prompt": "a", "steps": 3}, "prompts.1.steps: unknown field"),
    ({"prompt": "  "}, "prompts.1.prompt: is empty"),
    ({"seed": 3}, "prompts.1.prompt: Field required"),
    (5, "prompts.1: must be a prompt's text or a mapping of prompt and its own settings"),
])
def test_bad_prompt_settings_name_their_field(tmp_path, entry, message):
    with pytest.raises(JobError) as error:
        job_from_mapping({"prompts": ["ok", entry]}, source="job.yaml", base_dir=tmp_path)
    assert str(error.value).startswith(f"job.yaml: {message}"), str(error.value)


def test_a_jsonl_file_gives_each_line_its_settings_and_errors_name_the_line(tmp_path):
    lines = [json.dumps({"prompt": "a red circle"}), "", json.dumps(WIDE), json.dumps(SHORT)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    job = job_from_mapping({"prompts_file": "prompts.jsonl", **JOB}, source="job.yaml",
                           base_dir=tmp_path)
    assert job.prompts[0] == "a red circle"
    assert job.prompt_settings(1).sampling.width == 48
    assert job.prompt_settings(2).negative_prompt == "red"

    lines[3] = json.dumps({**SHORT, "guidance_scale": "high"})
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(JobError) as error:
        job_from_mapping({"prompts_file": "prompts.jsonl"}, source="job.yaml", base_dir=tmp_path)
    assert str(error.value) == (f"{tmp_path / 'prompts.jsonl'}:4: guidance_scale: Input should "
                                f"be a valid number")


def test_a_size_the_family_cannot_take_is_refused_before_loading(tmp_path):
    """The prompt's own width is checked against the model's VAE factor from its config
    files: a one-line error naming the prompt, exit status 2, and no run folder."""
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"prompt": "a red circle"}) + "\n" +
        json.dumps({"prompt": "two blue squares", "width": 50}) + "\n")
    (tmp_path / "job.yaml").write_text("prompts_file: prompts.jsonl\nexecutor: local\n")
    result = invoke("run", tmp_path / "job.yaml", "--out", tmp_path / "run")
    assert_one_line_error(result, "prompts.1: width", "multiples of 4 (the VAE factor)")
    assert not (tmp_path / "run").exists()


# ---- packing ------------------------------------------------------------------------------------
def test_prompts_of_different_settings_never_share_a_unit():
    samplings = {0: Sampling(), 1: Sampling(width=48), 2: Sampling()}
    pool = WorkPool(batch_size=8, compute_batch=4, sampling_of=samplings.__getitem__)
    pool.add([Task(prompt_index=p, candidate=c, prompt="x", seed=c, start=0, end=4,
                   score_on=ScoreOn.FINAL) for p in range(3) for c in range(3)])
    units = [{t.prompt_index for t in unit} for unit in pool.partial_units(slots=3)]
    assert {1} in units and all(unit == {1} or 1 not in unit for unit in units)
    assert {0, 2} in units  # prompts of one setting still pack together


# ---- running ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One job of three prompts: the job's settings, its own size and seed, its own steps,
    guidance and negative prompt; and each of the two special prompts run alone as a job
    whose fields are those settings."""
    root = tmp_path_factory.mktemp("mixed")
    with checks.one_thread():
        mixed = run_job(Job(prompts=["a red circle on the left", WIDE, SHORT], **JOB),
                        root / "mixed")
        alone = [run_job(Job(prompts=[entry["prompt"]], **{
            **JOB, **{k: v for k, v in entry.items() if k != "prompt"}}), root / f"alone{i}")
            for i, entry in enumerate((WIDE, SHORT))]
    return root, mixed, alone


def test_each_prompt_gets_exactly_what_its_settings_give_alone(mixed_run):
    """Bit for bit: a prompt's candidates in the mixed job are those of a job that sets the
    prompt's settings as job fields (so no setting leaked between prompts in shared units)."""
    _, mixed, alone = mixed_run
    assert mixed.failed_candidates == 0
    for index, single in zip((1, 2), alone):
        ours = [(c.seed, c.reward, c.scores) for c in mixed.prompts[index].candidates]
        theirs = [(c.seed, c.reward, c.scores) for c in single.prompts[0].candidates]
        assert ours == theirs
    budgets = [p.nfe for p in mixed.prompts]
    assert budgets == [2 * 4, 2 * 4, 2 * 3]  # "2x" of each prompt's own steps


def test_results_and_images_record_each_prompts_settings(mixed_run):
    root, _, _ = mixed_run
    results = json.loads((root / "mixed" / run_folder.RESULTS).read_text())
    settings = [p["settings"] for p in results["prompts"]]
    assert [(s["width"], s["height"]) for s in settings] == [(32, 32), (48, 32), (32, 32)]
    assert [s["num_steps"] for s in settings] == [4, 4, 3]
    assert [s["seed"] for s in settings] == [3, 7, 3]
    assert [s["negative_prompt"] for s in settings] == [None, None, "red"]
    assert settings[2]["guidance_scale"] == 2.5 and settings[0]["guidance_scale"] == 4.0
    assert [s["latent_shape"] for s in settings] == [[4, 8, 8], [4, 8, 12], [4, 8, 8]]
    for index, size in enumerate([(32, 32), (48, 32), (32, 32)]):
        with Image.open(root / "mixed" / run_folder.best_image(index)) as image:
            assert image.size == size
        with Image.open(root / "mixed" / run_folder.candidate_image(index, 0)) as image:
            assert image.size == size


def test_the_store_keeps_each_prompts_shape_and_steps_and_resumes(mixed_run):
    """The store holds the 48x32 prompt's latents in arrays of its own shape; a resumed run
    replays every candidate from it (no new row) to the same results."""
    root, mixed, _ = mixed_run
    store = RunStore.open(root / "mixed" / "store.zarr", writable=False)
    assert [store.latent_shape_of(i) for i in range(3)] == [(4, 8, 8), (4, 8, 12), (4, 8, 8)]
    assert [store.num_steps_of(i) for i in range(3)] == [4, 4, 3]
    assert store.read_latents(1, [0, 1]).shape == (2, 4, 8, 12)
    assert store.read_latents(2, [0]).shape == (1, 4, 8, 8)
    rows = sum(len(v) for v in store.all_finished().values())
    with checks.one_thread():
        again = run_job(Job(prompts=["a red circle on the left", WIDE, SHORT], **JOB),
                        root / "mixed", resume=True)
    reopened = RunStore.open(root / "mixed" / "store.zarr", writable=False)
    assert sum(len(v) for v in reopened.all_finished().values()) == rows
    assert [[(c.seed, c.reward) for c in p.candidates] for p in again.prompts] == \
        [[(c.seed, c.reward) for c in p.candidates] for p in mixed.prompts]

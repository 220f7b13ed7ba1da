"""The run store (format 3) on real Zarr on disk: what is recorded comes back bit for bit, rows
are visible before they are written and on disk before a worker is handed them, old and damaged
stores fail in one line, one writer at a time, and files and bytes stay within their targets."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr

from diffsearch import store as store_module
from diffsearch.errors import StoreError
from diffsearch.store import (
    COLUMN_CHUNK,
    SHARD_ROWS,
    LatentRef,
    RunStore,
    read_latent_rows,
)
from diffsearch.tasks import Outcome, Perturbation, PerturbKind, ScoreOn, Task

SHAPE = (4, 8, 8)
STEPS = 10
PROMPTS = [f"prompt {i}" for i in range(6)]


def create(path: Path, prompts: list[str] = PROMPTS) -> RunStore:
    return RunStore.create(path, job={"model": "shapes"}, result_key="key",
                           latent_shape=SHAPE, num_steps=STEPS, prompts=prompts)


def task(prompt: int, candidate: int, *, end: int = STEPS, score_on: ScoreOn = ScoreOn.FINAL,
         parent: int | None = None, verifier: str | None = None) -> Task:
    if parent is None:
        return Task(prompt_index=prompt, prompt=PROMPTS[prompt % len(PROMPTS)],
                    candidate=candidate, seed=1000 * prompt + candidate, start=0, end=end,
                    score_on=score_on, verifier=verifier)
    return Task(prompt_index=prompt, prompt=PROMPTS[prompt % len(PROMPTS)], candidate=candidate,
                seed=1000 * prompt + candidate, start=2, end=end, parent=parent,
                source_candidate=parent, score_on=score_on, verifier=verifier, eta=0.5,
                perturbation=Perturbation(PerturbKind.RENOISE, 0.3, to_step=2))


def outcome(t: Task, *, scores: dict[str, float] | None = None, error: str | None = None
            ) -> Outcome:
    scores = {"guide": t.prompt_index + t.candidate / 100} if scores is None else scores
    return Outcome(prompt_index=t.prompt_index, candidate=t.candidate, step=t.end,
                   reward=None if error else scores.get("guide"), scores=scores,
                   nfe=t.end - t.start, rows=3 * t.candidate, verifier_calls=len(scores),
                   error=error)


def latent(t: Task, *, final: bool = False) -> np.ndarray:
    """A latent that names its candidate, so any mix-up of rows shows."""
    base = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) / 7
    return (base + 100 * t.prompt_index + t.candidate) * (-1 if final else 1)


def record(store: RunStore, tasks: list[Task], outcomes: list[Outcome] | None = None) -> None:
    store.record(tasks, outcomes or [outcome(t) for t in tasks],
                 np.stack([latent(t) for t in tasks]),
                 np.stack([latent(t, final=True) for t in tasks]))


def data_files(path: Path) -> list[Path]:
    """Chunk and shard files (not the metadata files every array has one of)."""
    return [Path(folder, name) for folder, _, names in os.walk(path) for name in names
            if name not in ("zarr.json", store_module.LOCK_FILE)]


def test_round_trip_through_disk(tmp_path):
    path = tmp_path / "store.zarr"
    tasks = [task(p, c) for c in range(3) for p in range(4)]  # rows of every prompt interleave
    tasks += [task(1, 3, end=4, parent=0, verifier="noise-aware"),
              task(2, 3, end=6, score_on=ScoreOn.X0, parent=1)]
    outcomes = [outcome(t) for t in tasks]
    outcomes[4] = outcome(tasks[4], scores={}, error="non-finite values at step 10")
    outcomes[7] = outcome(tasks[7], scores={}, error="non-finite values at step 10")
    with create(path) as store:
        record(store, tasks, outcomes)
        before = store.all_finished()
    store = RunStore.open(path, writable=False)
    assert store.all_finished() == before
    assert store.prompt_indices() == [0, 1, 2, 3]
    assert store.has_prompt(3) and not store.has_prompt(4)
    assert store.finished_candidates(5) == []
    for t, o in zip(tasks, outcomes):
        found = store.lookup(t)
        assert (found.candidate, found.step, found.reward, found.scores, found.nfe, found.rows,
                found.verifier_calls, found.error) == (
            o.candidate, o.step, o.reward, o.scores, o.nfe, o.rows, o.verifier_calls, o.error)
        assert np.array_equal(store.read_latents(t.prompt_index, [t.candidate]).numpy()[0],
                              latent(t))
    record_13 = store.finished_candidates(1)[3]
    assert (record_13.parent, record_13.seed, record_13.step, record_13.has_final) == (
        0, 1003, 4, True)
    assert store.parents(1) == {0: None, 1: None, 2: None, 3: 0}
    assert not store.finished_candidates(0)[1].has_final  # failed: no image to show
    assert not store.finished_candidates(2)[3].has_final  # scored on x0
    assert store.prompt_text(2) == "prompt 2"
    assert store.attrs["job"] == {"model": "shapes"} and store.attrs["prompts"] == PROMPTS
    assert (store.latent_shape, store.num_steps) == (SHAPE, STEPS)
    with pytest.raises(StoreError, match="no prompt 6"):
        store.prompt_text(6)


def test_lookup_refuses_a_task_that_differs_from_the_recorded_one(tmp_path):
    with create(tmp_path / "store.zarr") as store:
        record(store, [task(0, 0)])
        assert store.lookup(task(0, 1)) is None
        with pytest.raises(StoreError, match="differs from the replayed task in step"):
            store.lookup(task(0, 0, end=5))


def test_final_is_stored_only_where_it_differs_from_the_state(tmp_path):
    path = tmp_path / "store.zarr"
    last, early = task(0, 0), task(0, 1, end=4)
    x0 = task(0, 2, end=4, score_on=ScoreOn.X0)
    with create(path) as store:
        record(store, [last, x0])  # finals given, but neither task has one of its own
    assert not [f for f in data_files(path / "final")], "a final equal to its state was stored"
    with RunStore.open(path) as store:
        record(store, [early])
        assert store.latent_ref(0, 0, final=True) == LatentRef(row=0, step=STEPS)
        assert store.latent_ref(0, 1, final=True) == LatentRef(row=2, step=STEPS, final=True)
        assert store.latent_ref(0, 1) == LatentRef(row=2, step=4)
        with pytest.raises(StoreError, match="candidate 2 of prompt 0 has no final latent"):
            store.latent_ref(0, 2, final=True)
    store = RunStore.open(path, writable=False)
    assert np.array_equal(store.read_latents(0, [0], final=True).numpy()[0], latent(last))
    assert np.array_equal(store.read_latents(0, [1], final=True).numpy()[0],
                          latent(early, final=True))
    assert np.array_equal(store.read_latents(0, [1]).numpy()[0], latent(early))
    assert len(data_files(path / "final")) == 1


def test_a_task_rolled_out_needs_its_final(tmp_path):
    with create(tmp_path / "store.zarr") as store:
        t = task(0, 0, end=4)
        with pytest.raises(ValueError, match="candidate 0 of prompt 0 ends at step 4"):
            store.record([t], [outcome(t)], latent(t)[None], None)
        with pytest.raises(ValueError, match=r"states has shape \(1, 2, 8, 8\), expected"):
            store.record([t], [outcome(t)], latent(t)[None, :2], None)
        assert store.lookup(t) is None


def test_scores_by_label_including_one_that_appears_later(tmp_path):
    path = tmp_path / "store.zarr"
    first, second = [task(0, c) for c in range(2)], [task(1, c) for c in range(2)]
    with create(path) as store:
        record(store, first, [outcome(t, scores={"guide": 1.5}) for t in first])
    with RunStore.open(path) as store:
        record(store, second, [outcome(second[0], scores={"guide": 2.5, "late": 7.0}),
                               outcome(second[1], scores={"late": 8.0})])
    store = RunStore.open(path, writable=False)
    assert [c.scores for c in store.finished_candidates(0)] == [{"guide": 1.5}] * 2
    assert [c.scores for c in store.finished_candidates(1)] == [
        {"guide": 2.5, "late": 7.0}, {"late": 8.0}]
    assert [c.reward for c in store.finished_candidates(1)] == [2.5, None]


def test_errors_and_verifier_names_go_through_code_tables(tmp_path):
    path = tmp_path / "store.zarr"
    tasks = [task(0, c, verifier="noisy" if c % 2 else None) for c in range(6)]
    errors = [None, "boom", "boom", None, "other", "boom"]
    with create(path) as store:
        record(store, tasks, [outcome(t, error=e) for t, e in zip(tasks, errors)])
    store = RunStore.open(path, writable=False)
    assert [c.error for c in store.finished_candidates(0)] == errors
    columns = zarr.open_group(store=str(path / "columns"), mode="r")
    assert columns.attrs["error_messages"] == ["boom", "other"]
    assert columns.attrs["verifier_names"] == ["noisy"]
    assert columns["verifier"][:6].tolist() == [-1, 0, -1, 0, -1, 0]


def three_recorded_rows(tmp_path: Path) -> tuple[Path, RunStore, list[Task]]:
    """A new store with candidates 0-2 of prompt 0 recorded, not yet written."""
    path = tmp_path / "store.zarr"
    store = create(path)
    tasks = [task(0, c) for c in range(3)]
    record(store, tasks)
    return path, store, tasks


def test_a_recent_row_travels_with_its_ref_and_reads_the_same_bits_as_on_disk(tmp_path):
    """The driver never waits for the writer to hand a worker a source: a row recorded a
    moment ago is carried in its ref, and stays carried once written while it is recent."""
    path, store, tasks = three_recorded_rows(tmp_path)
    assert [c.candidate for c in store.finished_candidates(0)] == [0, 1, 2]
    assert store.lookup(tasks[1]) is not None
    carried = store.latent_ref(0, 2)
    assert carried.value is not None
    assert len(RunStore.open(path, writable=False).finished_candidates(0)) == 0
    store.flush()
    assert store.latent_ref(0, 2).value is not None
    for ref in (carried, replace(carried, value=None)):  # the same bits on disk
        assert np.array_equal(read_latent_rows(path, [ref]).numpy()[0], latent(tasks[2]))
    store.close()


def test_only_rows_on_disk_are_forgotten_beyond_the_memory_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "RECENT_LATENT_BYTES", 0)
    path, store, tasks = three_recorded_rows(tmp_path)
    assert store.latent_ref(0, 2).value is not None  # not on disk: held whatever the budget
    store.flush()
    on_disk = store.latent_ref(0, 2)
    assert on_disk.value is None
    record(store, [task(0, 3)])
    mixed = [store.latent_ref(0, 3), store.latent_ref(0, 0), store.latent_ref(0, 3)]
    assert [ref.value is not None for ref in mixed] == [True, False, True]
    assert np.array_equal(read_latent_rows(path, mixed).numpy(),
                          np.stack([latent(task(0, 3)), latent(tasks[0]), latent(task(0, 3))]))
    store.close()


def test_a_latent_too_large_to_carry_is_written_before_its_ref_is_given(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "INLINE_LATENT_BYTES", 0)
    path, store, tasks = three_recorded_rows(tmp_path)
    ref = store.latent_ref(0, 2)
    assert ref.value is None
    assert len(RunStore.open(path, writable=False).finished_candidates(0)) == 3
    assert np.array_equal(read_latent_rows(path, [ref]).numpy()[0], latent(tasks[2]))
    store.close()


def test_recorded_rows_go_to_disk_in_the_background(tmp_path):
    """The writer thread writes what is recorded without the driver waiting; rows recorded
    while it writes go out together in its next write."""
    path = tmp_path / "store.zarr"
    store = create(path, prompts=["p"] * 100)

    def on_disk() -> int:
        return sum(map(len, RunStore.open(path, writable=False).all_finished().values()))

    for p in range(64):
        record(store, [task(p, c) for c in range(4)])  # 256 rows: one whole shard
    deadline = time.monotonic() + 30
    while on_disk() < SHARD_ROWS:
        assert time.monotonic() < deadline, "the writer thread never wrote the rows"
        time.sleep(0.05)
    record(store, [task(64, 0)])
    store.flush()
    assert on_disk() == SHARD_ROWS + 1
    store.close()


def test_a_worker_sees_rows_written_after_it_first_read(tmp_path):
    path = tmp_path / "store.zarr"
    store = create(path, prompts=["p"] * 200)
    first = [task(0, c) for c in range(4)]
    record(store, first)
    assert np.array_equal(read_latent_rows(path, [store.latent_ref(0, 3)]).numpy()[0],
                          latent(first[3]))
    later = [task(p, c) for p in range(1, 150) for c in range(4)]  # the arrays grow
    record(store, later)
    refs = [store.latent_ref(149, 3), store.latent_ref(0, 1), store.latent_ref(149, 3)]
    expected = [latent(later[-1]), latent(first[1]), latent(later[-1])]
    assert np.array_equal(read_latent_rows(str(path), refs).numpy(), np.stack(expected))
    with pytest.raises(IndexError, match="row 99999 of state is not written"):
        read_latent_rows(path, [LatentRef(row=99999, step=STEPS)])
    store.close()


def test_recording_a_finished_candidate_again_is_refused(tmp_path):
    path = tmp_path / "store.zarr"
    with create(path) as store:
        record(store, [task(0, 0)])
        with pytest.raises(StoreError, match="candidate 0 of prompt 0 is already recorded"):
            record(store, [task(0, 0)])
        with pytest.raises(StoreError, match="candidate 1 of prompt 0 is already recorded"):
            record(store, [task(0, 1), task(0, 1)])
    with RunStore.open(path) as store, pytest.raises(StoreError, match="already recorded"):
        record(store, [task(0, 0)])
    with pytest.raises(RuntimeError, match="not open for writing"):
        record(RunStore.open(path, writable=False), [task(0, 2)])


def test_rows_not_done_are_ignored_and_their_row_numbers_reused(tmp_path):
    path = tmp_path / "store.zarr"
    tasks = [task(0, c) for c in range(5)]
    with create(path) as store:
        record(store, tasks)
    done = zarr.open_array(store=str(path), path="columns/done", mode="r+")
    done[2] = False  # a hole: ignored
    done[4] = False  # the last row: ignored, and the next row recorded takes its place
    with RunStore.open(path) as store:
        assert [c.candidate for c in store.finished_candidates(0)] == [0, 1, 3]
        replacement = task(0, 4)
        record(store, [replacement])
        assert store.latent_ref(0, 4).row == 4
        record(store, [task(0, 2)])
        assert store.latent_ref(0, 2).row == 5
    store = RunStore.open(path, writable=False)
    assert [c.candidate for c in store.finished_candidates(0)] == [0, 1, 2, 3, 4]
    assert np.array_equal(store.read_latents(0, range(5)).numpy(),
                          np.stack([latent(t) for t in tasks]))


def test_old_formats_are_refused_in_one_line(tmp_path):
    for version in (1, 2):
        path = tmp_path / f"v{version}" / "store.zarr"
        root = zarr.open_group(store=str(path), mode="w-")
        root.attrs.update({"format": version, "job": {}, "latent_shape": list(SHAPE)})
        group = root.create_group("p00000")
        group.create_array("latent", shape=(64, *SHAPE), chunks=(1, *SHAPE), dtype="float32")
        for writable in (True, False):
            with pytest.raises(StoreError) as caught:
                RunStore.open(path, writable=writable)
            message = str(caught.value)
            assert message == (f"{path} has store format {version} (written by an older "
                               f"diffsearch); this diffsearch reads format 3: run into a new "
                               f"folder")
    with pytest.raises(StoreError, match="store format 4; this diffsearch reads format 3"):
        path = tmp_path / "v4" / "store.zarr"
        zarr.open_group(store=str(path), mode="w-").attrs["format"] = 4
        RunStore.open(path)


def test_missing_and_damaged_stores_are_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no run store at"):
        RunStore.open(tmp_path / "nothing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(StoreError, match="is not a readable diffsearch store"):
        RunStore.open(tmp_path / "empty.zarr")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(store=str(plain), mode="w-")
    with pytest.raises(StoreError, match="is not a diffsearch store"):
        RunStore.open(plain)
    path = tmp_path / "store.zarr"
    with create(path) as store:
        record(store, [task(0, 0)])
    (path / "columns" / "seed" / "zarr.json").unlink()
    with pytest.raises(StoreError, match="is not a readable diffsearch store"):
        RunStore.open(path, writable=False)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="is not a readable diffsearch store") as caught:
        RunStore.open(path)
    assert "\n" not in str(caught.value)


def test_one_writer_at_a_time_and_readers_never_wait(tmp_path):
    path = tmp_path / "store.zarr"
    writer = create(path)
    record(writer, [task(0, 0)])
    with pytest.raises(StoreError) as caught:
        RunStore.open(path)
    assert str(caught.value) == f"{path} is being written by another diffsearch process"
    RunStore.open(path, writable=False)
    writer.close()
    writer.close()  # idempotent
    with RunStore.open(path) as again:
        assert again.lookup(task(0, 0)) is not None


def test_create_refuses_an_existing_store_and_leaves_no_half_built_one(tmp_path):
    path = tmp_path / "run" / "store.zarr"
    abandoned = path.with_name(".store.zarr.creating-0123")  # a create killed midway
    abandoned.mkdir(parents=True)
    create(path).close()
    with pytest.raises(StoreError, match="already holds a run"):
        create(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.zarr"]


def test_opening_for_writing_clears_temporary_files_of_a_killed_write(tmp_path):
    path = tmp_path / "store.zarr"
    with create(path) as store:
        record(store, [task(0, 0)])
    leftover = path / "state" / "c.0.0.0.0.3f2a.partial"
    leftover.write_bytes(b"half a shard")
    RunStore.open(path, writable=False)
    assert leftover.exists()  # readers never touch the store
    with RunStore.open(path) as store:
        assert not leftover.exists()
        assert store.lookup(task(0, 0)) is not None


@pytest.mark.parametrize("end", [STEPS, STEPS - 3])
def test_files_and_bytes_stay_within_their_targets(tmp_path, end):
    """200 prompts x 4 candidates in units of 8 across prompts; ``end < STEPS``: both latent
    arrays fill."""
    path = tmp_path / "store.zarr"
    prompts = [f"prompt {i}" for i in range(200)]
    tasks = [task(p, c, end=end) for p in range(200) for c in range(4)]
    with create(path, prompts=prompts) as store:
        for begin in range(0, len(tasks), 8):
            record(store, tasks[begin:begin + 8])
    candidates = len(tasks)
    latent_files = data_files(path / "state") + data_files(path / "final")
    assert len(latent_files) <= math.ceil(candidates / 64)
    # the rest: one metadata file per array and group, and a chunk per column per 16384 rows
    metadata = [f for f in Path(path).rglob("*") if f.name in ("zarr.json", "writer.lock")]
    arrays = len(store_module._COLUMNS) + 1  # the columns and the one score label
    assert len(metadata) == 1 + 2 + 2 + arrays + 1  # root, state, final, groups, lock
    assert len(data_files(path)) - len(latent_files) <= arrays * math.ceil(
        candidates / COLUMN_CHUNK)
    latents = candidates * (2 if end < STEPS else 1)
    raw = latents * int(np.prod(SHAPE)) * 4
    assert sum(f.stat().st_size for f in data_files(path)) <= 1.5 * raw
    store = RunStore.open(path, writable=False)
    assert sum(map(len, store.all_finished().values())) == candidates

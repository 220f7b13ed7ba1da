"""SIGKILL of the store's writer at random moments, writes included: the store always opens,
every candidate marked done holds exactly what was recorded for it, and recording resumes from
there until every candidate is done exactly once.

The writer is a subprocess (:func:`write_all`) that records rows in units of 8 across prompts
and flushes after every unit, so most of its time is spent inside flushes; every value it
records is derived from (prompt, candidate), so the test can check any row it finds.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from diffsearch.store import RunStore, read_latent_rows
from diffsearch.tasks import Outcome, ScoreOn, Task

SHAPE = (4, 32, 32)
"""16 KiB a row: a shard rewrite takes long enough for kills to land inside it."""
STEPS = 10
PROMPTS, CANDIDATES = 16, 24
UNIT = 8
KILLS = 6


def task(prompt: int, candidate: int) -> Task:
    parent = candidate - 1 if candidate % 5 == 4 else None
    return Task(prompt_index=prompt, prompt=f"prompt {prompt}", candidate=candidate,
                seed=7919 * prompt + candidate, start=0 if parent is None else 2,
                end=6 if candidate % 3 == 0 else STEPS, parent=parent, source_candidate=parent,
                score_on=ScoreOn.FINAL, verifier="noisy" if candidate % 6 == 1 else None)


def outcome(t: Task) -> Outcome:
    error = f"bad {t.candidate % 2}" if t.candidate % 7 == 3 else None
    scores = {} if error else {"guide": t.prompt_index + t.candidate / 1000}
    if t.candidate >= 12 and not error:
        scores["late"] = -float(t.candidate)  # a label that appears partway through
    return Outcome(prompt_index=t.prompt_index, candidate=t.candidate, step=t.end,
                   reward=scores.get("guide"), scores=scores, nfe=t.end - t.start,
                   rows=t.candidate % 4, verifier_calls=len(scores), error=error)


def latent(prompt: int, candidate: int, *, final: bool = False) -> np.ndarray:
    values = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) / 13
    return (values + 1000 * prompt + candidate) * (-1 if final else 1)


def write_all(path: Path) -> None:
    """The writer subprocess: record every candidate not yet done, in a fixed order."""
    if path.exists():
        store = RunStore.open(path)
    else:
        store = RunStore.create(path, job={}, result_key="kill", latent_shape=SHAPE,
                                num_steps=STEPS, prompts=[f"prompt {p}" for p in range(PROMPTS)])
    print("ready", flush=True)
    todo = [task(p, c) for c in range(CANDIDATES) for p in range(PROMPTS)]
    todo = [t for t in todo if store.lookup(t) is None]
    for begin in range(0, len(todo), UNIT):
        unit = todo[begin:begin + UNIT]
        store.record(unit, [outcome(t) for t in unit],
                     np.stack([latent(t.prompt_index, t.candidate) for t in unit]),
                     np.stack([latent(t.prompt_index, t.candidate, final=True) for t in unit]))
        store.flush()
        print("unit", flush=True)
    store.close()


def start_writer(path: Path) -> subprocess.Popen:
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    code = ("import pathlib, sys, test_store_kill; "
            "test_store_kill.write_all(pathlib.Path(sys.argv[1]))")
    process = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, text=True)
    assert process.stdout.readline() == "ready\n", process.stderr.read()
    return process


def check(path: Path) -> int:
    """Open the store as a resuming writer would; every done candidate must hold what was
    recorded for it. Returns how many are done."""
    with RunStore.open(path) as store:
        finished = store.all_finished()
        done = [(p, r.candidate) for p, records in finished.items() for r in records]
        for prompt, records in finished.items():
            for record in records:
                t, o = task(prompt, record.candidate), outcome(task(prompt, record.candidate))
                assert (record.step, record.parent, record.seed, record.reward, record.scores,
                        record.nfe, record.rows, record.verifier_calls, record.error) == (
                    t.end, t.parent, t.seed, o.reward, o.scores, o.nfe, o.rows,
                    o.verifier_calls, o.error)
                assert store.lookup(t) is not None
        for final in (False, True):
            refs = [store.latent_ref(p, c, final=final) for p, c in done]
            expected = [latent(p, c, final=final and task(p, c).end < STEPS) for p, c in done]
            assert np.array_equal(read_latent_rows(path, refs).numpy(),
                                  np.stack(expected) if done else np.empty((0, *SHAPE)))
        return len(done)


def test_killed_writer_leaves_a_store_that_resumes_exactly(tmp_path):
    path = tmp_path / "store.zarr"
    rng = random.Random(5)
    done = 0
    for _ in range(KILLS):
        writer = start_writer(path)
        # after a few units (so kills never outrun a fast machine: at most 6 x 6 of the 48
        # units get done), then at a random moment of the next unit's write
        for _ in range(rng.randint(1, 6)):
            assert writer.stdout.readline() == "unit\n", writer.stderr.read()
        time.sleep(rng.uniform(0.0, 0.05))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert writer.returncode == -signal.SIGKILL, "the writer finished before the kill"
        now = check(path)
        assert now >= done  # nothing done is ever lost
        done = now
    assert 0 < done < PROMPTS * CANDIDATES
    writer = start_writer(path)
    assert writer.wait(timeout=60) == 0, writer.stderr.read()
    assert check(path) == PROMPTS * CANDIDATES
    assert not list(path.rglob("*.partial"))

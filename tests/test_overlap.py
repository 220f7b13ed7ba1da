"""The in-process executor overlaps a unit's scoring with the next unit's denoising, and the
results are the same bits as running the units one after another."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from diffsearch.api import run_job
from diffsearch.executor import LocalExecutor
from diffsearch.runtime import RuntimeSpec, WorkerRuntime, register_runtime
from diffsearch.verifiers.base import Verifier
from engine_harness import comparable, fake_job, png_bytes
from fake_denoiser import FakeDenoiser

SPANS: list[tuple[str, float, float, str]] = []
"""(stage, start, end, thread name) of every denoise and score call, in this process."""


class SlowRedness(Verifier):
    """Mean red, taking 20 ms a call: long enough to see what runs meanwhile."""

    name = "slow-redness"
    needs_prompt = False

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        began = time.perf_counter()
        time.sleep(0.02)
        SPANS.append(("score", began, time.perf_counter(), threading.current_thread().name))
        return images[:, 0].mean(dim=(1, 2))


class TimedDenoiser(FakeDenoiser):
    def denoise(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        began = time.perf_counter()
        result = super().denoise(*args, **kwargs)
        time.sleep(0.01)
        SPANS.append(("denoise", began, time.perf_counter(), threading.current_thread().name))
        return result


def run(tmp_path: Path, name: str, overlap: bool):  # type: ignore[no-untyped-def]
    job = fake_job(prompts=["a red circle", "two blue squares", "a green star"],
                   verifier="slow-redness", budget="8x", batch_size=4, threads=1)
    register_runtime(WorkerRuntime(RuntimeSpec.from_job(job), TimedDenoiser(num_steps=10),
                                   lambda spec, device="cpu": SlowRedness(device)))
    SPANS.clear()
    result = run_job(job, tmp_path / name, executor=LocalExecutor(overlap=overlap))
    return result, list(SPANS)


def overlapping(spans: list[tuple[str, float, float, str]]) -> int:
    """How many denoise calls ran while some score call ran."""
    scores = [(a, b) for stage, a, b, _ in spans if stage == "score"]
    return sum(1 for stage, a, b, _ in spans if stage == "denoise"
               and any(a < end and start < b for start, end in scores))


def test_denoising_overlaps_scoring_and_gives_the_same_bits(tmp_path: Path) -> None:
    serial, serial_spans = run(tmp_path, "serial", overlap=False)
    overlapped, spans = run(tmp_path, "overlapped", overlap=True)
    assert overlapping(serial_spans) == 0
    assert overlapping(spans) >= 2
    threads = {stage: {name for s, _, _, name in spans if s == stage}
               for stage in ("denoise", "score")}
    assert threads["denoise"].isdisjoint(threads["score"])
    assert comparable(tmp_path / "overlapped") == comparable(tmp_path / "serial")
    assert png_bytes(tmp_path / "overlapped") == png_bytes(tmp_path / "serial")
    assert overlapped.nfe == serial.nfe and overlapped.rows == serial.rows


def test_overlapping_sends_no_more_padding_than_one_unit_at_a_time(tmp_path: Path) -> None:
    """The second slot is a pipeline stage: filling it with a partial unit early would pad
    passes that waiting fills (zero-order's neighbours come in small rounds)."""
    job = fake_job(prompts=["a red circle", "two blue squares", "a green star", "one ring"],
                   strategy={"name": "zero-order"}, budget="8x", batch_size=8, threads=1)
    rows = {}
    for overlap in (False, True):
        register_runtime(WorkerRuntime(RuntimeSpec.from_job(job), FakeDenoiser(num_steps=10),
                                       lambda spec, device="cpu": SlowRedness(device)))
        result = run_job(job, tmp_path / str(overlap), executor=LocalExecutor(overlap=overlap))
        rows[overlap] = result.rows
    assert rows[True] == rows[False]
